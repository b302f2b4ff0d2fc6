//! A patchable Rust program for the placement tests (in place, redirect, call-site rewrite,
//! unwinding through new code, MDWE), driven over stdin like `busy_target`.
//!
//! With `DSU_FIXTURE_MDWE=1` it first forbids itself to ever gain execute permission
//! (`prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)`, as systemd's `MemoryDenyWriteExecute=yes`).
//! It prints `ready <pid>` and `addresses big=0x.. small=0x.. ...`, then answers one line per
//! command:
//!
//! - `mdwe` -> `mdwe <0|1>`: whether the process forbids gaining execute permission
//! - `big` -> `big <dsu_place_big(7)>` (a large function: a shorter patch fits in place)
//! - `small` -> `small <dsu_place_caller(7)>`: a direct call to the small `dsu_place_small`
//! - `pointer` -> `pointer <f(7)>` through a pointer to `dsu_place_small` taken at start
//! - `checked N` -> `checked <dsu_place_checked(N)>`, or `caught <message>` when it panics
//!   (called inside `catch_unwind`)
//! - `trace` -> `trace <ip> <ip> ...`: return addresses seen by `_Unwind_Backtrace` from a
//!   capture made inside `dsu_place_traced`, called by `dsu_place_trace_caller`
//! - `exit`

use std::ffi::c_void;
use std::hint::black_box;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicUsize, Ordering};

// Large on purpose, and a leaf with no stack frame, so a short leaf replacement fits in its
// bytes with the same unwind rules (in place needs both, see docs/design.md "Placement"). In
// assembly because a debug build of Rust code always has a frame. `dsu_place_big(x)` mixes `x`
// four times and returns `x + 1` (0 only if the mix came out 0).
std::arch::global_asm!(
    ".globl dsu_place_big",
    ".type dsu_place_big, @function",
    ".p2align 4",
    "dsu_place_big:",
    ".cfi_startproc",
    "mov rax, rdi",
    "mov ecx, 4",
    "2:",
    "imul rax, rax, 1103515245",
    "add rax, rcx",
    "mov rdx, rax",
    "shr rdx, 17",
    "xor rax, rdx",
    "dec ecx",
    "jnz 2b",
    "test rax, rax",
    "jz 3f",
    "lea rax, [rdi + 1]",
    "ret",
    "3:",
    "xor eax, eax",
    "ret",
    ".cfi_endproc",
    ".size dsu_place_big, . - dsu_place_big",
);

unsafe extern "C" {
    safe fn dsu_place_big(x: u64) -> u64;
}

/// Small on purpose: any real replacement is longer and is redirected.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dsu_place_small(x: u64) -> u64 {
    x + 1
}

/// Calls `dsu_place_small` directly: a call site to rewrite.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dsu_place_caller(x: u64) -> u64 {
    dsu_place_small(black_box(x)) + 1000
}

/// Rust ABI, so a patched version may panic through its caller.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn dsu_place_checked(n: u64) -> u64 {
    black_box(n)
}

type TraceFn = unsafe extern "C" fn(*mut c_void, *mut c_void) -> i32;

unsafe extern "C" {
    fn _Unwind_Backtrace(trace: TraceFn, arg: *mut c_void) -> i32;
    fn _Unwind_GetIP(context: *mut c_void) -> usize;
}

struct Ips {
    ips: [usize; 32],
    len: usize,
}

unsafe extern "C" fn record_ip(context: *mut c_void, arg: *mut c_void) -> i32 {
    // SAFETY: `arg` is the `Ips` passed by `dsu_place_capture`, alive for the walk.
    let ips = unsafe { &mut *arg.cast::<Ips>() };
    if ips.len == ips.ips.len() {
        return 5; // _URC_END_OF_STACK: stop
    }
    // SAFETY: `context` is the unwinder's, valid during this callback.
    ips.ips[ips.len] = unsafe { _Unwind_GetIP(context) };
    ips.len += 1;
    0
}

/// Walks the stack with the C runtime's unwinder (which uses registered frames) and stores
/// the return addresses in `out`; returns how many.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dsu_place_capture(out: &mut [usize; 32]) -> usize {
    let mut ips = Ips {
        ips: [0; 32],
        len: 0,
    };
    // SAFETY: `record_ip` only touches `ips`, which outlives the call.
    unsafe { _Unwind_Backtrace(record_ip, (&raw mut ips).cast()) };
    *out = ips.ips;
    ips.len
}

/// Captures a backtrace from inside itself (the patch replaces it with a version that does the
/// same from new code).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dsu_place_traced(out: &mut [usize; 32]) -> usize {
    black_box(dsu_place_capture(out))
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dsu_place_trace_caller(out: &mut [usize; 32]) -> usize {
    black_box(dsu_place_traced(out))
}

static POINTER: AtomicUsize = AtomicUsize::new(0);

fn forbid_exec_gain() -> i64 {
    const PR_SET_MDWE: i32 = 65;
    const PR_GET_MDWE: i32 = 66;
    const PR_MDWE_REFUSE_EXEC_GAIN: u64 = 1;
    if std::env::var_os("DSU_FIXTURE_MDWE").is_some_and(|v| v == "1") {
        // SAFETY: plain prctl calls with integer arguments.
        let r = unsafe { libc::prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0u64, 0u64, 0u64) };
        if r != 0 {
            eprintln!(
                "placement_target: PR_SET_MDWE: {}",
                std::io::Error::last_os_error()
            );
            std::process::exit(2);
        }
    }
    // SAFETY: as above.
    i64::from(unsafe { libc::prctl(PR_GET_MDWE, 0u64, 0u64, 0u64, 0u64) })
}

fn main() {
    let mdwe = forbid_exec_gain();
    if let Err(e) = dsu_agent::Builder::new().log(true).install() {
        eprintln!("placement_target: {e}");
        std::process::exit(1);
    }
    POINTER.store(dsu_place_small as *const () as usize, Ordering::SeqCst);
    // Silence the default hook: the test reads panics from the `caught` reply.
    std::panic::set_hook(Box::new(|_| {}));
    println!("ready {}", std::process::id());
    println!(
        "addresses big={:#x} small={:#x} caller={:#x} checked={:#x} traced={:#x} trace_caller={:#x}",
        dsu_place_big as *const () as usize,
        dsu_place_small as *const () as usize,
        dsu_place_caller as *const () as usize,
        dsu_place_checked as *const () as usize,
        dsu_place_traced as *const () as usize,
        dsu_place_trace_caller as *const () as usize,
    );
    std::io::stdout().flush().unwrap();

    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        let reply = match words.next().unwrap_or("") {
            "mdwe" => format!("mdwe {mdwe}"),
            "big" => format!("big {}", dsu_place_big(black_box(7))),
            "small" => format!("small {}", dsu_place_caller(black_box(7))),
            "pointer" => {
                // SAFETY: the pointer is `dsu_place_small`'s address, stored above.
                let f: extern "C" fn(u64) -> u64 =
                    unsafe { std::mem::transmute(POINTER.load(Ordering::SeqCst)) };
                format!("pointer {}", f(black_box(7)))
            }
            "checked" => {
                let n = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                match std::panic::catch_unwind(|| dsu_place_checked(n)) {
                    Ok(v) => format!("checked {v}"),
                    Err(p) => {
                        let msg = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        format!("caught {msg}")
                    }
                }
            }
            "trace" => {
                let mut ips = [0usize; 32];
                let n = dsu_place_trace_caller(&mut ips);
                let list: Vec<String> = ips[..n].iter().map(|ip| format!("{ip:#x}")).collect();
                format!("trace {}", list.join(" "))
            }
            "exit" => break,
            other => format!("unknown {other}"),
        };
        println!("{reply}");
        std::io::stdout().flush().unwrap();
    }
}
