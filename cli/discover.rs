//! Finding an agent's control directory without the target's environment: through the
//! listening Unix socket among the process's open descriptors.
//!
//! `/proc/PID/fd` names each socket by inode (`socket:[N]`); `/proc/PID/net/unix` lists the
//! sockets of the process's network namespace with their inode, state and bound path. The
//! agent's is the listening one whose path ends in `/agent.sock`: its directory is the
//! control directory, as the target sees it. A path too long for `sun_path` was bound as
//! `/proc/self/fd/N/agent.sock`, N being the directory opened `O_PATH`, which
//! `/proc/PID/fd/N` names. When the target lives in another mount namespace (a container),
//! the directory is reached through `/proc/PID/root`.
//!
//! [`socket_dir`] looks at one process; [`scan`] at every process of the host this user may
//! look into, reading `/proc` once and each network namespace's socket table once (keyed on
//! the `/proc/PID/ns/net` inode), so that it stays cheap with thousands of processes.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use dsu_agent::control::socket::SOCKET_FILE;

use crate::error::CliError;
use crate::fan_out::{self, fan_out};
use crate::sys;

/// `__SO_ACCEPTCON` in the `Flags` column: a listening socket.
const LISTENING: u32 = 0x0001_0000;

/// The control directory of the agent listening in process `pid`, as this process reaches
/// it; `None` when the process has no such socket.
pub fn socket_dir(pid: u32) -> Result<Option<PathBuf>, CliError> {
    let fd_dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let inodes = socket_inodes(pid).map_err(|e| proc_error(pid, fd_dir, e))?;
    if inodes.is_empty() {
        return Ok(None);
    }
    let net_path = PathBuf::from(format!("/proc/{pid}/net/unix"));
    let table = sys::read_proc_text(&net_path).map_err(|e| proc_error(pid, net_path, e))?;
    let sockets = listening_agent_sockets(&table);
    let Some((_, bound)) = sockets.iter().find(|(inode, _)| inodes.contains(inode)) else {
        return Ok(None);
    };
    control_dir(pid, bound).map(Some)
}

/// A process with a listening agent socket, as [`scan`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub pid: u32,
    /// The control directory, as this process reaches it.
    pub dir: PathBuf,
    /// The inode of the listening socket: a `fork()`ed child shares its parent's.
    pub socket: u64,
}

/// Every process this user may look into that holds a listening agent socket, in pid order.
/// Processes that cannot be read (another user's, when not root) or that exit meanwhile are
/// left out without a word: this is a survey, not a request about one process.
pub fn scan() -> Vec<Found> {
    // Network namespace inode -> its listening agent sockets (socket inode -> bound path).
    let mut tables: HashMap<u64, HashMap<u64, String>> = HashMap::new();
    let mut candidates = Vec::new();
    for pid in all_pids() {
        let Some(namespace) = net_namespace(pid) else {
            continue;
        };
        let sockets = match tables.entry(namespace) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let Ok(table) = sys::read_proc_text(format!("/proc/{pid}/net/unix")) else {
                    continue;
                };
                entry.insert(listening_agent_sockets(&table).into_iter().collect())
            }
        };
        // A process of a namespace without agents costs one readlink.
        if !sockets.is_empty() {
            candidates.push((pid, namespace));
        }
    }
    // The descriptors of each candidate: most of the work, spread over the cores.
    fan_out(
        &candidates,
        fan_out::cores(),
        |&(pid, namespace)| find_agent_socket(pid, &tables[&namespace]),
        |_| (),
    )
    .into_iter()
    .flatten()
    .collect()
}

/// Process `pid`'s agent socket among `sockets` (the listening agent sockets of its network
/// namespace), the lowest inode if it holds several.
fn find_agent_socket(pid: u32, sockets: &HashMap<u64, String>) -> Option<Found> {
    let inodes = socket_inodes(pid).ok()?;
    let (socket, bound) = inodes
        .iter()
        .filter_map(|inode| Some((*inode, sockets.get(inode)?)))
        .min_by_key(|(inode, _)| *inode)?;
    let dir = control_dir(pid, bound).ok()?;
    Some(Found { pid, dir, socket })
}

/// The numeric entries of `/proc`: every process (thread group), in increasing order.
fn all_pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// The inode of process `pid`'s network namespace (`net:[N]`), if this user may see it.
fn net_namespace(pid: u32) -> Option<u64> {
    let link = fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    link.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The inodes of the sockets among process `pid`'s descriptors.
fn socket_inodes(pid: u32) -> io::Result<HashSet<u64>> {
    let path = format!("/proc/{pid}/fd");
    // Each link is read relative to the open directory: a full path would walk `/proc/PID/fd`
    // again for every descriptor, the larger part of a scan's time for a process with many.
    let dir = fs::File::open(&path)?;
    let mut inodes = HashSet::new();
    let mut target = [0u8; 64];
    for entry in fs::read_dir(&path)?.flatten() {
        let Ok(name) = CString::new(entry.file_name().into_vec()) else {
            continue;
        };
        // A link that fills the buffer was cut short: not a socket's, which is short.
        if let Ok(n) = sys::readlink_at(dir.as_fd(), &name, &mut target)
            && n < target.len()
            && let Ok(link) = std::str::from_utf8(&target[..n])
            && let Some(inode) = socket_inode(link)
        {
            inodes.insert(inode);
        }
    }
    Ok(inodes)
}

/// The control directory of an agent of process `pid` whose socket is bound at `bound`, as
/// this process reaches it.
fn control_dir(pid: u32, bound: &str) -> Result<PathBuf, CliError> {
    let dir = match fd_relative_dir(bound) {
        Some(fd) => {
            let link = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
            fs::read_link(&link).map_err(|e| proc_error(pid, link, e))?
        }
        None => {
            let dir = Path::new(bound)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            if dir.is_absolute() {
                dir
            } else {
                let cwd = PathBuf::from(format!("/proc/{pid}/cwd"));
                fs::read_link(&cwd)
                    .map_err(|e| proc_error(pid, cwd, e))?
                    .join(dir)
            }
        }
    };
    Ok(reachable(pid, &dir))
}

/// `dir` as the target sees it, made reachable from here: through `/proc/PID/root` when the
/// target is in another mount namespace.
pub fn reachable(pid: u32, dir: &Path) -> PathBuf {
    if same_mount_namespace(pid) || !dir.is_absolute() {
        return dir.to_owned();
    }
    let relative = dir.strip_prefix("/").unwrap_or(dir);
    PathBuf::from(format!("/proc/{pid}/root")).join(relative)
}

/// Compares `/proc/self/ns/mnt` with the target's; unknown (no permission) counts as the same.
fn same_mount_namespace(pid: u32) -> bool {
    // Read once: a host-wide command asks for every process.
    static MINE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    let mine = MINE.get_or_init(|| fs::read_link("/proc/self/ns/mnt").ok());
    let theirs = fs::read_link(format!("/proc/{pid}/ns/mnt"));
    match (mine, theirs) {
        (Some(mine), Ok(theirs)) => *mine == theirs,
        _ => true,
    }
}

fn proc_error(pid: u32, path: PathBuf, e: io::Error) -> CliError {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ESRCH) => CliError::NoProcess { pid },
        _ => CliError::proc(path, e),
    }
}

/// The inode of a descriptor link `socket:[12345]`.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The listening sockets whose path ends in `/agent.sock`, in the order of the table, as
/// (inode, bound path). Columns: `Num RefCount Protocol Flags Type St Inode Path`, all hex but
/// the inode.
fn listening_agent_sockets(table: &str) -> Vec<(u64, String)> {
    let suffix = format!("/{SOCKET_FILE}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(fields.get(3)?, 16).ok()?;
            let inode: u64 = fields.get(6)?.parse().ok()?;
            // A path with spaces spans the remaining fields.
            let path = fields.get(7..)?.join(" ");
            // An abstract socket (`@name`) has no directory, whatever its name says.
            let bound = !path.starts_with('@') && path.ends_with(&suffix);
            (flags & LISTENING != 0 && bound).then_some((inode, path))
        })
        .collect()
}

/// N for a path bound as `/proc/self/fd/N/agent.sock`.
fn fd_relative_dir(bound: &str) -> Option<u32> {
    bound
        .strip_prefix("/proc/self/fd/")?
        .strip_suffix(&format!("/{SOCKET_FILE}"))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "Num       RefCount Protocol Flags    Type St Inode Path\n\
        0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/user/1000/dsu/77/agent.sock\n\
        0000000000000000: 00000002 00000000 00000000 0001 03 4243 /run/user/1000/dsu/77/agent.sock\n\
        0000000000000000: 00000002 00000000 00010000 0001 01 4244 /tmp/other.sock\n\
        0000000000000000: 00000002 00000000 00010000 0001 01 4245 /proc/self/fd/9/agent.sock\n\
        0000000000000000: 00000002 00000000 00010000 0001 01 4246 @/run/x/agent.sock\n";

    #[test]
    fn only_listening_agent_sockets_with_a_directory_are_listed() {
        // Connected (not listening), foreign and abstract names do not count.
        assert_eq!(
            listening_agent_sockets(TABLE),
            [
                (4242, "/run/user/1000/dsu/77/agent.sock".to_owned()),
                (4245, "/proc/self/fd/9/agent.sock".to_owned()),
            ]
        );
        assert_eq!(fd_relative_dir("/proc/self/fd/9/agent.sock"), Some(9));
        assert_eq!(fd_relative_dir("/run/x/agent.sock"), None);
    }

    #[test]
    fn namespace_links_name_inodes() {
        let me = std::process::id();
        assert!(net_namespace(me).is_some());
        assert_eq!(net_namespace(u32::MAX), None);
    }

    #[test]
    fn the_sockets_among_a_process_descriptors_are_found() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let inode = |fd: i32| fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
        let found = socket_inodes(std::process::id()).unwrap();
        assert!(found.contains(&inode(a.as_raw_fd())), "{found:?}");
        assert!(found.contains(&inode(b.as_raw_fd())), "{found:?}");
        assert!(socket_inodes(u32::MAX).is_err());
    }

    #[test]
    fn descriptor_links_name_socket_inodes() {
        assert_eq!(socket_inode("socket:[123]"), Some(123));
        assert_eq!(socket_inode("pipe:[123]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }
}
