//! Kept patches: `dsu apply --persist` copies a patch it applied into the directory of the
//! program's build, where the agent of every process of that build started later finds it
//! at install; `dsu revert` removes it again. The directories, names and checks are the
//! agent's (`dsu_agent::persist`); `docs/cli.md` says where the files go.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use dsu_agent::persist::{self, Bases, KeptError, dirs};

use crate::error::CliError;
use crate::output::print_line;

/// Why a patch could not be kept or forgotten. Exit 1: the process was changed (or, before
/// an apply, nothing was), but the kept copy is not what was asked.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(
        "process {pid} runs {}, which has no GNU build id; kept patches are filed by build \
         id: link the program with -Wl,--build-id (nothing was applied)",
        .exe.display()
    )]
    NoBuildId { pid: u32, exe: PathBuf },
    #[error("cannot read the build id of {}: {source}", .exe.display())]
    BuildId {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kept patches are turned off (DSU_PATCH_DIR=off); nothing was applied")]
    Off,
    #[error(
        "no directory to keep patches in: neither XDG_DATA_HOME nor HOME is set and \
         /etc/passwd has no home for uid {uid}; set DSU_PATCH_DIR (nothing was applied)"
    )]
    NoHome { uid: u32 },
    #[error("{0}; the agent would refuse to read it ({1})")]
    Refused(KeptError, &'static str),
    #[error("cannot create {}: {source}", .path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} holds {} kept patches already; remove some (the agent applies them in name order)",
        .path.display(), dirs::MAX_SEQ
    )]
    Full { path: PathBuf },
    #[error(
        "applied patch {patch_id} in process {pid}, but could not keep it: {reason}; processes \
         started from now on run without it"
    )]
    Keep {
        pid: u32,
        patch_id: u64,
        reason: String,
    },
    #[error(
        "reverted the patch in process {pid}, but could not remove the kept copy {}: {reason}; \
         processes started from now on still apply it: remove it (as its owner or root)",
        .path.display()
    )]
    Forget {
        pid: u32,
        path: PathBuf,
        reason: String,
    },
}

/// A patch kept for a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptFile {
    pub path: PathBuf,
    /// False when the same bytes were kept already (under `path`).
    pub new: bool,
}

/// The GNU build id (lowercase hex) of the executable process `pid` runs, read from
/// `/proc/PID/exe`: the running file even when an upgrade has replaced it on disk.
pub fn build_id_of_process(pid: u32) -> Result<String, CliError> {
    let link = PathBuf::from(format!("/proc/{pid}/exe"));
    let file = fs::File::open(&link).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CliError::NoProcess { pid }
        } else {
            CliError::proc(link.clone(), e)
        }
    })?;
    let exe = fs::read_link(&link).unwrap_or(link);
    match persist::build_id::of_file(&file) {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err(PersistError::NoBuildId { pid, exe }.into()),
        Err(source) => Err(PersistError::BuildId { exe, source }.into()),
    }
}

/// Where this `dsu` keeps patches (`Bases::for_keeping`): `$DSU_PATCH_DIR`, else the
/// system-wide base for root, else the user's.
pub fn base() -> Result<PathBuf, PersistError> {
    let uid = crate::sys::effective_uid();
    let bases = Bases::of_process();
    bases.for_keeping(uid).ok_or(match bases {
        Bases::Off => PersistError::Off,
        _ => PersistError::NoHome { uid },
    })
}

/// `dsu apply --persist`, before the apply: the target's build id, and a place to keep the
/// patch (a directory of the build that exists must pass the agent's checks), so that a patch
/// that could not be kept is not applied either.
pub fn before_apply(pid: u32) -> Result<String, CliError> {
    let build_id = build_id_of_process(pid)?;
    check_place(&build_id)?;
    Ok(build_id)
}

/// Whether a patch for `build_id` can be kept: a base to keep it in, and the build's
/// directory, when it exists, one the agent would read.
pub fn check_place(build_id: &str) -> Result<(), CliError> {
    let dir = dirs::build_dir(&base()?, build_id);
    if let Ok(meta) = fs::symlink_metadata(&dir) {
        let uid = crate::sys::effective_uid();
        persist::check_dir(&dir, &meta, uid)
            .map_err(|e| PersistError::Refused(e, "nothing was applied"))?;
    }
    Ok(())
}

/// Whether any base this `dsu` reads exists: when none does, nothing is kept anywhere.
pub fn anything_kept() -> bool {
    Bases::of_process().list().iter().any(|base| base.exists())
}

/// `dsu apply --persist`, once patch `patch_id` is applied in process `pid`: keeps `bytes`
/// for `build_id` and says where.
pub fn after_apply(pid: u32, patch_id: u64, bytes: &[u8], build_id: &str) -> Result<(), CliError> {
    let kept = keep(bytes, build_id).map_err(|e| PersistError::Keep {
        pid,
        patch_id,
        reason: e.one_line(),
    })?;
    let change = KeptChange {
        build_id: build_id.to_owned(),
        path: kept.path,
        action: if kept.new { "kept" } else { "already kept" },
    };
    print_line(change.line());
    Ok(())
}

/// What `--persist` (apply) or a revert did to the patches kept for a build.
#[derive(Debug, serde::Serialize)]
pub struct KeptChange {
    pub build_id: String,
    pub path: PathBuf,
    /// `kept`, `already kept` or `removed`.
    pub action: &'static str,
}

impl KeptChange {
    /// The line `dsu` prints for it.
    pub fn line(&self) -> String {
        match self.action {
            "removed" => format!(
                "removed kept patch {}: processes of build {} started from now on run without it",
                self.path.display(),
                self.build_id
            ),
            action => format!(
                "{action} as {} for build {}: processes of this build started from now on apply \
                 it at start-up",
                self.path.display(),
                self.build_id
            ),
        }
    }
}

/// Keeps the patch `bytes` (exactly, any signature trailer included) for build `build_id`
/// under [`base`], unless the same bytes are kept there already: written to a hidden
/// temporary name the agent ignores, then renamed to `NNNN-<sha256 prefix>.o`. Directories
/// are created mode 0700 (0755 for root, whose kept patches every user's processes read),
/// files 0600 (0644).
pub fn keep(bytes: &[u8], build_id: &str) -> Result<KeptFile, CliError> {
    let uid = crate::sys::effective_uid();
    let (dir_mode, file_mode) = if uid == 0 {
        (0o755, 0o644)
    } else {
        (0o700, 0o600)
    };
    let dir = dirs::build_dir(&base()?, build_id);
    create_dirs(&dir, dir_mode)?;
    let meta = fs::symlink_metadata(&dir).map_err(|source| PersistError::Create {
        path: dir.clone(),
        source,
    })?;
    persist::check_dir(&dir, &meta, uid).map_err(|e| PersistError::Refused(e, "not kept"))?;
    let sha256 = hex_sha256(bytes);
    let names = patch_names(&dir)?;
    if let Some(same) = names
        .iter()
        .map(|name| dir.join(name))
        .find(|path| persist::read(path, uid).is_ok_and(|b| hex_sha256(&b) == sha256))
    {
        return Ok(KeptFile {
            path: same,
            new: false,
        });
    }
    let seq = dirs::next_seq(names.iter().map(String::as_str));
    if seq > dirs::MAX_SEQ {
        return Err(PersistError::Full { path: dir }.into());
    }
    let path = dir.join(dirs::patch_name(seq, &sha256));
    crate::patch::write_file("kept patch", &path, bytes, file_mode, true)?;
    Ok(KeptFile { path, new: true })
}

/// `dsu revert`, once the patch with SHA-256 `sha256` is reverted in process `pid`: removes
/// its kept copies for the process's build and says so.
pub fn after_revert(pid: u32, sha256: &str) -> Result<(), CliError> {
    if !anything_kept() {
        return Ok(());
    }
    let build_id = match build_id_of_process(pid) {
        Ok(id) => id,
        // Nothing can be kept for a program without a build id.
        Err(CliError::Persist(PersistError::NoBuildId { .. })) => return Ok(()),
        // The revert happened; only the kept copies are in doubt.
        Err(e) => {
            eprintln!(
                "dsu: warning: {}; kept copies of the reverted patch, if any, stay",
                e.one_line()
            );
            return Ok(());
        }
    };
    for path in forget(sha256, &build_id).map_err(|(path, e)| PersistError::Forget {
        pid,
        path,
        reason: e.to_string(),
    })? {
        let change = KeptChange {
            build_id: build_id.clone(),
            path,
            action: "removed",
        };
        print_line(change.line());
    }
    Ok(())
}

/// Removes every kept copy of the patch with SHA-256 `sha256` for build `build_id`, in each
/// base this `dsu` reads (`$DSU_PATCH_DIR`, or the system-wide base and the user's); returns
/// what it removed. A directory left empty goes too.
pub fn forget(sha256: &str, build_id: &str) -> Result<Vec<PathBuf>, (PathBuf, io::Error)> {
    let uid = crate::sys::effective_uid();
    let mut removed = Vec::new();
    for base in Bases::of_process().list() {
        let dir = dirs::build_dir(&base, build_id);
        let Ok(names) = patch_names(&dir) else {
            continue;
        };
        let before = removed.len();
        for path in names.iter().map(|name| dir.join(name)) {
            // A file the agent would not read is not a kept patch of this user's.
            if persist::read(&path, uid).is_ok_and(|b| hex_sha256(&b) == sha256) {
                fs::remove_file(&path).map_err(|e| (path.clone(), e))?;
                removed.push(path);
            }
        }
        if removed.len() > before {
            let _ = fs::remove_dir(&dir); // only when empty
        }
    }
    Ok(removed)
}

/// The names of the kept patches in `dir`, sorted.
fn patch_names(dir: &Path) -> Result<Vec<String>, CliError> {
    let entries = fs::read_dir(dir).map_err(|e| CliError::File {
        what: "kept patch directory",
        path: dir.to_owned(),
        reason: e.to_string(),
    })?;
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| dirs::is_patch_name(name))
        .collect();
    names.sort();
    Ok(names)
}

/// Creates `dir` and its missing parents with `mode` exactly (whatever the umask): a
/// system-wide directory must be readable by every user's processes.
fn create_dirs(dir: &Path, mode: u32) -> Result<(), PersistError> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && fs::symlink_metadata(p).is_err())
        .collect();
    for path in missing.into_iter().rev() {
        let created = fs::DirBuilder::new()
            .mode(mode)
            .create(path)
            .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(mode)));
        match created {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(PersistError::Create {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// SHA-256 in hex, as the agent records a patch's hash (`code_hash` is that function).
fn hex_sha256(bytes: &[u8]) -> String {
    dsu_agent::trust::expect::code_hash(bytes)
}
