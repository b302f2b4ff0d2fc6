//! Where kept patches live, and how `dsu` names them.
//!
//! A kept patch is a file `<base>/<build id>/<name>.o`. The bases, in the order the agent
//! applies them:
//!
//! 1. `$DSU_PATCH_DIR` alone when it is set (`off`: no kept patches at all);
//! 2. else the system-wide base [`SYSTEM_DIR`], then the user's: `$XDG_DATA_HOME/dsu/patches`,
//!    else `$HOME/.local/share/dsu/patches`, else the home directory `/etc/passwd` gives the
//!    process's effective uid.
//!
//! The home directory is read from `/etc/passwd` directly, not through `getpwuid`: the agent
//! runs in an `LD_PRELOAD` constructor, where `getpwuid` would load NSS modules (and may ask
//! a directory server over the network) before the program's `main`. A user known only to such
//! a service has no per-user directory unless `HOME` or `XDG_DATA_HOME` names it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The system-wide base: root's, read by every process.
pub const SYSTEM_DIR: &str = "/var/lib/dsu/patches";
/// The variable that replaces both bases (tests, or a program with a directory of its own).
pub const ENV_VAR: &str = "DSU_PATCH_DIR";
/// The password file the home directory is read from when the environment names none.
const PASSWD: &str = "/etc/passwd";
/// Bounds the read of [`PASSWD`]; a larger one is not read.
const PASSWD_LIMIT: u64 = 16 << 20;
/// The width of the sequence number that starts the names `dsu` gives kept patches.
const SEQ_WIDTH: usize = 4;
/// The largest sequence number: beyond it the names would no longer sort in order.
pub const MAX_SEQ: u32 = 9999;
/// How many hex digits of the patch's SHA-256 its name carries.
const HASH_DIGITS: usize = 16;

/// What the environment and the configuration say about the bases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bases {
    /// No kept patches (`DSU_PATCH_DIR=off`, or `Builder::patch_dir(None)`).
    Off,
    /// One base replaces the others (`DSU_PATCH_DIR`, `Builder::patch_dir`).
    Only(PathBuf),
    /// The system-wide base, then the user's when there is one.
    Standard { user: Option<PathBuf> },
}

impl Bases {
    /// The bases of a process with environment `env` and effective uid `uid`; `passwd` gives
    /// the password file's text when it is needed (no `HOME` and no `XDG_DATA_HOME`).
    pub fn with(
        env: impl Fn(&str) -> Option<OsString>,
        uid: u32,
        passwd: impl FnOnce() -> Option<String>,
    ) -> Bases {
        let var = |name: &str| env(name).filter(|v| !v.is_empty());
        if let Some(dir) = var(ENV_VAR) {
            if dir == "off" {
                return Bases::Off;
            }
            let dir = PathBuf::from(dir);
            return Bases::Only(std::path::absolute(&dir).unwrap_or(dir));
        }
        let absolute = |name: &str| var(name).map(PathBuf::from).filter(|p| p.is_absolute());
        let user = if let Some(data) = absolute("XDG_DATA_HOME") {
            Some(data.join("dsu/patches"))
        } else {
            absolute("HOME")
                .or_else(|| passwd().and_then(|text| home_in_passwd(&text, uid)))
                .map(|home| home.join(".local/share/dsu/patches"))
        };
        Bases::Standard { user }
    }

    /// The bases of this process: its environment, its effective uid and `/etc/passwd`.
    pub fn of_process() -> Bases {
        Bases::with(
            |name| std::env::var_os(name),
            dsu_sys::ids::effective_uid(),
            read_passwd,
        )
    }

    /// The bases in the order their patches apply, each once.
    pub fn list(&self) -> Vec<PathBuf> {
        match self {
            Bases::Off => Vec::new(),
            Bases::Only(dir) => vec![dir.clone()],
            Bases::Standard { user } => {
                let mut list = vec![PathBuf::from(SYSTEM_DIR)];
                if let Some(user) = user
                    && *user != list[0]
                {
                    list.push(user.clone());
                }
                list
            }
        }
    }

    /// Where `dsu` run with effective uid `uid` keeps a patch: the one base, else the
    /// system-wide one for root (so that every process of the build finds it), else the
    /// user's. `None` when kept patches are off or no home directory is known.
    pub fn for_keeping(&self, uid: u32) -> Option<PathBuf> {
        match self {
            Bases::Off => None,
            Bases::Only(dir) => Some(dir.clone()),
            Bases::Standard { .. } if uid == 0 => Some(PathBuf::from(SYSTEM_DIR)),
            Bases::Standard { user } => user.clone(),
        }
    }
}

/// `/etc/passwd`, when it can be read and is of a sane size.
pub fn read_passwd() -> Option<String> {
    let bytes = crate::control::read_limited(Path::new(PASSWD), PASSWD_LIMIT).ok()?;
    String::from_utf8(bytes).ok()
}

/// The home directory of `uid` in the text of a password file (`name:pw:uid:gid:gecos:home:
/// shell` a line): the first line with that uid, when its home is an absolute path.
pub fn home_in_passwd(text: &str, uid: u32) -> Option<PathBuf> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            match fields[..] {
                [_, _, id, _, _, home, ..] if id.parse() == Ok(uid) => Some(home),
                _ => None,
            }
        })
        .map(PathBuf::from)
        .filter(|home| home.is_absolute())
}

/// The directory of build `build_id` (lowercase hex) under `base`.
pub fn build_dir(base: &Path, build_id: &str) -> PathBuf {
    base.join(build_id)
}

/// Whether the agent applies the directory entry `name`: a `.o` file that is not hidden
/// (`dsu` writes through hidden temporary names, so a half-written file is never taken).
pub fn is_patch_name(name: &str) -> bool {
    name.len() > 2 && name.ends_with(".o") && !name.starts_with('.')
}

/// The name `dsu` gives the patch with SHA-256 `sha256` (hex) kept as number `seq`:
/// `0007-9f2c1a3b4c5d6e7f.o`. Names sort in the order the patches were kept.
pub fn patch_name(seq: u32, sha256: &str) -> String {
    let digits = sha256.get(..HASH_DIGITS).unwrap_or(sha256);
    format!("{seq:0SEQ_WIDTH$}-{digits}.o")
}

/// The number after the largest one that starts a name among `names` (1 when none does).
pub fn next_seq<'a>(names: impl IntoIterator<Item = &'a str>) -> u32 {
    names
        .into_iter()
        .filter(|name| is_patch_name(name))
        .filter_map(|name| name.split_once('-')?.0.parse::<u32>().ok())
        .max()
        .map_or(1, |seq| seq.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    const PASSWD_TEXT: &str = "root:x:0:0:root:/root:/bin/bash\n\
                               # a comment:x:1000\n\
                               broken line\n\
                               alice:x:1000:1000:Alice,,,:/home/alice:/bin/sh\n\
                               rel:x:1001:1001::home/rel:/bin/sh\n\
                               again:x:1000:1000::/elsewhere:/bin/sh\n";

    #[test]
    fn the_home_directory_comes_from_the_first_line_of_the_uid() {
        assert_eq!(home_in_passwd(PASSWD_TEXT, 0), Some("/root".into()));
        assert_eq!(
            home_in_passwd(PASSWD_TEXT, 1000),
            Some("/home/alice".into())
        );
        assert_eq!(home_in_passwd(PASSWD_TEXT, 1001), None, "a relative home");
        assert_eq!(home_in_passwd(PASSWD_TEXT, 4242), None);
        assert_eq!(home_in_passwd("", 0), None);
    }

    #[test]
    fn the_user_base_follows_xdg_then_home_then_the_password_file() {
        let passwd = || Some(PASSWD_TEXT.to_owned());
        let user = |vars: &[(&str, &str)]| match Bases::with(env(vars), 1000, passwd) {
            Bases::Standard { user } => user,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            user(&[("XDG_DATA_HOME", "/data"), ("HOME", "/h")]),
            Some("/data/dsu/patches".into())
        );
        assert_eq!(
            user(&[("XDG_DATA_HOME", "rel"), ("HOME", "/h")]),
            Some("/h/.local/share/dsu/patches".into()),
            "a relative XDG_DATA_HOME is ignored, as the XDG specification asks"
        );
        assert_eq!(
            user(&[("HOME", "")]),
            Some("/home/alice/.local/share/dsu/patches".into()),
            "a blank environment: the password file"
        );
        assert_eq!(
            Bases::with(env(&[]), 4242, passwd),
            Bases::Standard { user: None }
        );
        // The password file is read only when the environment names no home.
        let unread = || -> Option<String> { panic!("read the password file") };
        let _ = Bases::with(env(&[("HOME", "/h")]), 1000, unread);
    }

    #[test]
    fn dsu_patch_dir_replaces_both_bases_or_turns_them_off() {
        let none = || None;
        let only = Bases::with(env(&[("DSU_PATCH_DIR", "/p"), ("HOME", "/h")]), 0, none);
        assert_eq!(only, Bases::Only("/p".into()));
        assert_eq!(only.list(), vec![PathBuf::from("/p")]);
        assert_eq!(only.for_keeping(1000), Some("/p".into()));
        let relative = Bases::with(env(&[("DSU_PATCH_DIR", "p")]), 0, none);
        assert!(
            matches!(&relative, Bases::Only(p) if p.is_absolute() && p.ends_with("p")),
            "{relative:?}"
        );
        let off = Bases::with(env(&[("DSU_PATCH_DIR", "off")]), 0, none);
        assert_eq!(off, Bases::Off);
        assert!(off.list().is_empty());
        assert_eq!(off.for_keeping(0), None);
    }

    #[test]
    fn root_keeps_system_wide_and_users_in_their_home() {
        let bases = Bases::with(env(&[("HOME", "/home/alice")]), 1000, || None);
        let user = PathBuf::from("/home/alice/.local/share/dsu/patches");
        assert_eq!(bases.list(), vec![PathBuf::from(SYSTEM_DIR), user.clone()]);
        assert_eq!(bases.for_keeping(1000), Some(user));
        assert_eq!(bases.for_keeping(0), Some(SYSTEM_DIR.into()));
        let homeless = Bases::Standard { user: None };
        assert_eq!(homeless.list(), vec![PathBuf::from(SYSTEM_DIR)]);
        assert_eq!(homeless.for_keeping(1000), None);
        let same = Bases::Standard {
            user: Some(SYSTEM_DIR.into()),
        };
        assert_eq!(same.list().len(), 1, "one directory is read once");
    }

    #[test]
    fn names_sort_in_the_order_patches_were_kept() {
        let sha = "9f2c1a3b4c5d6e7f00112233445566778899aabbccddeeff0011223344556677";
        assert_eq!(patch_name(7, sha), "0007-9f2c1a3b4c5d6e7f.o");
        assert!(patch_name(9, sha) < patch_name(10, sha));
        assert_eq!(next_seq([]), 1);
        assert_eq!(
            next_seq([
                "0002-ab.o",
                "0010-cd.o",
                "fix.o",
                ".0099-x.o.1.tmp",
                "0050-x.txt"
            ]),
            11
        );
        assert!(is_patch_name("fix.o"));
        for ignored in [
            ".o",
            ".0001-ab.o.42.tmp",
            "notes.txt",
            "fix.o~",
            ".hidden.o",
        ] {
            assert!(!is_patch_name(ignored), "{ignored}");
        }
    }
}
