//! The GNU build id that names a program's directory of kept patches, as lowercase hex.
//!
//! Both sides read it from the `PT_NOTE` segments of the main executable: the agent from its
//! own memory (what runs, even if the file was replaced since), `dsu` from the file the
//! process runs (`/proc/PID/exe`, which opens the running binary even after an upgrade
//! replaced or deleted it). Only the ELF header, the program headers and the notes are read,
//! not the whole binary. The notes are parsed by [`expect::build_id_in_notes`], as for a
//! patch's binding.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::trust::expect;
use crate::trust::keys::hex;

/// `PT_NOTE`.
const PT_NOTE: u32 = 4;
/// Size of an ELF64 header and of one ELF64 program header.
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// Bounds what a damaged or hostile file can make us read.
const MAX_PHDRS: usize = 4096;
const MAX_NOTES: u64 = 1 << 20;

/// The build id of this process's executable, from its `PT_NOTE` segments in memory; `None`
/// when it has none (linked with `--build-id=none`).
pub fn of_this_process() -> Option<String> {
    let modules = dsu_sys::modules::loaded();
    let main = modules.iter().find(|m| m.is_main)?;
    main.notes.iter().find_map(|&(at, len)| {
        let mut notes = vec![0; len.min(MAX_NOTES as usize)];
        // Copied without trusting the headers: a note segment outside the mappings reads
        // short instead of faulting.
        let read = dsu_sys::mem::copy_from_self(at, &mut notes).ok()?;
        expect::build_id_in_notes(&notes[..read]).map(hex)
    })
}

/// The build id of the ELF64 little-endian executable or library `file`; `Ok(None)` when it
/// has none, `InvalidData` when it is not such a file.
pub fn of_file(file: &File) -> io::Result<Option<String>> {
    bytes_of_file(file).map(|id| id.as_deref().map(hex))
}

/// [`of_file`]'s build id as its bytes, as a patch's binding compares it.
pub fn bytes_of_file(file: &File) -> io::Result<Option<Vec<u8>>> {
    let read = |at: u64, len: usize| -> io::Result<Vec<u8>> {
        let mut bytes = vec![0; len];
        file.read_exact_at(&mut bytes, at)?;
        Ok(bytes)
    };
    // A short file is not ELF either: read what there is before judging it.
    let mut header = [0u8; EHDR_SIZE];
    let mut got = 0;
    while got < EHDR_SIZE {
        match file.read_at(&mut header[got..], got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    let (phoff, phentsize, phnum) = program_headers(&header[..got])?;
    let table = read(phoff, phentsize * phnum)?;
    for entry in table.chunks_exact(phentsize) {
        let Some((offset, size)) = note_segment(entry) else {
            continue;
        };
        let notes = read(offset, size.min(MAX_NOTES) as usize)?;
        if let Some(id) = expect::build_id_in_notes(&notes) {
            return Ok(Some(id.to_vec()));
        }
    }
    Ok(None)
}

/// Where the program headers of an ELF64 little-endian file are: offset, entry size, count.
fn program_headers(header: &[u8]) -> io::Result<(u64, usize, usize)> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    if header.get(..4) != Some(b"\x7fELF") {
        return Err(bad("not an ELF file"));
    }
    if header.len() < EHDR_SIZE || header[4] != 2 || header[5] != 1 {
        return Err(bad("not a 64-bit little-endian ELF file"));
    }
    let phoff = u64::from_le_bytes(header[32..40].try_into().expect("8 bytes"));
    let phentsize = usize::from(u16::from_le_bytes([header[54], header[55]]));
    let phnum = usize::from(u16::from_le_bytes([header[56], header[57]]));
    if phentsize < PHDR_SIZE || phnum > MAX_PHDRS {
        return Err(bad("its program headers are malformed"));
    }
    Ok((phoff, phentsize, phnum))
}

/// The file offset and size of a `PT_NOTE` program header.
fn note_segment(entry: &[u8]) -> Option<(u64, u64)> {
    let word = |at: usize| u64::from_le_bytes(entry[at..at + 8].try_into().expect("8 bytes"));
    let kind = u32::from_le_bytes(entry[..4].try_into().expect("4 bytes"));
    (kind == PT_NOTE).then(|| (word(8), word(32)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 file: header, one `PT_LOAD` and one `PT_NOTE` holding `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; EHDR_SIZE];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        out[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        out[56..58].copy_from_slice(&2u16.to_le_bytes());
        let notes_at = (EHDR_SIZE + 2 * PHDR_SIZE) as u64;
        for (kind, offset, size) in [(1u32, 0u64, 0u64), (PT_NOTE, notes_at, notes.len() as u64)] {
            let mut phdr = vec![0u8; PHDR_SIZE];
            phdr[..4].copy_from_slice(&kind.to_le_bytes());
            phdr[8..16].copy_from_slice(&offset.to_le_bytes());
            phdr[32..40].copy_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&phdr);
        }
        out.extend_from_slice(notes);
        out
    }

    fn build_id_note(id: &[u8]) -> Vec<u8> {
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&(id.len() as u32).to_le_bytes());
        note.extend_from_slice(&3u32.to_le_bytes());
        note.extend_from_slice(b"GNU\0");
        note.extend_from_slice(id);
        note
    }

    fn file_with(name: &str, bytes: &[u8]) -> (File, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("dsu-build-id-{name}-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        (File::open(&path).unwrap(), path)
    }

    #[test]
    fn the_build_id_is_read_from_the_note_segment_in_lowercase_hex() {
        let (file, path) = file_with("ok", &elf_with_notes(&build_id_note(&[0xAB, 0x01, 0xff])));
        assert_eq!(of_file(&file).unwrap().as_deref(), Some("ab01ff"));
        let (none, none_path) = file_with("none", &elf_with_notes(&[]));
        assert_eq!(of_file(&none).unwrap(), None);
        let (text, text_path) = file_with("text", b"#!/bin/sh\necho this is a script, not ELF\n");
        let e = of_file(&text).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let mut wide = elf_with_notes(&[]);
        wide[4] = 1; // ELFCLASS32
        let (wide, wide_path) = file_with("class", &wide);
        assert!(of_file(&wide).unwrap_err().to_string().contains("64-bit"));
        for p in [path, none_path, text_path, wide_path] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn memory_and_file_agree_on_this_test_program() {
        // cargo links test programs with a build id, as distributions' linkers do by default.
        let exe = File::open("/proc/self/exe").unwrap();
        let in_memory = of_this_process();
        assert!(
            in_memory.as_ref().is_some_and(|id| id.len() >= 16),
            "{in_memory:?}"
        );
        assert_eq!(in_memory, of_file(&exe).unwrap());
    }
}
