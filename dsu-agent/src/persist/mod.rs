//! Kept patches: patches kept for a program, which the agent applies at install, so that a
//! process started after a rollout runs the fix too.
//!
//! `dsu apply --persist` copies a patch it applied into a directory named after the GNU
//! build id of the program's executable ([`dirs`], [`build_id`]); `dsu revert` removes it.
//! At install, before `install()` returns, the agent reads the directories of its own build
//! ([`find`]) and applies every patch there through the same engine entry as an apply request,
//! so signatures and bindings are checked exactly as for `dsu apply`.
//!
//! The directories are trusted like the control directory: a directory or file owned by
//! anyone but root and the process's effective uid, writable by group or others, or a symbolic
//! link is refused with a [`KeptError`] and never read; the agent records the refusal and
//! starts normally. When no base directory exists, finding nothing costs one failed `stat` per
//! base; the build id is computed only when one exists.

pub mod build_id;
pub mod dirs;

use std::fs::{self, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

pub use self::dirs::Bases;
use crate::control::MAX_PATCH_SIZE;

/// Mode bits that let group or others write.
const GROUP_OTHER_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// A kept patch the agent found at install, read and checked, or why it was refused.
#[derive(Debug)]
pub struct Kept {
    /// The file (or, for a refused directory, the directory).
    pub path: PathBuf,
    /// Its bytes, exactly as kept (a signature trailer included).
    pub patch: Result<Vec<u8>, KeptError>,
}

/// Why a kept patch, or a directory of them, was not read. The agent records it and goes on.
#[derive(Debug, Error)]
pub enum KeptError {
    #[error(
        "{what} {} is a symbolic link; kept patches are read only from the files and \
         directories themselves",
        .path.display()
    )]
    Symlink { what: &'static str, path: PathBuf },
    #[error("{what} {} is not a {expected}", .path.display())]
    WrongType {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error(
        "{what} {} is owned by uid {owner}, neither this process's uid {uid} nor root: \
         someone else could have put code there",
        .path.display()
    )]
    Owner {
        what: &'static str,
        path: PathBuf,
        owner: u32,
        uid: u32,
    },
    #[error(
        "{what} {} is writable by {} (mode {mode:04o}): someone else could put code there; \
         `chmod go-w` it",
        .path.display(),
        if .mode & 0o002 != 0 { "others" } else { "its group" }
    )]
    Writable {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "kept patch directory {} is inside {} (owner uid {owner}, mode {mode:04o}), which \
         someone else could replace it in",
        .path.display(), .parent.display()
    )]
    Parent {
        path: PathBuf,
        parent: PathBuf,
        owner: u32,
        mode: u32,
    },
    #[error("kept patch {} is over the limit of {limit} bytes", .path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("cannot read {what} {}: {source}", .path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

const DIR: &str = "kept patch directory";
const FILE: &str = "kept patch";

/// The kept patches of build `build_id` (called only when a base exists) under `bases`, for
/// a process of effective uid `uid`: each base in order, each directory's `.o` files in name
/// order. A directory that does not exist is skipped quietly.
pub fn find(bases: &[PathBuf], uid: u32, build_id: impl FnOnce() -> Option<String>) -> Vec<Kept> {
    let present: Vec<&PathBuf> = bases
        .iter()
        .filter(|base| fs::symlink_metadata(base).is_ok())
        .collect();
    if present.is_empty() {
        return Vec::new();
    }
    let Some(build_id) = build_id() else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    for base in present {
        let dir = dirs::build_dir(base, &build_id);
        match list(&dir, uid) {
            Ok(None) => {}
            Ok(Some(names)) => kept.extend(names.into_iter().map(|name| {
                let path = dir.join(name);
                let patch = read(&path, uid);
                Kept { path, patch }
            })),
            Err(e) => kept.push(Kept {
                path: dir,
                patch: Err(e),
            }),
        }
    }
    kept
}

/// The patch names in `dir`, sorted; `None` when it does not exist.
fn list(dir: &Path, uid: u32) -> Result<Option<Vec<String>>, KeptError> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(KeptError::Read {
                what: DIR,
                path: dir.to_owned(),
                source,
            });
        }
    };
    check_dir(dir, &meta, uid)?;
    let read_error = |source| KeptError::Read {
        what: DIR,
        path: dir.to_owned(),
        source,
    };
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(read_error)?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| dirs::is_patch_name(name))
        .collect();
    names.sort();
    Ok(Some(names))
}

/// A directory of kept patches: a directory itself (not a link), owned by root or `uid`,
/// writable by nobody else, in a parent nobody else can rename it in.
pub fn check_dir(dir: &Path, meta: &Metadata, uid: u32) -> Result<(), KeptError> {
    check_entry(DIR, dir, meta, uid)?;
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let parent_meta = fs::metadata(parent).map_err(|source| KeptError::Read {
        what: DIR,
        path: parent.to_owned(),
        source,
    })?;
    let mode = parent_meta.mode();
    let trusted_owner = parent_meta.uid() == uid || parent_meta.uid() == 0;
    let others_can_swap = mode & GROUP_OTHER_WRITE != 0 && mode & STICKY == 0;
    if !trusted_owner || others_can_swap {
        return Err(KeptError::Parent {
            path: dir.to_owned(),
            parent: parent.to_owned(),
            owner: parent_meta.uid(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// The rule for directories (`what` is [`DIR`]) and files alike: the right type, owned by
/// root or `uid`, not writable by group or others.
fn check_entry(
    what: &'static str,
    path: &Path,
    meta: &Metadata,
    uid: u32,
) -> Result<(), KeptError> {
    let file_type = meta.file_type();
    let expected = if what == DIR {
        "directory"
    } else {
        "regular file"
    };
    if file_type.is_symlink() {
        return Err(KeptError::Symlink {
            what,
            path: path.to_owned(),
        });
    }
    if (what == DIR && !file_type.is_dir()) || (what == FILE && !file_type.is_file()) {
        return Err(KeptError::WrongType {
            what,
            path: path.to_owned(),
            expected,
        });
    }
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(KeptError::Owner {
            what,
            path: path.to_owned(),
            owner: meta.uid(),
            uid,
        });
    }
    if meta.mode() & GROUP_OTHER_WRITE != 0 {
        return Err(KeptError::Writable {
            what,
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Reads one kept patch: opened without following a link (and without blocking on a FIFO),
/// checked on the opened descriptor, so the file checked is the file read.
pub fn read(path: &Path, uid: u32) -> Result<Vec<u8>, KeptError> {
    let read_error = |source| KeptError::Read {
        what: FILE,
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                KeptError::Symlink {
                    what: FILE,
                    path: path.to_owned(),
                }
            } else {
                read_error(e)
            }
        })?;
    let meta = file.metadata().map_err(read_error)?;
    check_entry(FILE, path, &meta, uid)?;
    let mut bytes = Vec::new();
    file.take(MAX_PATCH_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_PATCH_SIZE {
        return Err(KeptError::TooLarge {
            path: path.to_owned(),
            limit: MAX_PATCH_SIZE,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dsu-kept-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    fn write(path: &Path, bytes: &[u8], mode: u32) {
        fs::write(path, bytes).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn me() -> u32 {
        dsu_sys::ids::effective_uid()
    }

    #[test]
    fn patches_come_in_base_then_name_order_and_no_base_asks_for_no_build_id() {
        let root = scratch("order");
        let (a, b) = (root.join("a"), root.join("b"));
        for base in [&a, &b] {
            fs::create_dir_all(base.join("beef")).unwrap();
            fs::set_permissions(base.join("beef"), fs::Permissions::from_mode(0o700)).unwrap();
        }
        write(&a.join("beef/0002-x.o"), b"a2", 0o600);
        write(&a.join("beef/0001-y.o"), b"a1", 0o644);
        write(&a.join("beef/.0003-z.o.7.tmp"), b"half", 0o600);
        write(&a.join("beef/README"), b"notes", 0o600);
        write(&b.join("beef/0001-z.o"), b"b1", 0o600);
        let kept = find(&[a.clone(), root.join("missing"), b.clone()], me(), || {
            Some("beef".into())
        });
        let got: Vec<(PathBuf, Vec<u8>)> = kept
            .into_iter()
            .map(|k| (k.path, k.patch.unwrap()))
            .collect();
        assert_eq!(
            got,
            vec![
                (a.join("beef/0001-y.o"), b"a1".to_vec()),
                (a.join("beef/0002-x.o"), b"a2".to_vec()),
                (b.join("beef/0001-z.o"), b"b1".to_vec()),
            ]
        );
        let other_build = find(std::slice::from_ref(&a), me(), || Some("f00d".into()));
        assert!(other_build.is_empty());
        let nothing = find(&[root.join("missing")], me(), || {
            panic!("asked for a build id")
        });
        assert!(nothing.is_empty());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn an_unsafe_directory_is_refused_whole_and_an_unsafe_file_alone() {
        let root = scratch("unsafe");
        let dir = root.join("beef");
        fs::create_dir(&dir).unwrap();
        write(&dir.join("0001-a.o"), b"one", 0o664);
        write(&dir.join("0002-b.o"), b"two", 0o600);
        std::os::unix::fs::symlink(dir.join("0002-b.o"), dir.join("0003-c.o")).unwrap();
        fs::create_dir(dir.join("0004-d.o")).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
        let build = || Some("beef".to_owned());
        let kept = find(std::slice::from_ref(&root), me(), build);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].path, dir);
        let e = kept[0].patch.as_ref().unwrap_err().to_string();
        assert!(e.contains("writable by its group (mode 0770)"), "{e}");

        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let kept = find(std::slice::from_ref(&root), me(), build);
        let results: Vec<String> = kept
            .iter()
            .map(|k| match &k.patch {
                Ok(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                Err(e) => e.to_string(),
            })
            .collect();
        assert!(
            results[0].contains("0001-a.o is writable by its group"),
            "{results:?}"
        );
        assert_eq!(results[1], "two");
        assert!(
            results[2].contains("0003-c.o is a symbolic link"),
            "{results:?}"
        );
        assert!(
            results[3].contains("0004-d.o is not a regular file"),
            "{results:?}"
        );

        // Another owner: the checks compare against the uid they are given; root's files
        // pass for every uid.
        let other = read(&dir.join("0002-b.o"), me() + 1);
        if me() == 0 {
            assert!(other.is_ok(), "{other:?}");
            std::os::unix::fs::chown(dir.join("0002-b.o"), Some(65534), None).unwrap();
            let e = read(&dir.join("0002-b.o"), 0).unwrap_err().to_string();
            assert!(
                e.contains("owned by uid 65534, neither this process's uid 0"),
                "{e}"
            );
        } else {
            let e = other.unwrap_err().to_string();
            assert!(e.contains(&format!("owned by uid {}", me())), "{e}");
        }
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_directory_link_or_a_swappable_parent_is_refused() {
        let root = scratch("link");
        let real = root.join("real");
        fs::create_dir(&real).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&real, root.join("beef")).unwrap();
        let kept = find(std::slice::from_ref(&root), me(), || Some("beef".into()));
        let e = kept[0].patch.as_ref().unwrap_err().to_string();
        assert!(e.contains("beef is a symbolic link"), "{e}");

        fs::remove_file(root.join("beef")).unwrap();
        fs::rename(&real, root.join("beef")).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
        let kept = find(std::slice::from_ref(&root), me(), || Some("beef".into()));
        let e = kept[0].patch.as_ref().unwrap_err().to_string();
        assert!(e.contains("which someone else could replace it in"), "{e}");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o1777)).unwrap();
        let kept = find(std::slice::from_ref(&root), me(), || Some("beef".into()));
        assert!(kept.is_empty(), "a sticky parent is safe: {kept:?}");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_base_that_cannot_be_listed_is_reported_not_taken_for_empty() {
        // A base that is a file: its build directory cannot be looked up (ENOTDIR), which
        // is not "no directory" (only ENOENT is).
        let root = scratch("not-a-dir");
        let base = root.join("base");
        write(&base, b"not a directory", 0o600);
        let kept = find(std::slice::from_ref(&base), me(), || Some("beef".into()));
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert!(
            matches!(&kept[0].patch, Err(KeptError::Read { source, .. })
                if source.raw_os_error() == Some(libc::ENOTDIR)),
            "{kept:?}"
        );
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_kept_patch_of_the_size_limit_is_read_whole_and_one_byte_more_is_refused() {
        let root = scratch("size");
        let path = root.join("0001-big.o");
        // Sparse: no disk space, but every byte is read.
        let file = fs::File::create(&path).unwrap();
        file.set_len(MAX_PATCH_SIZE).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read(&path, me()).unwrap().len() as u64, MAX_PATCH_SIZE);
        file.set_len(MAX_PATCH_SIZE + 1).unwrap();
        assert!(
            matches!(read(&path, me()), Err(KeptError::TooLarge { limit, .. }) if limit == MAX_PATCH_SIZE)
        );
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn the_parent_is_trusted_when_root_or_the_user_owns_it_and_no_one_else_writes_it() {
        // Checked for another uid than the test's: root can give files away (CI runs as
        // root); another user cannot, and then only the parts that need no chown run.
        let user = 4242;
        let root = scratch("parent-owner");
        let parent = root.join("parent");
        let dir = parent.join("beef");
        fs::create_dir_all(&dir).unwrap();
        for d in [&parent, &dir] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let check = |uid| check_dir(&dir, &fs::symlink_metadata(&dir).unwrap(), uid);
        let refused_parent = |r: Result<(), KeptError>| match r {
            Err(KeptError::Parent { owner, mode, .. }) => (owner, mode),
            other => panic!("expected the parent refused, got {other:?}"),
        };
        if me() == 0 {
            let chown = |p: &Path, uid| std::os::unix::fs::chown(p, Some(uid), None).unwrap();
            chown(&dir, user);
            // A root-owned parent and a user-owned one are both trusted.
            check(user).unwrap();
            chown(&parent, user);
            check(user).unwrap();
            // A third user's parent is not, even with a safe mode; nor the user's own when
            // others may write it (the mode reported without the file-type bits).
            chown(&parent, user + 1);
            assert_eq!(refused_parent(check(user)), (user + 1, 0o755));
            chown(&parent, user);
            fs::set_permissions(&parent, fs::Permissions::from_mode(0o2777)).unwrap();
            assert_eq!(refused_parent(check(user)), (user, 0o2777));
        } else {
            fs::set_permissions(&parent, fs::Permissions::from_mode(0o777)).unwrap();
            assert_eq!(refused_parent(check(me())), (me(), 0o777));
        }
        let _ = fs::remove_dir_all(&root);
    }
}
