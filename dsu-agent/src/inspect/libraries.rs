//! The libraries a binary on disk would load, found as the dynamic loader finds them but from
//! the files alone: nothing is loaded or run (no `dlopen`, no `ldd`).
//!
//! The loader maps the executable's `DT_NEEDED` libraries breadth-first, each library's own
//! needs after those of the objects before it, and a name already loaded (as its needed name
//! or its `DT_SONAME`) is not loaded again. A name with a `/` is a path. Any other name is
//! looked for, in this order, in:
//!
//! 1. the `DT_RPATH` of the object that needs it, then of the object that loaded that one, up
//!    to the executable, unless the object that needs it has a `DT_RUNPATH` (an object's own
//!    `DT_RPATH` is ignored when it has a `DT_RUNPATH`);
//! 2. `LD_LIBRARY_PATH` (here: of the dsu process, so run `LD_LIBRARY_PATH=... dsu inspect`
//!    as the program would be started);
//! 3. the `DT_RUNPATH` of the object that needs it (only for its own needs);
//! 4. the directories of `/etc/ld.so.conf` and the files it includes, in their order (what
//!    `ldconfig` puts in the loader's cache), then the trusted directories.
//!
//! `$ORIGIN` (or `${ORIGIN}`) stands for the directory of the object whose path list it is in
//! (the executable's real directory for `LD_LIBRARY_PATH`). A candidate that is not ELF64
//! x86_64 is passed over, as the loader does; one it would fail on (not ELF, damaged) is
//! reported. Each library gets its own base address, page
//! aligned, above every other module's end, so every address of a report names one module.

use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use object::read::ReadCache;
use object::read::elf::{FileHeader, ProgramHeader as _};
use object::{Endianness, elf};
use thiserror::Error;

/// The trusted directories the loader searches last.
pub const TRUSTED_DIRS: [&str; 6] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// Where the first library is placed: where the kernel maps libraries of a process, so report
/// addresses look like run-time ones and cannot be mistaken for the executable's.
pub const LIBRARY_BASE: u64 = 0x7f00_0000_0000;

const PAGE: u64 = 0x1000;

/// Why a file cannot be a module of the binary.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LibraryError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} is not an ELF file")]
    NotElf { path: PathBuf },
    #[error("{path} is {found}, not ELF64 x86_64")]
    Foreign { path: PathBuf, found: String },
    #[error("{path} is not a valid ELF file: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path} does not fit in the address space at {base:#x}")]
    TooLarge { path: PathBuf, base: u64 },
}

/// Where the loader looks for libraries besides the objects' own path lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchPaths {
    /// `LD_LIBRARY_PATH`, split, unexpanded (`$ORIGIN` is the executable's directory).
    pub library_path: Vec<String>,
    /// The directories of `/etc/ld.so.conf`, then [`TRUSTED_DIRS`].
    pub system: Vec<PathBuf>,
}

impl SearchPaths {
    /// The search of this host: `LD_LIBRARY_PATH` of the dsu process, `/etc/ld.so.conf`.
    pub fn of_host() -> SearchPaths {
        let library_path = std::env::var_os("LD_LIBRARY_PATH")
            .map(|v| {
                // The loader reads an empty entry as the current directory.
                v.to_string_lossy()
                    .split([':', ';'])
                    .map(|d| if d.is_empty() { "." } else { d }.to_string())
                    .collect()
            })
            .unwrap_or_default();
        let mut system = Vec::new();
        read_conf(Path::new("/etc/ld.so.conf"), &mut system, 0);
        for dir in TRUSTED_DIRS {
            push_new(&mut system, PathBuf::from(dir));
        }
        SearchPaths {
            library_path,
            system,
        }
    }
}

/// What the loader reads of an object to find its libraries and place it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dynamic {
    pub needed: Vec<String>,
    pub soname: Option<String>,
    pub rpath: Option<String>,
    pub runpath: Option<String>,
    /// Link-time addresses of its `PT_LOAD` segments, from the first page to the last byte.
    pub span: Range<u64>,
    /// The largest `PT_LOAD` alignment (at least a page).
    pub align: u64,
}

/// One module of the binary: the executable first, then its libraries in load order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The file, as found (the executable as given).
    pub path: PathBuf,
    /// The `DT_NEEDED` name it was loaded for (`None` for the executable).
    pub needed: Option<String>,
    /// The module whose `DT_NEEDED` loaded it.
    pub needed_by: Option<usize>,
    pub dynamic: Dynamic,
    /// What `$ORIGIN` means in its path lists.
    pub origin: PathBuf,
    /// Added to its link-time addresses: 0 for the executable, a synthetic base for libraries.
    pub bias: u64,
}

impl Module {
    fn answers_to(&self, name: &str) -> bool {
        self.needed.as_deref() == Some(name) || self.dynamic.soname.as_deref() == Some(name)
    }
}

/// A needed library that no directory holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub name: String,
    pub needed_by: PathBuf,
    pub searched: Vec<PathBuf>,
    /// Files of that name passed over, with the reason (another architecture, not ELF).
    pub passed_over: Vec<String>,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "library {} (needed by {}) not found; searched {}",
            self.name,
            self.needed_by.display(),
            if self.searched.is_empty() {
                "nothing (a path that does not exist)".to_string()
            } else {
                self.searched
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )?;
        if !self.passed_over.is_empty() {
            write!(f, "; passed over {}", self.passed_over.join("; "))?;
        }
        Ok(())
    }
}

/// A needed library found but not usable: the loader would fail on it (the program would not
/// start), or it cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    pub name: String,
    pub needed_by: PathBuf,
    pub error: LibraryError,
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "library {} (needed by {}): {}",
            self.name,
            self.needed_by.display(),
            self.error
        )?;
        if !matches!(self.error, LibraryError::TooLarge { .. }) {
            write!(f, " (the loader would take this file and look no further)")?;
        }
        Ok(())
    }
}

/// The binary's modules in load order, and what could not be loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOrder {
    pub modules: Vec<Module>,
    pub missing: Vec<Missing>,
    /// Libraries found but unusable (a damaged file).
    pub unusable: Vec<Unusable>,
}

/// Finds the libraries `exe` loads, breadth-first as the loader does, and gives each a base.
/// Only the executable itself failing to read is an error; a library that cannot be found or
/// read is listed in the result.
pub fn load_order(exe: &Path, paths: &SearchPaths) -> Result<LoadOrder, LibraryError> {
    let dynamic = read_dynamic(exe)?;
    // The loader takes the executable's `$ORIGIN` from the kernel, symbolic links resolved.
    let origin = exe
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| directory_of(exe));
    let mut out = LoadOrder::default();
    let mut next_base = LIBRARY_BASE.max(align_up(dynamic.span.end, PAGE).unwrap_or(u64::MAX));
    out.modules.push(Module {
        path: exe.to_path_buf(),
        needed: None,
        needed_by: None,
        dynamic,
        origin,
        bias: 0,
    });
    let mut at = 0;
    while at < out.modules.len() {
        for name in out.modules[at].dynamic.needed.clone() {
            if out.modules.iter().any(|m| m.answers_to(&name))
                || out.missing.iter().any(|m| m.name == name)
                || out.unusable.iter().any(|m| m.name == name)
            {
                continue;
            }
            let (path, dynamic) = match find(&name, at, &out.modules, paths) {
                Ok(found) => found,
                Err(NotLoaded::Missing(missing)) => {
                    out.missing.push(missing);
                    continue;
                }
                Err(NotLoaded::Unusable(unusable)) => {
                    out.unusable.push(unusable);
                    continue;
                }
            };
            if out.modules.iter().any(|m| same_file(&m.path, &path)) {
                continue;
            }
            let Some((base, bias)) = place(&dynamic, next_base) else {
                out.unusable.push(Unusable {
                    name,
                    needed_by: out.modules[at].path.clone(),
                    error: LibraryError::TooLarge {
                        path,
                        base: next_base,
                    },
                });
                continue;
            };
            next_base = base + (dynamic.span.end - dynamic.span.start);
            next_base = align_up(next_base, PAGE).unwrap_or(u64::MAX);
            let origin = directory_of(&path);
            out.modules.push(Module {
                path,
                needed: Some(name),
                needed_by: Some(at),
                dynamic,
                origin,
                bias,
            });
        }
        at += 1;
    }
    Ok(out)
}

/// The base (first page) and bias of a module placed at or after `at`, aligned as its
/// segments ask.
fn place(dynamic: &Dynamic, at: u64) -> Option<(u64, u64)> {
    let base = align_up(at, dynamic.align)?;
    let size = dynamic.span.end - dynamic.span.start;
    base.checked_add(size)?;
    Some((base, base.checked_sub(dynamic.span.start)?))
}

/// Looks for the library `name` that module `requester` needs.
fn find(
    name: &str,
    requester: usize,
    modules: &[Module],
    paths: &SearchPaths,
) -> Result<(PathBuf, Dynamic), NotLoaded> {
    let req = &modules[requester];
    let mut missing = Missing {
        name: name.to_string(),
        needed_by: req.path.clone(),
        searched: vec![],
        passed_over: vec![],
    };
    let candidates = if name.contains('/') {
        vec![PathBuf::from(expand_origin(name, &req.origin))]
    } else {
        missing.searched = search_dirs(requester, modules, paths);
        missing.searched.iter().map(|d| d.join(name)).collect()
    };
    for candidate in candidates {
        if !candidate.is_file() {
            continue;
        }
        match read_dynamic(&candidate) {
            Ok(dynamic) => return Ok((candidate, dynamic)),
            // Another class or machine, or a file it may not open: the loader goes on.
            Err(e @ (LibraryError::Foreign { .. } | LibraryError::Read { .. })) => {
                missing.passed_over.push(e.to_string())
            }
            // Anything else it tries to load, and fails.
            Err(error) => {
                return Err(NotLoaded::Unusable(Unusable {
                    name: name.to_string(),
                    needed_by: req.path.clone(),
                    error,
                }));
            }
        }
    }
    Err(NotLoaded::Missing(missing))
}

/// Why a needed library is not among the modules.
enum NotLoaded {
    Missing(Missing),
    Unusable(Unusable),
}

/// The directories searched, in order, for a library (named without a `/`) that module
/// `requester` needs.
fn search_dirs(requester: usize, modules: &[Module], paths: &SearchPaths) -> Vec<PathBuf> {
    let req = &modules[requester];
    let mut dirs = Vec::new();
    if req.dynamic.runpath.is_none() {
        let mut chain = Some(requester);
        while let Some(m) = chain {
            let object = &modules[m];
            if object.dynamic.runpath.is_none()
                && let Some(rpath) = &object.dynamic.rpath
            {
                extend_dirs(&mut dirs, rpath, &object.origin);
            }
            chain = object.needed_by;
        }
    }
    for dir in &paths.library_path {
        push_new(
            &mut dirs,
            PathBuf::from(expand_origin(dir, &modules[0].origin)),
        );
    }
    if let Some(runpath) = &req.dynamic.runpath {
        extend_dirs(&mut dirs, runpath, &req.origin);
    }
    for dir in &paths.system {
        push_new(&mut dirs, dir.clone());
    }
    dirs
}

/// The directories of a `DT_RPATH` or `DT_RUNPATH` list, `$ORIGIN` expanded.
fn extend_dirs(dirs: &mut Vec<PathBuf>, list: &str, origin: &Path) {
    for dir in list.split(':').filter(|d| !d.is_empty()) {
        push_new(dirs, PathBuf::from(expand_origin(dir, origin)));
    }
}

/// `text` with `$ORIGIN` and `${ORIGIN}` replaced by `origin`.
pub fn expand_origin(text: &str, origin: &Path) -> String {
    let origin = origin.to_string_lossy();
    text.replace("${ORIGIN}", &origin)
        .replace("$ORIGIN", &origin)
}

fn push_new(dirs: &mut Vec<PathBuf>, dir: PathBuf) {
    if !dirs.contains(&dir) {
        dirs.push(dir);
    }
}

/// The directory of `path`, absolute (what the loader takes as a library's `$ORIGIN`).
fn directory_of(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    absolute
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => a == b,
    }
}

fn align_up(value: u64, align: u64) -> Option<u64> {
    let align = align.max(1);
    value.checked_add(align - 1).map(|v| v / align * align)
}

/// Reads what the loader needs of `path`, refusing a file that is not ELF64 x86_64 first.
pub fn read_dynamic(path: &Path) -> Result<Dynamic, LibraryError> {
    let read_err = |e: std::io::Error| LibraryError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut file = File::open(path).map_err(read_err)?;
    check_ident(path, &mut file)?;
    let malformed = |e: object::read::Error| LibraryError::Malformed {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let cache = ReadCache::new(file);
    let header = elf::FileHeader64::<Endianness>::parse(&cache).map_err(malformed)?;
    let endian = header.endian().map_err(malformed)?;
    let mut out = Dynamic {
        align: PAGE,
        ..Dynamic::default()
    };
    let mut span: Option<Range<u64>> = None;
    for p in header.program_headers(endian, &cache).map_err(malformed)? {
        if p.p_type(endian) != elf::PT_LOAD {
            continue;
        }
        let start = p.p_vaddr(endian) / PAGE * PAGE;
        let end = p
            .p_vaddr(endian)
            .checked_add(p.p_memsz(endian))
            .ok_or_else(|| LibraryError::Malformed {
                path: path.to_path_buf(),
                reason: "a PT_LOAD segment wraps around the address space".into(),
            })?;
        span = Some(match span {
            None => start..end,
            Some(s) => s.start.min(start)..s.end.max(end),
        });
        let align = p.p_align(endian);
        if align.is_power_of_two() && align <= 1 << 30 {
            out.align = out.align.max(align);
        }
    }
    out.span = span.unwrap_or(0..0);
    let sections = header.sections(endian, &cache).map_err(malformed)?;
    let table = sections.dynamic_table(endian, &cache).map_err(malformed)?;
    for d in table.iter() {
        let text = || {
            table
                .string(d)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .map_err(malformed)
        };
        match d.tag {
            elf::DT_NEEDED => out.needed.push(text()?),
            elf::DT_SONAME => out.soname = Some(text()?),
            elf::DT_RPATH => out.rpath = Some(text()?),
            elf::DT_RUNPATH => out.runpath = Some(text()?),
            _ => {}
        }
    }
    Ok(out)
}

/// The identification the loader checks before anything else: magic, class, byte order,
/// machine.
fn check_ident(path: &Path, file: &mut File) -> Result<(), LibraryError> {
    let mut head = [0u8; 20];
    let mut len = 0;
    while len < head.len() {
        match file.read(&mut head[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(LibraryError::Read {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                });
            }
        }
    }
    if len < 4 || head[..4] != elf::ELFMAG {
        return Err(LibraryError::NotElf {
            path: path.to_path_buf(),
        });
    }
    let foreign = |found: String| LibraryError::Foreign {
        path: path.to_path_buf(),
        found,
    };
    if len < head.len() {
        return Err(LibraryError::Malformed {
            path: path.to_path_buf(),
            reason: "truncated ELF header".into(),
        });
    }
    // e_ident: magic (4), class (1), data encoding (1), ...; e_machine at 18.
    match head[4] {
        c if c == elf::ELFCLASS64.0 => {}
        c if c == elf::ELFCLASS32.0 => return Err(foreign("ELF32".into())),
        c => return Err(foreign(format!("of ELF class {c}"))),
    }
    if head[5] != elf::ELFDATA2LSB.0 {
        return Err(foreign("big-endian".into()));
    }
    let machine = u16::from_le_bytes([head[18], head[19]]);
    if machine != elf::EM_X86_64.0 {
        return Err(foreign(format!("for machine {machine}")));
    }
    Ok(())
}

/// Adds the directories `path` (an `ld.so.conf`) lists, following its `include` lines.
fn read_conf(path: &Path, out: &mut Vec<PathBuf>, depth: u32) {
    // An include loop would never end: the loader's ldconfig stops too.
    if depth > 8 {
        return;
    }
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let here = path.parent().unwrap_or(Path::new("/"));
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(patterns) = line
            .strip_prefix("include")
            .filter(|rest| rest.starts_with(char::is_whitespace))
        {
            for pattern in patterns.split_whitespace() {
                for file in glob(&here.join(pattern)) {
                    read_conf(&file, out, depth + 1);
                }
            }
        } else if !line.is_empty() && !line.starts_with("hwcap") {
            // `dir`, or the old `dir=type`; several may share a line.
            for dir in line.split([' ', '\t', ':', ',']).filter(|d| !d.is_empty()) {
                let dir = dir.split('=').next().unwrap_or(dir);
                if dir.starts_with('/') {
                    push_new(out, PathBuf::from(dir.trim_end_matches('/')));
                }
            }
        }
    }
}

/// The files matching `pattern`, whose last component may hold `*` and `?`, sorted.
fn glob(pattern: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
        return vec![];
    };
    let name = name.to_string_lossy();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| wildcard(name.as_bytes(), e.file_name().as_encoded_bytes()))
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// Whether `text` matches `pattern` (`*` any run, `?` any one byte; a leading dot only
/// explicitly, as in the shell).
fn wildcard(pattern: &[u8], text: &[u8]) -> bool {
    if text.first() == Some(&b'.') && pattern.first() != Some(&b'.') {
        return false;
    }
    // Greedy match with one backtrack point (the last `*`).
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_as_in_the_shell() {
        assert!(wildcard(b"*.conf", b"libc.conf"));
        assert!(
            !wildcard(b"*.conf", b".conf"),
            "a leading dot only explicitly"
        );
        assert!(!wildcard(b"*.conf", b"libc.conf~"));
        assert!(wildcard(b"a?c*", b"abc"));
        assert!(wildcard(b"*a*b", b"xaxxab"));
        assert!(!wildcard(b"*a*b", b"xaxxa"));
        assert!(wildcard(b"*", b"x"));
    }

    #[test]
    fn origin_is_expanded_in_both_spellings() {
        let o = Path::new("/opt/app/bin");
        assert_eq!(expand_origin("$ORIGIN/../lib", o), "/opt/app/bin/../lib");
        assert_eq!(expand_origin("${ORIGIN}/lib:/x", o), "/opt/app/bin/lib:/x");
        assert_eq!(expand_origin("/usr/lib", o), "/usr/lib");
    }

    #[test]
    fn ld_so_conf_includes_are_followed_in_order() {
        let dir = std::env::temp_dir().join(format!("dsu-ldconf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("conf.d")).unwrap();
        std::fs::write(
            dir.join("ld.so.conf"),
            "/first # comment\ninclude conf.d/*.conf\n/last/\n",
        )
        .unwrap();
        std::fs::write(dir.join("conf.d/b.conf"), "/b1\n").unwrap();
        std::fs::write(
            dir.join("conf.d/a.conf"),
            "# a\n/a1 /a2\nhwcap 0 nosegneg\n",
        )
        .unwrap();
        std::fs::write(dir.join("conf.d/ignored.txt"), "/no\n").unwrap();
        let mut out = Vec::new();
        read_conf(&dir.join("ld.so.conf"), &mut out, 0);
        let _ = std::fs::remove_dir_all(&dir);
        let want: Vec<PathBuf> = ["/first", "/a1", "/a2", "/b1", "/last"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn a_file_that_is_not_x86_64_elf_is_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("dsu-ident-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cases: [(&str, Vec<u8>, &str); 4] = [
            ("text", b"GROUP ( libc.so.6 )".to_vec(), "not an ELF file"),
            ("short", b"\x7fELF\x02".to_vec(), "truncated"),
            (
                "elf32",
                [&b"\x7fELF\x01\x01"[..], &[0; 14]].concat(),
                "ELF32",
            ),
            (
                "arm64",
                [&b"\x7fELF\x02\x01"[..], &[0; 12], &[183, 0]].concat(),
                "for machine 183",
            ),
        ];
        for (name, bytes, reason) in cases {
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            let e = read_dynamic(&path).unwrap_err().to_string();
            assert!(e.contains(reason), "{name}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn module(origin: &str, needed_by: Option<usize>, rpath: &str, runpath: &str) -> Module {
        let list = |l: &str| (!l.is_empty()).then(|| l.to_string());
        Module {
            path: PathBuf::from(origin).join("object"),
            needed: needed_by.map(|_| "object".into()),
            needed_by,
            dynamic: Dynamic {
                rpath: list(rpath),
                runpath: list(runpath),
                ..Dynamic::default()
            },
            origin: PathBuf::from(origin),
            bias: 0,
        }
    }

    fn dirs(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn the_search_follows_the_loaders_order_of_path_lists() {
        let paths = SearchPaths {
            library_path: vec!["$ORIGIN/env".into(), "/env".into()],
            system: dirs(&["/sys1", "/sys2"]),
        };
        // exe (RPATH) -> a (RPATH) -> b (no list): b's needs are looked for in its loaders'
        // RPATHs, nearest first, then LD_LIBRARY_PATH ($ORIGIN: the executable's), then the
        // system's directories.
        let chain = [
            module("/app", None, "$ORIGIN/lib:/opt", ""),
            module("/app/lib", Some(0), "${ORIGIN}/sub", ""),
            module("/app/lib/sub", Some(1), "", ""),
        ];
        assert_eq!(
            search_dirs(2, &chain, &paths),
            dirs(&[
                "/app/lib/sub",
                "/app/lib",
                "/opt",
                "/app/env",
                "/env",
                "/sys1",
                "/sys2"
            ])
        );
        // An object with a RUNPATH: its own RUNPATH after LD_LIBRARY_PATH, no RPATH at all
        // (not its own, not its loaders').
        let runpath = [
            module("/app", None, "/exe-rpath", ""),
            module("/app/lib", Some(0), "/ignored", "$ORIGIN/run"),
        ];
        assert_eq!(
            search_dirs(1, &runpath, &paths),
            dirs(&["/app/env", "/env", "/app/lib/run", "/sys1", "/sys2"])
        );
        // A RUNPATH serves only its object's own needs: not those of the objects it loads.
        let below = [
            module("/app", None, "", "/exe-runpath"),
            module("/app/lib", Some(0), "", ""),
        ];
        assert_eq!(
            search_dirs(1, &below, &paths),
            dirs(&["/app/env", "/env", "/sys1", "/sys2"])
        );
        // An object with a RUNPATH hides its RPATH from those it loads, but the RPATHs of
        // the objects above it still count.
        let below = [
            module("/app", None, "/exe-rpath", ""),
            module("/app/lib", Some(0), "/lib-rpath", "/lib-runpath"),
            module("/app/lib/x", Some(1), "", ""),
        ];
        assert_eq!(
            search_dirs(2, &below, &paths),
            dirs(&["/exe-rpath", "/app/env", "/env", "/sys1", "/sys2"])
        );
    }

    #[test]
    fn another_machine_is_passed_over_and_a_file_that_is_not_elf_stops_the_search() {
        let dir = std::env::temp_dir().join(format!("dsu-find-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["arm", "text"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let arm64 = [&b"\x7fELF\x02\x01"[..], &[0; 12], &[183, 0]].concat();
        std::fs::write(dir.join("arm/libx.so"), arm64).unwrap();
        std::fs::write(dir.join("text/libx.so"), "INPUT(-lx)\n").unwrap();
        let modules = [module("/app", None, "", "")];
        let paths = |dirs: &[&str]| SearchPaths {
            library_path: dirs
                .iter()
                .map(|d| dir.join(d).display().to_string())
                .collect(),
            system: vec![],
        };
        let outcome = find("libx.so", 0, &modules, &paths(&["arm", "text"]));
        let only_arm = find("libx.so", 0, &modules, &paths(&["arm"]));
        let _ = std::fs::remove_dir_all(&dir);
        match outcome {
            Err(NotLoaded::Unusable(u)) => {
                let text = u.to_string();
                assert!(text.contains("text/libx.so is not an ELF file"), "{text}");
                assert!(
                    text.starts_with("library libx.so (needed by /app/object)"),
                    "{text}"
                );
            }
            _ => panic!("a file that is not ELF is taken, and fails"),
        }
        match only_arm {
            Err(NotLoaded::Missing(m)) => {
                let text = m.to_string();
                assert!(text.contains("passed over"), "{text}");
                assert!(text.contains("arm/libx.so is for machine 183"), "{text}");
            }
            _ => panic!("another machine's library is passed over"),
        }
    }

    #[test]
    fn libraries_get_page_aligned_bases_that_do_not_overlap() {
        let lib = Dynamic {
            span: 0..0x2_3456,
            align: 0x20_0000,
            ..Dynamic::default()
        };
        let (base, bias) = place(&lib, LIBRARY_BASE + 0x1000).unwrap();
        assert_eq!(base, LIBRARY_BASE + 0x20_0000);
        assert_eq!(bias, base);
        let high = Dynamic {
            span: 0x40_0000..0x40_1000,
            align: PAGE,
            ..Dynamic::default()
        };
        assert_eq!(
            place(&high, 0x1_0000_0000),
            Some((0x1_0000_0000, 0x1_0000_0000 - 0x40_0000))
        );
        assert_eq!(place(&lib, u64::MAX - 0x1000), None);
    }
}
