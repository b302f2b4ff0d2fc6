//! The processes of the host that run a dsu agent: who they are (user, executable, build id)
//! and which of them a host-wide command selects (`--exe`, `--build-id`).
//!
//! [`list`] starts from [`discover::scan`] (one pass over `/proc`) and adds what `/proc`
//! says of each process, on as many threads as there are cores; the executable's build id is
//! read once per file (device and inode), from its `PT_NOTE` segments only, however many
//! processes run it.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use object::read::elf::{FileHeader, ProgramHeader};

use crate::discover;
use crate::fan_out::{self, fan_out};
use crate::{sys, target};

/// A process with a dsu agent, as [`list`] found it.
#[derive(Debug, Clone)]
pub struct AgentProcess {
    pub pid: u32,
    /// Effective uid.
    pub uid: u32,
    /// The control directory, as this process reaches it.
    pub dir: PathBuf,
    /// `/proc/PID/exe` as the process sees it (`... (deleted)` after an upgrade replaced the
    /// file).
    pub exe: String,
    /// Device and inode of the executable.
    file: Option<(u64, u64)>,
    /// The executable's GNU build id, lower-case hex.
    pub build_id: Option<String>,
}

/// Every process this user may look into that runs a dsu agent, in pid order. A `fork()`ed
/// child that only shares its parent's socket is left out: its agent runs in the parent.
pub fn list() -> Vec<AgentProcess> {
    let found = without_forked_children(discover::scan());
    let mut processes: Vec<AgentProcess> = fan_out(&found, fan_out::cores(), describe, |_| ())
        .into_iter()
        .flatten()
        .collect();
    // Once per file, however many processes run it.
    let mut build_ids: HashMap<(u64, u64), Option<String>> = HashMap::new();
    for p in &mut processes {
        if let Some(key) = p.file {
            p.build_id = build_ids
                .entry(key)
                .or_insert_with(|| build_id(Path::new(&format!("/proc/{}/exe", p.pid))))
                .clone();
        }
    }
    processes
}

/// Keeps, of processes sharing one listening socket, the one its `agent.json` names.
fn without_forked_children(found: Vec<discover::Found>) -> Vec<discover::Found> {
    let mut sharing: HashMap<u64, usize> = HashMap::new();
    for f in &found {
        *sharing.entry(f.socket).or_default() += 1;
    }
    let mut owners: HashMap<u64, Option<u32>> = HashMap::new();
    found
        .into_iter()
        .filter(|f| {
            sharing[&f.socket] == 1
                || *owners
                    .entry(f.socket)
                    .or_insert_with(|| target::agent_pid(&f.dir))
                    == Some(f.pid)
        })
        .collect()
}

/// What `/proc` says of a found process (all but the build id); `None` when it exited
/// meanwhile.
fn describe(found: &discover::Found) -> Option<AgentProcess> {
    let pid = found.pid;
    let status = sys::read_proc_text(format!("/proc/{pid}/status")).ok()?;
    let uid = target::parse_status_uid(&status)?;
    let exe_link = PathBuf::from(format!("/proc/{pid}/exe"));
    let exe = fs::read_link(&exe_link)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    // Through the link: the file the process runs, in whatever mount namespace.
    let file = fs::metadata(&exe_link).ok().map(|m| (m.dev(), m.ino()));
    Some(AgentProcess {
        pid,
        uid,
        dir: found.dir.clone(),
        exe,
        file,
        build_id: None,
    })
}

/// The GNU build id of the ELF file at `path`, from its `PT_NOTE` segments; the file is read
/// only where the headers point.
pub fn build_id(path: &Path) -> Option<String> {
    let file = fs::File::open(path).ok()?;
    let data = object::read::ReadCache::new(file);
    let header = object::elf::FileHeader64::<object::Endianness>::parse(&data).ok()?;
    let endian = header.endian().ok()?;
    for segment in header.program_headers(endian, &data).ok()? {
        let Ok(Some(mut notes)) = segment.notes(endian, &data) else {
            continue;
        };
        while let Ok(Some(note)) = notes.next() {
            if note.name() == object::elf::ELF_NOTE_GNU
                && note.n_type(endian) == object::elf::NT_GNU_BUILD_ID
            {
                return Some(hex(note.desc()));
            }
        }
    }
    None
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A build id given on the command line: hex digits, 8 at least (a prefix selects every
/// build id that starts with it, as `dsu ps` shows them shortened).
pub fn parse_build_id(value: &str) -> Result<String, String> {
    let id = value.to_ascii_lowercase();
    if id.len() < 8 || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{value:?} is not a build id: 8 to 128 hex digits (`dsu ps` shows them)"
        ));
    }
    Ok(id)
}

/// Which processes a host-wide command acts on.
#[derive(Debug, Default)]
pub struct Filter {
    exe: Option<ExeFilter>,
    build_id: Option<String>,
}

#[derive(Debug)]
struct ExeFilter {
    /// The path as given, with symbolic links resolved when it exists here.
    path: PathBuf,
    /// Device and inode of the file it names, when it exists here.
    file: Option<(u64, u64)>,
}

impl Filter {
    pub fn new(exe: Option<&Path>, build_id: Option<&str>) -> Filter {
        Filter {
            exe: exe.map(|path| ExeFilter {
                path: fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()),
                file: fs::metadata(path).ok().map(|m| (m.dev(), m.ino())),
            }),
            build_id: build_id.map(str::to_owned),
        }
    }

    /// Why `process` is not selected; `None` when it is.
    pub fn mismatch(&self, process: &AgentProcess) -> Option<String> {
        if let Some(exe) = &self.exe {
            let same_file = exe.file.is_some() && exe.file == process.file;
            if !same_file && Path::new(&process.exe) != exe.path {
                return Some(format!(
                    "executable {}, not {}",
                    process.exe,
                    exe.path.display()
                ));
            }
        }
        if let Some(wanted) = &self.build_id {
            return match &process.build_id {
                None => Some(format!("executable {} has no GNU build id", process.exe)),
                Some(id) if !id.starts_with(wanted.as_str()) => {
                    Some(format!("build id {id}, not {wanted}"))
                }
                Some(_) => None,
            };
        }
        None
    }

    /// The filter as the command line gave it, for messages: `--exe /usr/bin/shop`.
    pub fn describe(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(exe) = &self.exe {
            parts.push(format!("--exe {}", exe.path.display()));
        }
        if let Some(id) = &self.build_id {
            parts.push(format!("--build-id {id}"));
        }
        (!parts.is_empty()).then(|| parts.join(" "))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn process(exe: &str, build_id: Option<&str>) -> AgentProcess {
        AgentProcess {
            pid: 1,
            uid: 0,
            dir: PathBuf::new(),
            exe: exe.to_owned(),
            file: None,
            build_id: build_id.map(str::to_owned),
        }
    }

    #[test]
    fn filters_say_why_a_process_is_left_out() {
        let exe = Filter::new(Some(Path::new("/nonexistent/shop")), None);
        assert_eq!(exe.mismatch(&process("/nonexistent/shop", None)), None);
        assert_eq!(
            exe.mismatch(&process("/usr/bin/other", None)).as_deref(),
            Some("executable /usr/bin/other, not /nonexistent/shop")
        );
        let id = Filter::new(None, Some("abcd1234"));
        assert_eq!(id.mismatch(&process("/x", Some("abcd1234ff"))), None);
        assert_eq!(
            id.mismatch(&process("/x", Some("0123456789"))).as_deref(),
            Some("build id 0123456789, not abcd1234")
        );
        assert_eq!(
            id.mismatch(&process("/x", None)).as_deref(),
            Some("executable /x has no GNU build id")
        );
        assert_eq!(Filter::default().mismatch(&process("/x", None)), None);
    }

    #[test]
    fn build_ids_are_hex_prefixes_of_eight_digits_or_more() {
        assert_eq!(parse_build_id("ABCDEF01").as_deref(), Ok("abcdef01"));
        for bad in ["abc", "abcdefgh", "", &"a".repeat(129)] {
            assert!(parse_build_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_build_id_is_read_from_the_note_segment() {
        // The smallest ELF64 with a build id: a header, one PT_NOTE program header, the note.
        let note: Vec<u8> = [
            &4u32.to_le_bytes()[..],
            &4u32.to_le_bytes(),
            &3u32.to_le_bytes(),
        ]
        .concat()
        .into_iter()
        .chain(*b"GNU\0")
        .chain([0xde, 0xad, 0xbe, 0xef])
        .collect();
        let mut elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
        elf.extend(2u16.to_le_bytes()); // ET_EXEC
        elf.extend(62u16.to_le_bytes()); // EM_X86_64
        elf.extend(1u32.to_le_bytes());
        elf.extend(0u64.to_le_bytes()); // entry
        elf.extend(64u64.to_le_bytes()); // phoff
        elf.extend(0u64.to_le_bytes()); // shoff
        elf.extend(0u32.to_le_bytes());
        for half in [64u16, 56, 1, 64, 0, 0] {
            elf.extend(half.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
        }
        elf.extend(4u32.to_le_bytes()); // PT_NOTE
        elf.extend(4u32.to_le_bytes());
        for word in [120u64, 0, 0, note.len() as u64, note.len() as u64, 4] {
            elf.extend(word.to_le_bytes()); // offset, vaddr, paddr, filesz, memsz, align
        }
        elf.extend(&note);
        let path = std::env::temp_dir().join(format!("dsu-build-id-{}", std::process::id()));
        fs::write(&path, &elf).unwrap();
        assert_eq!(build_id(&path).as_deref(), Some("deadbeef"));
        fs::write(&path, &elf[..100]).unwrap();
        assert_eq!(build_id(&path), None);
        let _ = fs::remove_file(&path);
        assert_eq!(build_id(Path::new("/nonexistent")), None);
    }
}
