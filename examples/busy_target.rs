//! A patchable Rust program with busy threads, driven over stdin; the end-to-end tests use it.
//!
//! `busy_target [WORKERS]` installs the agent, prints `ready <pid>` and the addresses of its
//! patchable functions, then starts WORKERS threads that call `dsu_fixture_compute` in tight
//! loops, allocating and printing to stderr, and count results that no version of the function
//! can produce. Commands, one per line, each answered by one line:
//!
//! - `compute` -> `compute <dsu_fixture_compute(7)>`
//! - `block` / `unblock` -> a thread enters / leaves `dsu_fixture_block` (blocked in `read`);
//!   the reply `blocking` comes once the thread is inside the `read` system call
//! - `spin` / `unspin` -> a thread enters / leaves `dsu_fixture_spin` (a loop without calls);
//!   the reply `spinning` comes once the function has marked itself inside
//! - `errors` -> `errors <n> calls <n>`: impossible results seen by workers, total calls
//! - `last` -> `last <v>`: the result a worker got most recently
//! - `exit`

use std::hint::black_box;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Versions the tests apply: 7 -> 8 (original), 70 (x * 10), 71 (x * 10 + 1), 700 (x * 100).
const VALID: [u64; 4] = [8, 70, 71, 700];

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dsu_fixture_compute(x: u64) -> u64 {
    black_box(x) + 1
}

/// Blocks in `read(fd)` until a byte arrives.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dsu_fixture_block(fd: i32) -> u64 {
    let mut byte = 0u8;
    // SAFETY: reads one byte into a live local.
    let n = unsafe { libc::read(fd, (&raw mut byte).cast(), 1) };
    black_box(n as u64)
}

/// Spin states shared by the caller and `dsu_fixture_spin` (and any version of it).
const SPIN_STARTING: u32 = 0;
const SPIN_INSIDE: u32 = 1;
const SPIN_STOP: u32 = 2;

/// Marks `*state` inside (from starting), then spins until it is set to stop. The loop makes
/// no call even in a debug build (the load is inline assembly), so a thread here has its
/// program counter in this function, not a return address. Any version must keep this
/// contract: the caller waits for "inside" before it answers `spinning`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dsu_fixture_spin(state: &AtomicU32) -> u64 {
    let _ = state.compare_exchange(
        SPIN_STARTING,
        SPIN_INSIDE,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let at = state.as_ptr();
    let mut n = 0u64;
    loop {
        let now: u32;
        // SAFETY: a 4-byte load from `at`, which points into the live, aligned atomic behind
        // `state`; reading it while others write it atomically is what `AtomicU32` allows.
        unsafe {
            std::arch::asm!(
                "mov {now:e}, dword ptr [{at}]",
                at = in(reg) at,
                now = out(reg) now,
                options(nostack, readonly, preserves_flags)
            );
        }
        if now == SPIN_STOP {
            break;
        }
        n = n.wrapping_add(1);
    }
    black_box(n) & 1
}

static ERRORS: AtomicU64 = AtomicU64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);
static LAST: AtomicU64 = AtomicU64::new(0);
/// The spinning thread's state: `SPIN_STARTING`, `SPIN_INSIDE`, `SPIN_STOP`.
static SPIN: AtomicU32 = AtomicU32::new(SPIN_STARTING);
/// Thread id of the thread that calls `dsu_fixture_block`, 0 before it runs.
static BLOCK_TID: AtomicI32 = AtomicI32::new(0);

/// Whether thread `tid` of this process is inside the `read` system call (number 0).
fn in_read(tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall"))
        .is_ok_and(|s| s.starts_with("0 "))
}

/// Waits up to 5 s for `ready`; false when it never came, so that the reply says so instead
/// of claiming the thread got there.
fn wait_until(ready: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ready() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

fn worker(id: usize) {
    let mut i = 0u64;
    loop {
        let v = dsu_fixture_compute(black_box(7));
        if !VALID.contains(&v) {
            ERRORS.fetch_add(1, Ordering::Relaxed);
        }
        CALLS.fetch_add(1, Ordering::Relaxed);
        LAST.store(v, Ordering::Relaxed);
        i += 1;
        if i.is_multiple_of(20_000) {
            let note = format!("worker {id}: {i} calls, last {v}");
            let boxed: Vec<u8> = note.clone().into_bytes();
            eprintln!("{}", String::from_utf8_lossy(&boxed));
        }
    }
}

fn main() {
    let agent = match dsu_agent::Builder::new().log(true).install() {
        Ok(agent) => agent,
        Err(e) => {
            eprintln!("busy_target: {e}");
            std::process::exit(1);
        }
    };
    let workers: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {}", std::process::id()).unwrap();
    writeln!(
        out,
        "addresses compute={:#x} block={:#x} spin={:#x} control={}",
        dsu_fixture_compute as *const () as usize,
        dsu_fixture_block as *const () as usize,
        dsu_fixture_spin as *const () as usize,
        agent.control_dir().display()
    )
    .unwrap();
    out.flush().unwrap();
    drop(out);
    for id in 0..workers {
        std::thread::spawn(move || worker(id));
    }

    let mut pipe = [0i32; 2];
    // SAFETY: `pipe` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let mut blocked: Option<JoinHandle<u64>> = None;
    let mut spinning: Option<JoinHandle<u64>> = None;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let reply = match line.trim() {
            "compute" => format!("compute {}", dsu_fixture_compute(black_box(7))),
            "block" => {
                let fd = pipe[0];
                BLOCK_TID.store(0, Ordering::SeqCst);
                blocked = Some(std::thread::spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    BLOCK_TID.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                    dsu_fixture_block(fd)
                }));
                let inside = wait_until(|| {
                    let tid = BLOCK_TID.load(Ordering::SeqCst);
                    tid != 0 && in_read(tid)
                });
                if inside {
                    "blocking"
                } else {
                    "timed out: the thread never blocked in read"
                }
                .to_string()
            }
            "unblock" => {
                // SAFETY: writes one byte from a live buffer to our own pipe.
                unsafe { libc::write(pipe[1], b"x".as_ptr().cast(), 1) };
                let r = blocked.take().map_or(0, |h| h.join().unwrap());
                format!("unblocked {r}")
            }
            "spin" => {
                SPIN.store(SPIN_STARTING, Ordering::SeqCst);
                spinning = Some(std::thread::spawn(|| dsu_fixture_spin(&SPIN)));
                let inside = wait_until(|| SPIN.load(Ordering::SeqCst) == SPIN_INSIDE);
                if inside {
                    "spinning"
                } else {
                    "timed out: the thread never entered spin"
                }
                .to_string()
            }
            "unspin" => {
                SPIN.store(SPIN_STOP, Ordering::SeqCst);
                let r = spinning.take().map_or(0, |h| h.join().unwrap());
                format!("unspun {r}")
            }
            "errors" => format!(
                "errors {} calls {}",
                ERRORS.load(Ordering::Relaxed),
                CALLS.load(Ordering::Relaxed)
            ),
            "last" => format!("last {}", LAST.load(Ordering::Relaxed)),
            "exit" => break,
            other => format!("unknown {other}"),
        };
        println!("{reply}");
    }
}
