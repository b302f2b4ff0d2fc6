//! GDB's JIT interface: how a process tells a debugger about code it generated at run time.
//!
//! The debugger looks, in each loaded module, for a function `__jit_debug_register_code` and a
//! variable `__jit_debug_descriptor` (a version, an action and a doubly linked list of
//! entries, each pointing to an in-memory object file, the *symfile*). It puts a breakpoint on
//! the function; the process links or unlinks an entry, records which entry and what it did in
//! the descriptor, and calls the function. When attaching, the debugger reads every entry of
//! the list. The layout and the protocol are those of the GDB manual ("JIT Compilation
//! Interface"); LLDB reads the same interface.
//!
//! Which descriptor: the one the dynamic loader resolves for the process (`dlsym` with
//! `RTLD_DEFAULT`) when a loaded module exports both names, else this crate's own. A program
//! that embeds a JIT (LLVM) and exports its interface thus keeps one interface for the whole
//! process, which every debugger version reads; its JIT and dsu then share one list, each
//! under its own lock (the two cannot share a lock: known limit, see `docs/design.md`).
//!
//! This crate's own definitions are *weak*: linked into a program that defines the interface
//! itself, the program's definitions win and linking does not fail; every reference then goes
//! to them. In the shared agent (`libdsu_agent.so`) they are not exported (only the C API is),
//! so they never take the place of the program's either; the debugger finds them in the
//! library's symbol table.

use std::io;
use std::sync::Mutex;

/// `action_flag`: nothing to do.
pub const JIT_NOACTION: u32 = 0;
/// `action_flag`: `relevant_entry` was just linked.
pub const JIT_REGISTER_FN: u32 = 1;
/// `action_flag`: `relevant_entry` was just unlinked.
pub const JIT_UNREGISTER_FN: u32 = 2;

/// The only descriptor version debuggers know.
pub const JIT_VERSION: u32 = 1;

/// One entry of the list (`struct jit_code_entry`).
#[repr(C)]
#[derive(Debug)]
pub struct CodeEntry {
    pub next: *mut CodeEntry,
    pub prev: *mut CodeEntry,
    pub symfile_addr: *const u8,
    pub symfile_size: u64,
}

/// The descriptor (`struct jit_descriptor`).
#[repr(C)]
#[derive(Debug)]
pub struct Descriptor {
    pub version: u32,
    pub action_flag: u32,
    pub relevant_entry: *mut CodeEntry,
    pub first_entry: *mut CodeEntry,
}

// The definitions, weak (see the module documentation). The function is empty and, being
// assembly, can never be inlined or removed: the debugger's breakpoint sits on it. It starts
// with `endbr64`, as it may be called through a pointer.
std::arch::global_asm!(
    ".pushsection .text.__jit_debug_register_code,\"ax\",@progbits",
    ".weak __jit_debug_register_code",
    ".type __jit_debug_register_code,@function",
    ".p2align 4",
    "__jit_debug_register_code:",
    "endbr64",
    "ret",
    ".size __jit_debug_register_code, . - __jit_debug_register_code",
    ".popsection",
    ".pushsection .data.__jit_debug_descriptor,\"aw\",@progbits",
    ".weak __jit_debug_descriptor",
    ".type __jit_debug_descriptor,@object",
    ".p2align 3",
    "__jit_debug_descriptor:",
    ".long 1",
    ".long 0",
    ".quad 0",
    ".quad 0",
    ".size __jit_debug_descriptor, . - __jit_debug_descriptor",
    ".popsection",
);

unsafe extern "C" {
    fn __jit_debug_register_code();
    static mut __jit_debug_descriptor: Descriptor;
}

/// Serialises this process's changes to the list made through this module.
static LOCK: Mutex<()> = Mutex::new(());

/// A JIT interface of the process: its descriptor and its registration function. Two are the
/// same interface when they have the same descriptor.
#[derive(Debug, Clone, Copy)]
pub struct Interface {
    descriptor: *mut Descriptor,
    register_code: unsafe extern "C" fn(),
}

impl PartialEq for Interface {
    fn eq(&self, other: &Interface) -> bool {
        self.descriptor == other.descriptor
    }
}

impl Eq for Interface {}

// SAFETY: both pointers are to process-global objects (a static variable and a function) of a
// loaded module, valid from any thread; the descriptor is written only under `LOCK`.
unsafe impl Send for Interface {}
// SAFETY: as above; an `Interface` itself is never written through a shared reference.
unsafe impl Sync for Interface {}

impl Interface {
    /// This crate's own interface, as the static linker bound it (a program's own strong
    /// definitions, if it has them).
    pub fn own() -> Interface {
        Interface {
            descriptor: &raw mut __jit_debug_descriptor,
            register_code: __jit_debug_register_code,
        }
    }

    /// The interface the dynamic loader resolves for the process, when a loaded module
    /// exports both names; else [`Interface::own`]. Takes the loader's lock: never call it
    /// while threads are stopped.
    pub fn of_process() -> Interface {
        let descriptor = global_symbol(c"__jit_debug_descriptor");
        let register_code = global_symbol(c"__jit_debug_register_code");
        match (descriptor, register_code) {
            (Some(d), Some(r)) if module_of(d).is_some() && module_of(d) == module_of(r) => {
                Interface {
                    descriptor: d as *mut Descriptor,
                    // SAFETY: the loader resolved this name to a definition in the same module
                    // as the descriptor: the interface's registration function, which takes
                    // no argument and returns nothing by the protocol.
                    register_code: unsafe {
                        std::mem::transmute::<usize, unsafe extern "C" fn()>(r)
                    },
                }
            }
            _ => Interface::own(),
        }
    }

    /// Whether this is this crate's own interface.
    pub fn is_own(&self) -> bool {
        *self == Interface::own()
    }

    /// Address of the descriptor.
    pub fn descriptor_address(&self) -> usize {
        self.descriptor as usize
    }
}

/// A symfile linked into an interface's list; unlinked when dropped.
#[derive(Debug)]
pub struct Registration {
    interface: Interface,
    /// Boxed: the list points to it, so it must not move.
    entry: Box<CodeEntry>,
    /// The symfile the entry points to, unchanged until the entry is unlinked.
    symfile: Box<[u8]>,
}

// SAFETY: the entry and the symfile are owned heap blocks; the list that points to the entry
// is changed only under `LOCK`, from whichever thread.
unsafe impl Send for Registration {}

impl Registration {
    /// Links `symfile` (an ELF object file describing code of the process) into the list of
    /// `interface` and tells a debugger that may be attached. Allocates and takes a lock:
    /// never call it while threads are stopped.
    pub fn register(interface: Interface, symfile: Box<[u8]>) -> io::Result<Registration> {
        let mut entry = Box::new(CodeEntry {
            next: std::ptr::null_mut(),
            prev: std::ptr::null_mut(),
            symfile_addr: symfile.as_ptr(),
            symfile_size: symfile.len() as u64,
        });
        let entry_ptr: *mut CodeEntry = &mut *entry;
        let _held = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let d = interface.descriptor;
        // SAFETY: `d` is a descriptor of a loaded module (see `Interface`), written only under
        // `LOCK`, which is held; `entry_ptr` points to the boxed entry, which stays where it
        // is until `Drop` unlinks it; the first entry, if any, is a live entry of the list.
        unsafe {
            if (*d).version != JIT_VERSION {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "JIT descriptor at {d:p} has version {}, not {JIT_VERSION}",
                        (*d).version
                    ),
                ));
            }
            let first = (*d).first_entry;
            (*entry_ptr).next = first;
            if !first.is_null() {
                (*first).prev = entry_ptr;
            }
            (*d).first_entry = entry_ptr;
            (*d).relevant_entry = entry_ptr;
            (*d).action_flag = JIT_REGISTER_FN;
            // The descriptor is complete before the call: a debugger reads it at its
            // breakpoint on the function. The call is opaque to the compiler, so every store
            // above happens before it.
            (interface.register_code)();
        }
        Ok(Registration {
            interface,
            entry,
            symfile,
        })
    }

    /// The symfile as registered.
    pub fn symfile(&self) -> &[u8] {
        &self.symfile
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let entry_ptr: *mut CodeEntry = &mut *self.entry;
        let _held = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let d = self.interface.descriptor;
        // SAFETY: as in `register`: the lock is held, the entry is linked (by `register`,
        // which returned `Ok`) and its neighbours are live entries of the list.
        unsafe {
            let (prev, next) = ((*entry_ptr).prev, (*entry_ptr).next);
            if prev.is_null() {
                (*d).first_entry = next;
            } else {
                (*prev).next = next;
            }
            if !next.is_null() {
                (*next).prev = prev;
            }
            (*d).relevant_entry = entry_ptr;
            (*d).action_flag = JIT_UNREGISTER_FN;
            (self.interface.register_code)();
            (*d).relevant_entry = std::ptr::null_mut();
            (*d).action_flag = JIT_NOACTION;
        }
    }
}

/// The address `name` resolves to in the process's global scope.
fn global_symbol(name: &std::ffi::CStr) -> Option<usize> {
    // SAFETY: `name` is NUL-terminated; RTLD_DEFAULT searches the loaded modules only.
    let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as usize;
    (address != 0).then_some(address)
}

/// The base address of the loaded module holding `address`.
fn module_of(address: usize) -> Option<usize> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::uninit();
    // SAFETY: `dladdr` only writes `info`, and only reads the loader's tables.
    let found = unsafe { libc::dladdr(address as *const libc::c_void, info.as_mut_ptr()) };
    // SAFETY: `dladdr` filled `info` when it returned non-zero.
    (found != 0).then(|| unsafe { info.assume_init() }.dli_fbase as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries of `interface`'s list, first to last, checking the back links.
    fn entries(interface: Interface) -> Vec<*const u8> {
        let _held = LOCK.lock().unwrap();
        let mut out = Vec::new();
        let mut prev = std::ptr::null_mut();
        // SAFETY: the lock is held; the list holds live entries only.
        unsafe {
            let mut at = (*interface.descriptor).first_entry;
            while !at.is_null() {
                assert_eq!((*at).prev, prev);
                out.push((*at).symfile_addr);
                prev = at;
                at = (*at).next;
            }
        }
        out
    }

    #[test]
    fn entries_are_linked_first_and_unlinked_from_anywhere() {
        let interface = Interface::own();
        let before = entries(interface);
        let a = Registration::register(interface, vec![1u8; 8].into()).unwrap();
        let b = Registration::register(interface, vec![2u8; 8].into()).unwrap();
        let c = Registration::register(interface, vec![3u8; 8].into()).unwrap();
        let (pa, pb, pc) = (
            a.symfile().as_ptr(),
            b.symfile().as_ptr(),
            c.symfile().as_ptr(),
        );
        let mut expected = vec![pc, pb, pa];
        expected.extend(&before);
        assert_eq!(entries(interface), expected);
        drop(b);
        assert_eq!(entries(interface)[..2], [pc, pa]);
        drop(c);
        assert_eq!(entries(interface)[..1], [pa]);
        drop(a);
        assert_eq!(entries(interface), before);
    }

    #[test]
    fn a_test_binary_resolves_its_own_interface() {
        // A Rust test executable exports no symbols: the loader finds none of these names.
        let own = Interface::own();
        assert!(own.is_own());
        assert_eq!(Interface::of_process(), own);
        // SAFETY: reads a field of the descriptor, which is never written but under the lock,
        // and the version is never written at all.
        assert_eq!(unsafe { (*own.descriptor).version }, JIT_VERSION);
    }
}
