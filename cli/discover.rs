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

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use dsu_agent::control::socket::SOCKET_FILE;

use crate::error::CliError;

/// `__SO_ACCEPTCON` in the `Flags` column: a listening socket.
const LISTENING: u32 = 0x0001_0000;

/// The control directory of the agent listening in process `pid`, as this process reaches
/// it; `None` when the process has no such socket.
pub fn socket_dir(pid: u32) -> Result<Option<PathBuf>, CliError> {
    let fd_dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let entries = fs::read_dir(&fd_dir).map_err(|e| proc_error(pid, fd_dir.clone(), e))?;
    let mut inodes = HashSet::new();
    for entry in entries.flatten() {
        if let Ok(target) = fs::read_link(entry.path())
            && let Some(inode) = socket_inode(&target.to_string_lossy())
        {
            inodes.insert(inode);
        }
    }
    if inodes.is_empty() {
        return Ok(None);
    }
    let net_path = PathBuf::from(format!("/proc/{pid}/net/unix"));
    let table = fs::read_to_string(&net_path).map_err(|e| proc_error(pid, net_path, e))?;
    let Some(bound) = listening_agent_socket(&table, &inodes) else {
        return Ok(None);
    };
    let dir = match fd_relative_dir(&bound) {
        Some(fd) => {
            let link = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
            fs::read_link(&link).map_err(|e| proc_error(pid, link, e))?
        }
        None => {
            let dir = Path::new(&bound)
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
    Ok(Some(reachable(pid, &dir)))
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
    let mine = fs::read_link("/proc/self/ns/mnt");
    let theirs = fs::read_link(format!("/proc/{pid}/ns/mnt"));
    match (mine, theirs) {
        (Ok(mine), Ok(theirs)) => mine == theirs,
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

/// The bound path of the listening socket among `inodes` whose name is `agent.sock`.
/// Columns: `Num RefCount Protocol Flags Type St Inode Path`, all hex but the inode.
fn listening_agent_socket(table: &str, inodes: &HashSet<u64>) -> Option<String> {
    let suffix = format!("/{SOCKET_FILE}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = u32::from_str_radix(fields.get(3)?, 16).ok()?;
        let inode: u64 = fields.get(6)?.parse().ok()?;
        // A path with spaces spans the remaining fields.
        let path = fields.get(7..)?.join(" ");
        // An abstract socket (`@name`) has no directory, whatever its name says.
        let bound = !path.starts_with('@') && path.ends_with(&suffix);
        (flags & LISTENING != 0 && inodes.contains(&inode) && bound).then_some(path)
    })
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
    fn the_listening_agent_socket_is_found_by_inode() {
        let inodes = |list: &[u64]| list.iter().copied().collect::<HashSet<u64>>();
        assert_eq!(
            listening_agent_socket(TABLE, &inodes(&[4243, 4242])).as_deref(),
            Some("/run/user/1000/dsu/77/agent.sock")
        );
        // Connected (not listening), foreign and abstract names do not count.
        assert_eq!(
            listening_agent_socket(TABLE, &inodes(&[4243, 4244, 4246])),
            None
        );
        let long = listening_agent_socket(TABLE, &inodes(&[4245])).unwrap();
        assert_eq!(fd_relative_dir(&long), Some(9));
        assert_eq!(fd_relative_dir("/run/x/agent.sock"), None);
    }

    #[test]
    fn descriptor_links_name_socket_inodes() {
        assert_eq!(socket_inode("socket:[123]"), Some(123));
        assert_eq!(socket_inode("pipe:[123]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }
}
