//! The control directory: where the agent and the outside world meet.
//!
//! Everything an operator does reaches the agent through one directory per process (protocol
//! version 1, `docs/control-protocol.md`):
//!
//! - `agent.json`, written at install ([`ControlDir::write_agent_info`]), says an agent listens;
//! - `agent.sock`, the control socket ([`socket`]), is where `dsu` sends its requests and reads
//!   the answers: no signal, no polling;
//! - a raw trigger is a file `patch` plus the trigger signal; a script may also write
//!   `request.json` (a [`RequestFile`]) next to a patch, then signal;
//! - the agent answers file requests in `result.json` ([`ControlDir::write_result`]);
//! - [`cleanup`] removes the directory when the process exits, and `dsu` those of dead
//!   processes.
//!
//! The directory is the first line of authentication: whoever can write into it can make the
//! process run code. So it must belong to the process's user and be writable by nobody else,
//! and its parent must not let anyone else replace it; [`verify_dir`] checks that before each
//! request, the way tmux checks its socket directory. The socket adds the peer's credentials.
//!
//! Each file input is claimed with a `rename(2)` into `consumed/` before it is read: a rename
//! either moves the file or finds it gone, so a repeated signal can never apply the same patch
//! twice, and what is read is exactly what was claimed.
//!
//! This module does file and socket I/O only and runs on the agent thread, never while
//! threads are stopped. The `dsu` command reuses its path rules, checks and wire types.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::report::{AgentInfo, Outcome, PROTOCOL_VERSION, Status};

pub mod cleanup;
pub mod socket;

/// What `agent.json` says about the control socket.
#[derive(Debug, Clone, Default)]
pub struct SocketInfo {
    /// Its file name in the directory, when it listens.
    pub name: Option<String>,
    /// Why it could not be created, when it could not.
    pub error: Option<String>,
}

/// Written by the agent at install.
pub const AGENT_FILE: &str = "agent.json";
/// The raw-trigger patch file.
pub const PATCH_FILE: &str = "patch";
/// A name for the patch of a file request (`request.json` names it; `dsu` used it before the
/// control socket). Not `patch`: a raw trigger arriving between the two writes must not take
/// the request's patch for its own.
pub const REQUEST_PATCH_FILE: &str = "request.patch";
/// A request from `dsu`.
pub const REQUEST_FILE: &str = "request.json";
/// The agent's answer to the last request.
pub const RESULT_FILE: &str = "result.json";
/// `flock`ed by `dsu` versions before the control socket; now only removed with the directory.
pub const LOCK_FILE: &str = "lock";
/// The patches in effect (`report::StatusReport`), rewritten by the agent after every change.
pub const STATUS_FILE: &str = "status.json";
/// Where claimed inputs are kept: `<seq>.patch` and `<seq>.request.json`.
pub const CONSUMED_DIR: &str = "consumed";

/// Largest patch the agent (and `dsu`) accepts. Far above any real patch; it bounds the
/// memory a stray file can make the agent allocate.
pub const MAX_PATCH_SIZE: u64 = 64 << 20;
/// Largest `request.json` accepted.
pub const MAX_REQUEST_SIZE: u64 = 64 << 10;
/// Largest answer (`result.json`, `status.json`) `dsu` reads.
pub const MAX_ANSWER_SIZE: u64 = 16 << 20;

/// Names a request may not use as its patch `file`: moving them into `consumed/` would break
/// the directory.
const RESERVED: [&str; 7] = [
    AGENT_FILE,
    REQUEST_FILE,
    RESULT_FILE,
    LOCK_FILE,
    CONSUMED_DIR,
    STATUS_FILE,
    socket::SOCKET_FILE,
];

/// Directory mode bits that let group or others create, rename or delete entries.
const GROUP_OTHER_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// Why the control directory or a request in it was refused.
///
/// The first group (directory errors) means the directory cannot be trusted: the agent
/// reports them in its log, never in the directory. The rest concern one request and are
/// answered in `result.json`; [`ControlError::outcome`] builds that answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create control directory {}: {source}", .path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot inspect control directory {}: {source}", .path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "control directory {} is a {found}, not a directory; remove it or set DSU_CONTROL_DIR \
         to another path",
        .path.display()
    )]
    NotADirectory { path: PathBuf, found: &'static str },
    #[error(
        "control directory {} is owned by uid {found}, not uid {expected}; remove it, or set \
         DSU_CONTROL_DIR to a directory uid {expected} owns",
        .path.display()
    )]
    WrongOwner {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "control directory {p} has mode {mode:04o}: group or others can write it and so make \
         the process run their code; run `chmod 700 {p}`",
        p = .path.display()
    )]
    InsecureMode { path: PathBuf, mode: u32 },
    #[error(
        "control directory {} is inside {} (owner uid {owner}, mode {mode:04o}), which others \
         can write without the sticky bit, so they could replace it; choose a directory whose \
         parent only its owner or root can write (set DSU_CONTROL_DIR)",
        .path.display(), .parent.display()
    )]
    InsecureParent {
        path: PathBuf,
        parent: PathBuf,
        owner: u32,
        mode: u32,
    },
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("malformed request {}: {reason}", .path.display())]
    MalformedRequest {
        path: PathBuf,
        /// The request's `id` if it could be read, so the answer still reaches `dsu`.
        request: Option<String>,
        /// The request's `op` if it could be read.
        op: Option<String>,
        reason: String,
    },
    #[error("patch file {} does not exist; write the patch there before signalling", .path.display())]
    MissingPatch {
        path: PathBuf,
        request: Option<String>,
    },
    #[error("{} is {size} bytes, over the limit of {limit} bytes", .path.display())]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
        request: Option<String>,
    },
    #[error("cannot read patch {}: {source}", .path.display())]
    ReadPatch {
        path: PathBuf,
        request: Option<String>,
        #[source]
        source: io::Error,
    },
}

impl ControlError {
    /// The `id` of the request this error answers, if it is known.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            ControlError::MalformedRequest { request, .. }
            | ControlError::MissingPatch { request, .. }
            | ControlError::TooLarge { request, .. }
            | ControlError::ReadPatch { request, .. } => request.as_deref(),
            _ => None,
        }
    }

    /// The operation the failed request asked for, `"unknown"` when it could not be read.
    pub fn op(&self) -> &str {
        match self {
            ControlError::MalformedRequest { op: Some(op), .. } => op,
            ControlError::MissingPatch { .. }
            | ControlError::TooLarge { .. }
            | ControlError::ReadPatch { .. } => "apply",
            _ => "unknown",
        }
    }

    /// The `result.json` answer to this error for request number `seq`, or `None` for a
    /// directory error: an untrusted directory gets no answer written into it.
    pub fn outcome(&self, seq: u64) -> Option<Outcome> {
        let status = match self {
            ControlError::Create { .. }
            | ControlError::Inspect { .. }
            | ControlError::NotADirectory { .. }
            | ControlError::WrongOwner { .. }
            | ControlError::InsecureMode { .. }
            | ControlError::InsecureParent { .. } => return None,
            ControlError::MalformedRequest { .. }
            | ControlError::MissingPatch { .. }
            | ControlError::TooLarge { .. } => Status::Refused,
            ControlError::Io { .. } | ControlError::ReadPatch { .. } => Status::Failed,
        };
        Some(Outcome::new(
            seq,
            self.request_id().map(str::to_owned),
            self.op().to_owned(),
            status,
            Some(self.to_string()),
        ))
    }
}

/// `request.json` as `dsu` writes it. `timeout_ms` applies to any operation; the others are in
/// [`RequestOp`], flattened so the file reads `{"id":..,"op":"apply","file":..}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFile {
    /// Unique per request; echoed as `request` in `result.json`.
    pub id: String,
    #[serde(flatten)]
    pub op: RequestOp,
    /// How long the agent may keep retrying; absent means the agent's default policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// On the control socket only: the number of patch bytes that follow the request line
    /// of an `apply` (whose `file` is then only a label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_len: Option<u64>,
    /// An apply may leave compiler clones of a replaced function unreplaced
    /// (`Policy::allow_stale_clones`; `dsu apply --allow-stale-clones`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_stale_clones: bool,
}

/// The operation part of a [`RequestFile`], tagged by `"op"`. New operations are new variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum RequestOp {
    /// Apply the patch in `file`, a plain file name in the control directory.
    Apply { file: String },
    /// Revert patch `patch_id` (a `seq`), or the newest one when `null`.
    Revert {
        #[serde(default)]
        patch_id: Option<u64>,
    },
    /// Report what is applied.
    Status,
}

/// A request claimed from the directory, ready for the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `id` from `request.json`; `None` for a raw trigger.
    pub id: Option<String>,
    pub op: Op,
}

/// What a [`Request`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Apply {
        /// The patch file's contents.
        bytes: Vec<u8>,
        /// Where the patch file now lies: `consumed/<seq>.patch`.
        file: PathBuf,
        /// From `timeout_ms`; `None` means the default policy (always so for a raw trigger).
        timeout: Option<Duration>,
        /// From `allow_stale_clones` (false for a raw trigger).
        allow_stale_clones: bool,
    },
    Revert {
        patch_id: Option<u64>,
        timeout: Option<Duration>,
    },
    Status,
}

impl Op {
    /// The name used for `op` in `result.json`.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Apply { .. } => "apply",
            Op::Revert { .. } => "revert",
            Op::Status => "status",
        }
    }
}

/// A verified control directory owned by this process's user.
#[derive(Debug, Clone)]
pub struct ControlDir {
    path: PathBuf,
    owner: u32,
    /// Whether [`ControlDir::open_or_create`] created the directory itself (not only found
    /// it): only then does the agent remove it when the process exits.
    created: bool,
}

impl ControlDir {
    /// The control directory for process `pid` by this process's environment and effective
    /// uid (see [`ControlDir::resolve_with`]), made absolute against the current directory so
    /// a relative `DSU_CONTROL_DIR` keeps meaning the same place after a `chdir`.
    pub fn resolve(pid: u32) -> PathBuf {
        let path = Self::resolve_with(
            |name| std::env::var_os(name),
            pid,
            dsu_sys::ids::effective_uid(),
        );
        std::path::absolute(&path).unwrap_or(path)
    }

    /// The control directory rule, with the environment given as a lookup function so that
    /// `dsu` can apply it to another process's environment:
    /// `$DSU_CONTROL_DIR` if set, else `$XDG_RUNTIME_DIR/dsu/<pid>`, else `/tmp/dsu-<uid>/<pid>`.
    /// Empty values count as unset, and a relative `XDG_RUNTIME_DIR` is ignored, as the XDG
    /// base directory specification asks.
    pub fn resolve_with(env: impl Fn(&str) -> Option<OsString>, pid: u32, uid: u32) -> PathBuf {
        let var = |name| env(name).filter(|value: &OsString| !value.is_empty());
        if let Some(dir) = var("DSU_CONTROL_DIR") {
            return PathBuf::from(dir);
        }
        if let Some(runtime) = var("XDG_RUNTIME_DIR").map(PathBuf::from)
            && runtime.is_absolute()
        {
            return runtime.join("dsu").join(pid.to_string());
        }
        PathBuf::from(format!("/tmp/dsu-{uid}")).join(pid.to_string())
    }

    /// Creates `path` (and missing parents) with mode 0700, or opens it if it exists, then
    /// checks it with [`verify_dir`] against this process's effective uid.
    pub fn open_or_create(path: impl Into<PathBuf>) -> Result<ControlDir, ControlError> {
        let path = path.into();
        let owner = dsu_sys::ids::effective_uid();
        let created = fs::symlink_metadata(&path).is_err();
        if let Err(source) = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
        {
            // Something already there that is not a directory gets the precise refusal
            // from verify_dir; anything else is a creation failure.
            if fs::symlink_metadata(&path).is_err() {
                return Err(ControlError::Create { path, source });
            }
        }
        verify_dir(&path, owner)?;
        let consumed = path.join(CONSUMED_DIR);
        match fs::DirBuilder::new().mode(0o700).create(&consumed) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(ControlError::Create {
                    path: consumed,
                    source,
                });
            }
        }
        Ok(ControlDir {
            path,
            owner,
            created,
        })
    }

    /// Whether the agent created the directory (rather than found it).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The uid that owns the directory: the process's effective uid at install.
    pub fn owner(&self) -> u32 {
        self.owner
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks owner and mode again. [`ControlDir::take_request`] does so itself; this is for
    /// callers that want to check at other times.
    pub fn recheck(&self) -> Result<(), ControlError> {
        verify_dir(&self.path, self.owner)
    }

    /// Writes `agent.json` for this process with trigger signal `signal`. Called once at
    /// install; it first removes a `request.json` and `result.json` that a previous process
    /// with the same pid (or the same `DSU_CONTROL_DIR`) left, so that neither is mistaken
    /// for this agent's.
    pub fn write_agent_info(&self, signal: i32, socket: SocketInfo) -> Result<(), ControlError> {
        for stale in [REQUEST_FILE, RESULT_FILE] {
            remove_if_exists(&self.path.join(stale))?;
        }
        let info = AgentInfo {
            protocol: PROTOCOL_VERSION,
            pid: std::process::id(),
            signal,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            start_time: fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|stat| parse_start_time(&stat)),
            socket: socket.name,
            socket_error: socket.error,
        };
        write_json(&self.path, AGENT_FILE, &info, None)
    }

    /// Claims the next request, if any, as request number `seq` (use a new `seq` after each
    /// `Ok(Some(_))` or `Err(_)`; it names the files in `consumed/`).
    ///
    /// `request.json` comes first; without one, a `patch` file is a raw apply request. The
    /// input is renamed into `consumed/` before it is read, so calling this again (say, for a
    /// repeated signal) returns `Ok(None)` instead of the same request.
    pub fn take_request(&self, seq: u64) -> Result<Option<Request>, ControlError> {
        self.recheck()?;
        let request_path = self.path.join(REQUEST_FILE);
        let claimed = self.consumed(seq, "request.json");
        match fs::rename(&request_path, &claimed) {
            Ok(()) => self.read_request(&claimed, seq).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A raw trigger: no id, and the engine's default policy.
                match self.claim_patch(PATCH_FILE, seq, None, None, false) {
                    Err(ControlError::MissingPatch { .. }) => Ok(None),
                    other => other.map(Some),
                }
            }
            Err(source) => Err(ControlError::Io {
                action: "claim request",
                path: request_path,
                source,
            }),
        }
    }

    /// Writes `status.json` atomically.
    pub fn write_status(&self, status: &crate::report::StatusReport) -> Result<(), ControlError> {
        write_json(&self.path, STATUS_FILE, status, None)
    }

    /// Writes `result.json` atomically: `dsu` never sees a half-written answer.
    pub fn write_result(&self, outcome: &Outcome) -> Result<(), ControlError> {
        write_json(&self.path, RESULT_FILE, outcome, None)
    }

    /// Who made file request `seq`: the owner of its claimed `request.json`, else of its
    /// claimed raw-trigger `patch` (only the directory's owner and root can put files here).
    pub fn requester(&self, seq: u64) -> Option<u32> {
        use std::os::unix::fs::MetadataExt;
        ["request.json", "patch"]
            .iter()
            .find_map(|suffix| fs::symlink_metadata(self.consumed(seq, suffix)).ok())
            .map(|m| m.uid())
    }

    /// Where the patch of request `seq` is kept: `consumed/<seq>.patch`.
    pub fn consumed_patch(&self, seq: u64) -> PathBuf {
        self.consumed(seq, "patch")
    }

    /// Keeps the patch of a socket request as `consumed/<seq>.patch`, as the file requests'
    /// patches are kept.
    pub fn keep_patch(&self, seq: u64, bytes: &[u8]) -> Result<(), ControlError> {
        write_atomic(
            &self.path.join(CONSUMED_DIR),
            &format!("{seq}.patch"),
            bytes,
            None,
        )
    }

    /// Keeps the request line of a socket request as `consumed/<seq>.request.json`, as a
    /// file request is kept once claimed.
    pub fn keep_request(&self, seq: u64, request: &RequestFile) -> Result<(), ControlError> {
        write_json(
            &self.path.join(CONSUMED_DIR),
            &format!("{seq}.request.json"),
            request,
            None,
        )
    }

    fn consumed(&self, seq: u64, suffix: &str) -> PathBuf {
        self.path.join(CONSUMED_DIR).join(format!("{seq}.{suffix}"))
    }

    fn read_request(&self, claimed: &Path, seq: u64) -> Result<Request, ControlError> {
        let bytes = read_limited(claimed, MAX_REQUEST_SIZE).map_err(|e| match e {
            Limited::TooLarge(size) => ControlError::TooLarge {
                path: claimed.to_owned(),
                size,
                limit: MAX_REQUEST_SIZE,
                request: None,
            },
            Limited::Io(source) => ControlError::Io {
                action: "read request",
                path: claimed.to_owned(),
                source,
            },
        })?;
        let request: RequestFile = serde_json::from_slice(&bytes).map_err(|e| {
            // Recover id and op if the document is JSON at all, so the refusal reaches the
            // `dsu` waiting for it instead of leaving it to time out.
            let loose: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
            let field = |name: &str| {
                loose
                    .as_ref()
                    .and_then(|v| v.get(name))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            };
            ControlError::MalformedRequest {
                path: claimed.to_owned(),
                request: field("id"),
                op: field("op"),
                reason: e.to_string(),
            }
        })?;
        let timeout = request.timeout_ms.map(Duration::from_millis);
        let op = match request.op {
            RequestOp::Apply { file } if is_plain_name(&file) => {
                return self.claim_patch(
                    &file,
                    seq,
                    Some(request.id),
                    timeout,
                    request.allow_stale_clones,
                );
            }
            RequestOp::Apply { file } => {
                return Err(ControlError::MalformedRequest {
                    path: claimed.to_owned(),
                    request: Some(request.id),
                    op: Some("apply".to_owned()),
                    reason: format!(
                        "\"file\" is {file:?}; it must be a plain file name in the control \
                         directory other than {RESERVED:?}"
                    ),
                });
            }
            RequestOp::Revert { patch_id } => Op::Revert { patch_id, timeout },
            RequestOp::Status => Op::Status,
        };
        Ok(Request {
            id: Some(request.id),
            op,
        })
    }

    /// Moves patch `file` to `consumed/<seq>.patch` and reads it from there.
    fn claim_patch(
        &self,
        file: &str,
        seq: u64,
        id: Option<String>,
        timeout: Option<Duration>,
        allow_stale_clones: bool,
    ) -> Result<Request, ControlError> {
        let source = self.path.join(file);
        let claimed = self.consumed(seq, "patch");
        if let Err(e) = fs::rename(&source, &claimed) {
            return Err(if e.kind() == io::ErrorKind::NotFound {
                ControlError::MissingPatch {
                    path: source,
                    request: id,
                }
            } else {
                ControlError::ReadPatch {
                    path: source,
                    request: id,
                    source: e,
                }
            });
        }
        let bytes = match read_limited(&claimed, MAX_PATCH_SIZE) {
            Ok(bytes) => bytes,
            Err(Limited::TooLarge(size)) => {
                return Err(ControlError::TooLarge {
                    path: claimed,
                    size,
                    limit: MAX_PATCH_SIZE,
                    request: id,
                });
            }
            Err(Limited::Io(source)) => {
                return Err(ControlError::ReadPatch {
                    path: claimed,
                    request: id,
                    source,
                });
            }
        };
        Ok(Request {
            id,
            op: Op::Apply {
                bytes,
                file: claimed,
                timeout,
                allow_stale_clones,
            },
        })
    }
}

/// Checks that `path` is a directory owned by `owner`, not writable by group or others, in a
/// parent that nobody but its owner (`owner` or root) can rename entries of. The last
/// condition allows `/tmp` (sticky) and refuses a world-writable parent without the sticky
/// bit, where anyone could swap the directory for their own.
///
/// `path` itself is not followed if it is a symbolic link (refused as not a directory);
/// its parent is, so that `/var/run -> /run` style links keep working.
pub fn verify_dir(path: &Path, owner: u32) -> Result<(), ControlError> {
    let meta = fs::symlink_metadata(path).map_err(|source| ControlError::Inspect {
        path: path.to_owned(),
        source,
    })?;
    let file_type = meta.file_type();
    if !file_type.is_dir() {
        let found = if file_type.is_symlink() {
            "symbolic link"
        } else {
            "file"
        };
        return Err(ControlError::NotADirectory {
            path: path.to_owned(),
            found,
        });
    }
    if meta.uid() != owner {
        return Err(ControlError::WrongOwner {
            path: path.to_owned(),
            found: meta.uid(),
            expected: owner,
        });
    }
    if meta.mode() & GROUP_OTHER_WRITE != 0 {
        return Err(ControlError::InsecureMode {
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
        });
    }
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let parent_meta = fs::metadata(parent).map_err(|source| ControlError::Inspect {
        path: parent.to_owned(),
        source,
    })?;
    let parent_mode = parent_meta.mode();
    let trusted_owner = parent_meta.uid() == owner || parent_meta.uid() == 0;
    let others_can_swap = parent_mode & GROUP_OTHER_WRITE != 0 && parent_mode & STICKY == 0;
    if !trusted_owner || others_can_swap {
        return Err(ControlError::InsecureParent {
            path: path.to_owned(),
            parent: parent.to_owned(),
            owner: parent_meta.uid(),
            mode: parent_mode & 0o7777,
        });
    }
    Ok(())
}

/// Writes `dir/name` atomically: to a new temporary file (mode 0600, refusing to follow or
/// reuse anything already there) that is then renamed over `name`. With `chown`, the file is
/// given to that (uid, gid) first: `dsu` run as root uses it so that files it leaves stay
/// readable by the target process's user.
pub fn write_atomic(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    chown: Option<(u32, u32)>,
) -> Result<(), ControlError> {
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let target = dir.join(name);
    let io_error = |action, path: &Path| {
        let path = path.to_owned();
        move |source| ControlError::Io {
            action,
            path,
            source,
        }
    };
    remove_if_exists(&temp)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)
        .map_err(io_error("create", &temp))?;
    let written = file.write_all(bytes).and_then(|()| match chown {
        Some((uid, gid)) => std::os::unix::fs::fchown(&file, Some(uid), Some(gid)),
        None => Ok(()),
    });
    drop(file);
    if let Err(e) = written.and_then(|()| fs::rename(&temp, &target)) {
        let _ = fs::remove_file(&temp);
        return Err(io_error("write", &target)(e));
    }
    Ok(())
}

/// [`write_atomic`] of `value` as pretty JSON with a final newline.
pub fn write_json<T: Serialize>(
    dir: &Path,
    name: &str,
    value: &T,
    chown: Option<(u32, u32)>,
) -> Result<(), ControlError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| ControlError::Io {
        action: "serialise",
        path: dir.join(name),
        source: e.into(),
    })?;
    bytes.push(b'\n');
    write_atomic(dir, name, &bytes, chown)
}

/// The start time (clock ticks since boot) from the text of a `/proc/<pid>/stat` file: field
/// 22, counted after the `)` that closes the command name, which may itself hold spaces and
/// parentheses.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields after the name start with field 3 (state); field 22 is the 20th of them.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// True for a single normal path component that names no file the protocol itself uses.
/// The `/` test is not redundant: `components` reads `"a/"` as the single component `a`.
fn is_plain_name(file: &str) -> bool {
    let mut components = Path::new(file).components();
    matches!(
        (components.next(), components.next()),
        (Some(Component::Normal(_)), None)
    ) && !file.contains('/')
        && !RESERVED.contains(&file)
}

fn remove_if_exists(path: &Path) -> Result<(), ControlError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ControlError::Io {
            action: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Why [`read_limited`] read nothing.
#[derive(Debug)]
pub enum Limited {
    /// The file holds more than the limit (its size, or what was read past it).
    TooLarge(u64),
    /// It could not be opened or read, or is not a regular file (`InvalidInput`).
    Io(io::Error),
}

/// Reads a regular file of at most `limit` bytes from a directory another user may control:
/// never follows a symbolic link, never blocks on a FIFO, never reads past the limit. The
/// agent reads requests and patches with it, `dsu` the agent's answers.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, Limited> {
    // Non-blocking: a FIFO planted as `patch` must not hang the agent thread in `open`.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(Limited::Io)?;
    let meta = file.metadata().map_err(Limited::Io)?;
    if !meta.is_file() {
        return Err(Limited::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let size = meta.len();
    if size > limit {
        return Err(Limited::TooLarge(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // `take` bounds the read even if the file grew after the size check.
    File::take(file, limit + 1)
        .read_to_end(&mut bytes)
        .map_err(Limited::Io)?;
    if bytes.len() as u64 > limit {
        return Err(Limited::TooLarge(bytes.len() as u64));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
