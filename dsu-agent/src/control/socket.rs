//! The control socket: `agent.sock` in the control directory, where `dsu` sends one request
//! per connection and reads the answer, with no signal and no file polling.
//!
//! Framing (protocol 1, `docs/control-protocol.md`):
//!
//! - client to agent: one line of JSON, a [`RequestFile`] (for `apply` with `patch_len`, the
//!   number of patch bytes that follow the line), then the patch bytes;
//! - agent to client: `{"taken":<seq>}` once it has read the whole request and is about to act
//!   on it, then one line of JSON, the [`Outcome`]; then it closes.
//!
//! A refusal before the request was taken (a peer of another user, a malformed header) is a
//! single [`Outcome`] line. A client that gives up closes or shuts down its end: if the agent
//! then cannot write `taken`, it drops the request unread, so "no `taken` line" means "nothing
//! happened".
//!
//! Only the process's own effective uid and root may talk to the agent: the kernel's record of
//! the peer (`SO_PEERCRED`) decides, whatever the file's mode. The agent reads a request with
//! a deadline ([`READ_DEADLINE`]) and bounded sizes, so a slow or hostile client cannot hold
//! the agent thread for long.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{MAX_PATCH_SIZE, MAX_REQUEST_SIZE, Op, Request, RequestFile, RequestOp};
use crate::report::{Outcome, Status};

/// The socket's name in the control directory.
pub const SOCKET_FILE: &str = "agent.sock";

/// How long the agent waits for a client to send its whole request.
pub const READ_DEADLINE: Duration = Duration::from_secs(2);

/// How long the agent waits for a client to take its answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest path `bind(2)` and `connect(2)` take (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The agent's first line on a request it is about to carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    /// The request's sequence number (the `seq` of its [`Outcome`]).
    pub taken: u64,
}

/// Why the socket could not be set up or a connection was not served.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot {action} control socket {}: {source}", .path.display())]
    Setup {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} exists and is not a socket; remove it or choose another DSU_CONTROL_DIR",
        .path.display()
    )]
    NotASocket { path: PathBuf },
    #[error(
        "uid {peer} may not talk to the dsu agent of process {pid}, which runs as uid {owner}; \
         run dsu as uid {owner} or as root"
    )]
    Peer { peer: u32, owner: u32, pid: u32 },
    #[error("cannot read the request: {0}")]
    Read(#[source] io::Error),
    #[error("the request line is over the limit of {MAX_REQUEST_SIZE} bytes")]
    HeaderTooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("patch_len {len} is over the limit of {MAX_PATCH_SIZE} bytes")]
    PatchTooLarge { len: u64 },
    #[error("the client sent no complete request within {} s", READ_DEADLINE.as_secs())]
    Slow,
    #[error(transparent)]
    Directory(#[from] super::ControlError),
}

impl SocketError {
    /// The uid of a peer refused for its credentials.
    pub fn peer_uid(&self) -> Option<u32> {
        match self {
            SocketError::Peer { peer, .. } => Some(*peer),
            _ => None,
        }
    }

    /// The one-line answer to a connection refused before its request was taken.
    pub fn outcome(&self, request: Option<&RequestFile>) -> Outcome {
        Outcome::new(
            0,
            request.map(|r| r.id.clone()),
            request.map_or("unknown", |r| op_name(&r.op)).to_owned(),
            Status::Refused,
            Some(self.to_string()),
        )
    }
}

fn op_name(op: &RequestOp) -> &'static str {
    match op {
        RequestOp::Apply { .. } => "apply",
        RequestOp::Revert { .. } => "revert",
        RequestOp::Status => "status",
    }
}

/// The listening socket of an agent.
#[derive(Debug)]
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
    /// The control directory opened `O_PATH`, when its path is too long to bind directly:
    /// the socket is then bound as `/proc/self/fd/<fd>/agent.sock`, and `dsu` finds the
    /// directory again through `/proc/<pid>/fd/<fd>`. Kept open for the life of the socket.
    _dir: Option<File>,
}

impl Listener {
    /// Creates `dir/agent.sock` (mode 0600), replacing a socket file left by an earlier
    /// process. Anything else by that name is refused.
    pub fn bind(dir: &Path) -> Result<Listener, SocketError> {
        let path = dir.join(SOCKET_FILE);
        let setup = |action, source| SocketError::Setup {
            action,
            path: path.clone(),
            source,
        };
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() => {
                fs::remove_file(&path).map_err(|e| setup("replace stale", e))?;
            }
            Ok(_) => return Err(SocketError::NotASocket { path }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(setup("inspect", e)),
        }
        let (listener, dir_fd) = if path.as_os_str().len() <= MAX_SOCKET_PATH {
            (
                UnixListener::bind(&path).map_err(|e| setup("bind", e))?,
                None,
            )
        } else {
            let dir_fd = open_dir_path(dir).map_err(|e| setup("open the directory of", e))?;
            let short = fd_path(&dir_fd);
            (
                UnixListener::bind(short).map_err(|e| setup("bind", e))?,
                Some(dir_fd),
            )
        };
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .map_err(|e| setup("chmod", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| setup("configure", e))?;
        Ok(Listener {
            listener,
            path,
            _dir: dir_fd,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next pending connection, `None` when there is none.
    pub fn accept(&self) -> io::Result<Option<Client>> {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
                    return Ok(Some(Client { stream }));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The client went away before it was accepted: look at the next one.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

/// A request read from the socket.
#[derive(Debug)]
pub struct SocketRequest {
    pub header: RequestFile,
    /// The patch bytes of an `apply`.
    pub patch: Option<Vec<u8>>,
}

impl SocketRequest {
    /// The request for the engine; `patch_file` is where an apply's patch will be kept
    /// (`consumed/<seq>.patch`), the name reports give it.
    pub fn into_request(self, patch_file: PathBuf) -> Request {
        let timeout = self.header.timeout_ms.map(Duration::from_millis);
        let op = match self.header.op {
            RequestOp::Apply { .. } => Op::Apply {
                bytes: self.patch.unwrap_or_default(),
                file: patch_file,
                timeout,
                allow_stale_clones: self.header.allow_stale_clones,
            },
            RequestOp::Revert { patch_id } => Op::Revert { patch_id, timeout },
            RequestOp::Status => Op::Status,
        };
        Request {
            id: Some(self.header.id),
            op,
        }
    }
}

/// One accepted connection, agent side.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Refuses a peer that is neither `owner` nor root. The kernel recorded the peer's
    /// credentials when it connected; nothing the client sends can change them.
    pub fn check_peer(&self, owner: u32) -> Result<u32, SocketError> {
        let cred = dsu_sys::net::peer_cred(self.stream.as_fd()).map_err(SocketError::Read)?;
        if cred.uid == owner || cred.uid == 0 {
            return Ok(cred.uid);
        }
        Err(SocketError::Peer {
            peer: cred.uid,
            owner,
            pid: std::process::id(),
        })
    }

    /// Reads the header line and, for an apply, the patch, within [`READ_DEADLINE`].
    /// `Ok(None)`: the client closed without sending anything (a liveness probe).
    pub fn read_request(&mut self) -> Result<Option<SocketRequest>, SocketError> {
        let deadline = Instant::now() + READ_DEADLINE;
        let mut reader = BufReader::new(Deadline {
            stream: &self.stream,
            deadline,
        });
        let mut line = Vec::new();
        (&mut reader)
            .take(MAX_REQUEST_SIZE + 1)
            .read_until(b'\n', &mut line)
            .map_err(read_error)?;
        if line.is_empty() {
            return Ok(None);
        }
        if line.last() != Some(&b'\n') {
            return Err(if line.len() as u64 > MAX_REQUEST_SIZE {
                SocketError::HeaderTooLarge
            } else {
                SocketError::Read(io::ErrorKind::UnexpectedEof.into())
            });
        }
        let header: RequestFile =
            serde_json::from_slice(&line).map_err(|e| SocketError::Malformed(e.to_string()))?;
        let patch = match (&header.op, header.patch_len) {
            (RequestOp::Apply { .. }, Some(len)) if len > MAX_PATCH_SIZE => {
                return Err(SocketError::PatchTooLarge { len });
            }
            (RequestOp::Apply { .. }, Some(len)) => {
                let mut bytes = vec![0; len as usize];
                reader.read_exact(&mut bytes).map_err(read_error)?;
                Some(bytes)
            }
            (RequestOp::Apply { .. }, None) => {
                return Err(SocketError::Malformed(
                    "an apply over the socket needs \"patch_len\"".to_owned(),
                ));
            }
            _ => None,
        };
        Ok(Some(SocketRequest { header, patch }))
    }

    /// Tells the client the request is taken. An error means the client has gone (or shut
    /// its end): the request must then be dropped, not carried out.
    pub fn take(&self, seq: u64) -> io::Result<()> {
        self.send_line(&Taken { taken: seq })
    }

    /// Writes the answer. The connection closes when the client is dropped.
    pub fn answer(&self, outcome: &Outcome) -> io::Result<()> {
        self.send_line(outcome)
    }

    fn send_line<T: Serialize>(&self, value: &T) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(value)?;
        bytes.push(b'\n');
        dsu_sys::net::send_all(self.stream.as_fd(), &bytes)
    }
}

fn read_error(e: io::Error) -> SocketError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => SocketError::Slow,
        _ => SocketError::Read(e),
    }
}

/// A reader that fails with `TimedOut` once `deadline` has passed, however the client
/// trickles its bytes.
struct Deadline<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// Connects to the socket in `dir`, client side. A path too long for `sun_path` is reached
/// through the directory opened `O_PATH` (`/proc/self/fd/<fd>/agent.sock`).
pub fn connect(dir: &Path) -> io::Result<UnixStream> {
    let path = dir.join(SOCKET_FILE);
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return UnixStream::connect(&path);
    }
    let dir_fd = open_dir_path(dir)?;
    UnixStream::connect(fd_path(&dir_fd))
}

/// Sends a request (header line, then the patch), client side.
pub fn send_request(
    stream: &UnixStream,
    header: &RequestFile,
    patch: Option<&[u8]>,
) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(header)?;
    bytes.push(b'\n');
    if let Some(patch) = patch {
        bytes.extend_from_slice(patch);
    }
    dsu_sys::net::send_all(stream.as_fd(), &bytes)
}

/// One line from the agent, client side.
#[derive(Debug)]
pub enum Reply {
    Taken(u64),
    Answer(Box<Outcome>),
}

impl Reply {
    /// Parses one line the agent wrote.
    pub fn parse(line: &[u8]) -> Result<Reply, serde_json::Error> {
        if let Ok(taken) = serde_json::from_slice::<Taken>(line) {
            return Ok(Reply::Taken(taken.taken));
        }
        serde_json::from_slice::<Outcome>(line).map(|o| Reply::Answer(Box::new(o)))
    }
}

fn open_dir_path(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)
}

fn fd_path(dir: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{SOCKET_FILE}", dir.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A fresh directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let path =
                std::env::temp_dir().join(format!("dsu-socket-test-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A client end and the agent's end of a fresh connection.
    fn connection() -> (UnixStream, Client) {
        let (client, agent) = UnixStream::pair().unwrap();
        (client, Client { stream: agent })
    }

    fn header(op: RequestOp, patch_len: Option<u64>) -> RequestFile {
        RequestFile {
            id: "t-1".into(),
            op,
            timeout_ms: Some(250),
            patch_len,
            allow_stale_clones: false,
        }
    }

    #[test]
    fn replies_parse_as_taken_or_outcome() {
        assert!(matches!(
            Reply::parse(br#"{"taken":3}"#),
            Ok(Reply::Taken(3))
        ));
        let refusal = SocketError::HeaderTooLarge.outcome(None);
        let line = serde_json::to_vec(&refusal).unwrap();
        match Reply::parse(&line) {
            Ok(Reply::Answer(o)) => assert_eq!(o.outcome, Status::Refused),
            other => panic!("{other:?}"),
        }
        assert!(Reply::parse(b"nonsense").is_err());
    }

    #[test]
    fn an_apply_arrives_with_its_patch_and_becomes_a_request() {
        let (client, mut agent) = connection();
        let apply = header(
            RequestOp::Apply {
                file: "fix.o".into(),
            },
            Some(5),
        );
        send_request(&client, &apply, Some(b"\x7fELF!")).unwrap();
        let request = agent.read_request().unwrap().unwrap();
        assert_eq!(request.header, apply);
        assert_eq!(request.patch.as_deref(), Some(&b"\x7fELF!"[..]));
        let request = request.into_request(PathBuf::from("consumed/4.patch"));
        assert_eq!(request.id.as_deref(), Some("t-1"));
        assert_eq!(
            request.op,
            Op::Apply {
                bytes: b"\x7fELF!".to_vec(),
                file: PathBuf::from("consumed/4.patch"),
                timeout: Some(Duration::from_millis(250)),
                allow_stale_clones: false,
            }
        );
        agent.take(4).unwrap();
        agent
            .answer(&SocketError::Slow.outcome(Some(&apply)))
            .unwrap();
        drop(agent);
        let mut text = String::new();
        (&client).read_to_string(&mut text).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(matches!(
            Reply::parse(lines[0].as_bytes()),
            Ok(Reply::Taken(4))
        ));
        assert!(matches!(
            Reply::parse(lines[1].as_bytes()),
            Ok(Reply::Answer(o)) if o.request.as_deref() == Some("t-1")
        ));
    }

    #[test]
    fn a_closed_connection_without_a_request_is_no_request() {
        let (client, mut agent) = connection();
        drop(client);
        assert!(agent.read_request().unwrap().is_none());
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let (mut client, mut agent) = connection();
        client.write_all(b"{not json}\n").unwrap();
        assert!(matches!(
            agent.read_request(),
            Err(SocketError::Malformed(_))
        ));

        let (client, mut agent) = connection();
        let no_len = header(RequestOp::Apply { file: "f".into() }, None);
        send_request(&client, &no_len, None).unwrap();
        assert!(matches!(
            agent.read_request(),
            Err(SocketError::Malformed(reason)) if reason.contains("patch_len")
        ));

        let (client, mut agent) = connection();
        let huge = header(
            RequestOp::Apply { file: "f".into() },
            Some(MAX_PATCH_SIZE + 1),
        );
        send_request(&client, &huge, None).unwrap();
        assert!(matches!(
            agent.read_request(),
            Err(SocketError::PatchTooLarge { .. })
        ));

        let (mut client, mut agent) = connection();
        let writer = std::thread::spawn(move || {
            let line = vec![b'x'; MAX_REQUEST_SIZE as usize + 10];
            let _ = client.write_all(&line);
            client
        });
        assert!(matches!(
            agent.read_request(),
            Err(SocketError::HeaderTooLarge)
        ));
        drop(agent);
        drop(writer.join().unwrap());
    }

    #[test]
    fn a_client_that_sends_part_of_its_request_is_given_up_on() {
        let (mut client, mut agent) = connection();
        client.write_all(b"{\"id\":").unwrap();
        assert!(matches!(agent.read_request(), Err(SocketError::Slow)));
    }

    #[test]
    fn the_peer_of_our_own_uid_is_accepted() {
        let (_client, agent) = connection();
        agent.check_peer(dsu_sys::ids::effective_uid()).unwrap();
    }

    #[test]
    fn binding_replaces_a_stale_socket_and_refuses_anything_else() {
        let scratch = Scratch::new("bind");
        let first = Listener::bind(&scratch.0).unwrap();
        drop(first); // leaves the socket file, as a process that died would
        let second = Listener::bind(&scratch.0).unwrap();
        let mode = fs::metadata(second.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(connect(&scratch.0).is_ok());
        drop(second);

        fs::remove_file(scratch.0.join(SOCKET_FILE)).unwrap();
        fs::write(scratch.0.join(SOCKET_FILE), b"not a socket").unwrap();
        assert!(matches!(
            Listener::bind(&scratch.0),
            Err(SocketError::NotASocket { .. })
        ));
    }

    #[test]
    fn a_path_longer_than_sun_path_is_bound_and_reached_through_the_directory() {
        let scratch = Scratch::new("long");
        let dir = scratch.0.join("x".repeat(120));
        fs::create_dir_all(&dir).unwrap();
        let listener = Listener::bind(&dir).unwrap();
        assert!(listener.path().as_os_str().len() > MAX_SOCKET_PATH);
        let client = connect(&dir).unwrap();
        drop(client);
        assert!(listener.accept().unwrap().is_some());
    }
}
