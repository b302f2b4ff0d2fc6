//! Symbol look-up through the dynamic loader, for what only it knows: which implementation an
//! indirect function (IFUNC) selects on this CPU.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Address of `name` as the dynamic loader resolves it in one loaded module (the executable
/// when `is_main`, else the library at `path`), with IFUNCs resolved. `None` when the module
/// is not loaded or does not define the name. Takes the loader's lock: never call it while
/// threads are stopped.
pub fn dlsym_in(is_main: bool, path: &Path, name: &str) -> Option<usize> {
    let name = CString::new(name).ok()?;
    let path = if is_main {
        None
    } else {
        Some(CString::new(path.as_os_str().as_bytes()).ok()?)
    };
    let path_ptr = path.as_ref().map_or(std::ptr::null(), |p| p.as_ptr());
    // SAFETY: `path_ptr` is null (the executable) or a NUL-terminated string that outlives the
    // call; RTLD_NOLOAD never loads anything new, it only takes a reference we drop below.
    let handle = unsafe { libc::dlopen(path_ptr, libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return None;
    }
    // SAFETY: `handle` came from dlopen above and `name` is NUL-terminated.
    let address = unsafe { libc::dlsym(handle, name.as_ptr()) } as usize;
    // SAFETY: balances the reference taken by the successful dlopen above.
    unsafe { libc::dlclose(handle) };
    (address != 0).then_some(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_an_ifunc_of_libc_to_its_implementation() {
        let libc_path = crate::maps::read_self()
            .unwrap()
            .into_iter()
            .filter_map(|m| m.path)
            .find(|p| p.contains("libc.so"))
            .expect("libc mapped");
        let found = dlsym_in(false, Path::new(&libc_path), "strlen").expect("strlen");
        // What the program itself calls through its PLT/GOT is the same implementation.
        assert_eq!(found, libc::strlen as *const () as usize);
    }

    #[test]
    fn unknown_names_and_modules_give_none() {
        assert_eq!(dlsym_in(true, Path::new(""), "no_such_symbol_dsu"), None);
        assert_eq!(
            dlsym_in(false, Path::new("/nonexistent/libx.so"), "strlen"),
            None
        );
    }
}
