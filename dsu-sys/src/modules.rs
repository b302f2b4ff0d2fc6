//! Loaded ELF modules of this process (`dl_iterate_phdr`).
//!
//! `unsafe` here reads the loader's `dl_phdr_info` records inside the iteration callback. The
//! callback only copies plain data (it runs under the loader's lock, and must not unwind into
//! C); file-system lookups for paths happen after the iteration.

use std::ffi::CStr;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;

/// One loadable segment of a module, at its run-time address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
    pub exec: bool,
    pub write: bool,
}

impl Segment {
    /// Whether `addr` lies in `[start, start + len)`.
    pub fn contains(&self, addr: usize) -> bool {
        addr.wrapping_sub(self.start) < self.len
    }
}

/// A loaded module: the executable, a shared library, or the vDSO.
#[derive(Debug, Clone)]
pub struct LoadedModule {
    /// The name the dynamic loader gives (empty for the executable).
    pub name: String,
    /// File to read symbols from: `/proc/self/exe` resolved for the executable; `None` for the
    /// vDSO and modules without a file.
    pub path: Option<PathBuf>,
    /// Load bias: run-time address minus link-time address.
    pub bias: usize,
    pub segments: Vec<Segment>,
    /// Run-time address of `.eh_frame_hdr` (`PT_GNU_EH_FRAME`), if any.
    pub eh_frame_hdr: Option<usize>,
    /// TLS module id (`dlpi_tls_modid`), 0 when the module has no TLS.
    pub tls_modid: usize,
    pub is_main: bool,
    /// Run-time address and size of each `PT_NOTE` segment (where the GNU build id is).
    pub notes: Vec<(usize, usize)>,
}

impl LoadedModule {
    /// Whether `addr` lies in one of the module's loadable segments.
    pub fn contains(&self, addr: usize) -> bool {
        self.segments.iter().any(|s| s.contains(addr))
    }

    /// Whether `addr` lies in an executable segment of the module.
    pub fn contains_code(&self, addr: usize) -> bool {
        self.segments.iter().any(|s| s.exec && s.contains(addr))
    }
}

/// Lists the loaded modules in load order (the executable first). Takes the loader's lock:
/// never call it while threads are stopped.
pub fn loaded() -> Vec<LoadedModule> {
    let mut modules = loaded_in_memory();
    for module in &mut modules {
        module.path = file_of(module);
    }
    modules
}

/// [`loaded`] without looking for the modules' files (`path` is `None`): what the loader
/// knows, with no system call. For a caller that needs the names, biases or segments only.
pub fn loaded_in_memory() -> Vec<LoadedModule> {
    let mut state = Iteration {
        modules: Vec::new(),
        panic: None,
    };
    // SAFETY: `collect` matches the callback type and only uses `data` as `&mut Iteration`,
    // which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(collect), (&raw mut state).cast()) };
    if let Some(payload) = state.panic {
        // Only an allocation failure can get here; re-raise it now that we are outside C.
        panic::resume_unwind(payload);
    }
    state.modules
}

/// State shared with the `dl_iterate_phdr` callback.
struct Iteration {
    modules: Vec<LoadedModule>,
    panic: Option<Box<dyn std::any::Any + Send>>,
}

/// The `dl_iterate_phdr` callback: records one module. Never unwinds into the loader.
unsafe extern "C" fn collect(
    info: *mut libc::dl_phdr_info,
    size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: `data` is the `&mut Iteration` that `loaded` passed, alive and unaliased for the
    // whole iteration.
    let state = unsafe { &mut *data.cast::<Iteration>() };
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the loader passes a valid record of `size` bytes for this call.
        let module = unsafe { record(&*info, size) };
        let is_main = state.modules.is_empty();
        state.modules.push(LoadedModule { is_main, ..module });
    }));
    match result {
        Ok(()) => 0,
        Err(payload) => {
            state.panic = Some(payload);
            1 // stop iterating
        }
    }
}

/// Copies one loader record (path left `None`, `is_main` false).
///
/// # Safety
/// `info` is a record from `dl_iterate_phdr` of `size` bytes, with `dlpi_phnum` program
/// headers at `dlpi_phdr` and a NUL-terminated or null `dlpi_name`.
unsafe fn record(info: &libc::dl_phdr_info, size: usize) -> LoadedModule {
    let bias = info.dlpi_addr as usize;
    let name = if info.dlpi_name.is_null() {
        String::new()
    } else {
        // SAFETY: a non-null `dlpi_name` is a NUL-terminated string owned by the loader.
        unsafe { CStr::from_ptr(info.dlpi_name) }
            .to_string_lossy()
            .into_owned()
    };
    let phdrs: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
        &[]
    } else {
        // SAFETY: the loader's record has `dlpi_phnum` headers at `dlpi_phdr` (non-null).
        unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
    };
    let segments = phdrs
        .iter()
        .filter(|p| p.p_type == libc::PT_LOAD)
        .map(|p| Segment {
            start: bias.wrapping_add(p.p_vaddr as usize),
            len: p.p_memsz as usize,
            exec: p.p_flags & libc::PF_X != 0,
            write: p.p_flags & libc::PF_W != 0,
        })
        .collect();
    let eh_frame_hdr = phdrs
        .iter()
        .find(|p| p.p_type == libc::PT_GNU_EH_FRAME)
        .map(|p| bias.wrapping_add(p.p_vaddr as usize));
    let notes = phdrs
        .iter()
        .filter(|p| p.p_type == libc::PT_NOTE)
        .map(|p| (bias.wrapping_add(p.p_vaddr as usize), p.p_memsz as usize))
        .collect();
    // Loaders older than glibc 2.12 pass a shorter record without the TLS fields.
    let tls_end = std::mem::offset_of!(libc::dl_phdr_info, dlpi_tls_modid)
        + std::mem::size_of::<libc::size_t>();
    let tls_modid = if size >= tls_end {
        info.dlpi_tls_modid
    } else {
        0
    };
    LoadedModule {
        name,
        path: None,
        bias,
        segments,
        eh_frame_hdr,
        tls_modid,
        is_main: false,
        notes,
    }
}

/// The file to read a module's symbols from: the resolved executable for the main module, the
/// loader's name when it is a file on disk, else `None` (`linux-vdso.so.1`).
fn file_of(module: &LoadedModule) -> Option<PathBuf> {
    if module.is_main && module.name.is_empty() {
        return std::fs::read_link("/proc/self/exe").ok();
    }
    if module.name.is_empty() {
        return None;
    }
    let path = PathBuf::from(&module.name);
    path.is_file().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_module_comes_first_with_its_file() {
        let modules = loaded();
        let main = &modules[0];
        assert!(main.is_main);
        assert!(main.name.is_empty(), "{:?}", main.name);
        let path = main.path.as_ref().expect("executable path");
        assert!(path.is_file(), "{path:?}");
        assert_eq!(
            path.canonicalize().unwrap(),
            std::env::current_exe().unwrap().canonicalize().unwrap()
        );
        assert_eq!(modules.iter().filter(|m| m.is_main).count(), 1);
    }

    #[test]
    fn own_code_lies_in_an_exec_segment_of_main() {
        let modules = loaded();
        let main = &modules[0];
        let here = loaded as *const () as usize;
        assert!(main.contains_code(here), "{here:#x} in {main:#x?}");
        assert!(main.segments.iter().any(|s| s.write && !s.exec));
        let hdr = main.eh_frame_hdr.expect("PT_GNU_EH_FRAME");
        assert!(main.contains(hdr));
        assert!(modules[1..].iter().all(|m| !m.contains(here)));
    }

    #[test]
    fn libc_and_vdso() {
        let modules = loaded();
        let libc = modules
            .iter()
            .find(|m| m.name.contains("libc.so"))
            .expect("libc loaded");
        assert!(libc.path.as_ref().is_some_and(|p| p.is_file()));
        assert_ne!(libc.bias, 0);
        // The module that holds `getpid` is libc.
        let getpid = libc::getpid as *const () as usize;
        let holder = modules.iter().find(|m| m.contains_code(getpid));
        assert!(holder.is_some_and(|m| m.name == libc.name), "{getpid:#x}");
        // glibc itself has TLS (errno), so it has a module id.
        assert_ne!(libc.tls_modid, 0);
        if let Some(vdso) = modules.iter().find(|m| m.name.contains("vdso")) {
            assert_eq!(vdso.path, None);
            assert!(vdso.segments.iter().any(|s| s.exec));
        }
    }

    #[test]
    fn segment_contains() {
        let s = Segment {
            start: 0x1000,
            len: 0x10,
            exec: true,
            write: false,
        };
        assert!(s.contains(0x1000) && s.contains(0x100f));
        assert!(!s.contains(0xfff) && !s.contains(0x1010));
    }
}
