//! Stop-the-world and activeness check on real threads with real signals.
//!
//! Its own test binary (process): it installs signal handlers and stops every thread. Tests
//! run one at a time behind `SERIAL`, and each joins the threads it started.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dsu_agent::check::{Checker, How, Ranges};
use dsu_agent::stop::{ParkedThread, StackBounds, StopError, StopWorld, Stopped, stack_bounds};
use dsu_agent::unwind::WalkEnd;
use dsu_sys::threads;
use object::{Object, ObjectSection, ObjectSymbol};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn stop_signal() -> i32 {
    dsu_sys::signal::rt_min() + 5
}

const TIMEOUT: Duration = Duration::from_secs(5);

fn world() -> StopWorld {
    let mut w = StopWorld::new(stop_signal()).expect("install stop handler");
    w.prepare().expect("prepare");
    w
}

/// Prepares (cheap when nothing grew) and stops.
fn stop(w: &mut StopWorld, timeout: Duration) -> Stopped<'_> {
    w.prepare().expect("prepare");
    w.stop(timeout)
        .unwrap_or_else(|e| panic!("stop failed: {e}"))
}

/// Bumped by every worker loop iteration: frozen while the world is stopped.
static PROGRESS: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Spin,
    Sleep,
    Pipe,
    Alloc,
}

struct Workers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
    tids: Vec<i32>,
    pipes: Vec<(i32, i32)>,
}

impl Workers {
    fn spawn(kinds: &[Kind]) -> Workers {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let mut handles = Vec::new();
        let mut pipes = Vec::new();
        for &kind in kinds {
            let stop = Arc::clone(&stop);
            let tx = tx.clone();
            let fd = if let Kind::Pipe = kind {
                let p = pipe();
                pipes.push(p);
                p.0
            } else {
                -1
            };
            handles.push(std::thread::spawn(move || {
                tx.send(threads::gettid()).unwrap();
                worker(kind, &stop, fd)
            }));
        }
        let tids = (0..kinds.len()).map(|_| rx.recv().unwrap()).collect();
        Workers {
            stop,
            handles,
            tids,
            pipes,
        }
    }

    fn join(self) {
        self.stop.store(true, Ordering::SeqCst);
        for &(r, w) in &self.pipes {
            write_byte(w);
            let _ = r;
        }
        for h in self.handles {
            h.join().unwrap();
        }
        for (r, w) in self.pipes {
            close(r);
            close(w);
        }
    }
}

fn worker(kind: Kind, stop: &AtomicBool, fd: i32) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        PROGRESS.fetch_add(1, Ordering::Relaxed);
        match kind {
            Kind::Spin => {
                std::hint::black_box(n);
            }
            Kind::Sleep => std::thread::sleep(Duration::from_micros(200)),
            Kind::Pipe => {
                let mut b = [0u8; 1];
                // SAFETY: reads one byte into a live buffer.
                unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
            }
            Kind::Alloc => {
                let v: Vec<String> = (0..32).map(|i| format!("{i}-{n}")).collect();
                if n.is_multiple_of(512) {
                    println!("worker allocated {}", v.len());
                }
                std::hint::black_box(v);
            }
        }
    }
}

fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a writable array of two ints.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    (fds[0], fds[1])
}

fn write_byte(fd: i32) {
    // SAFETY: writes one byte from a live buffer.
    unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
}

fn close(fd: i32) {
    // SAFETY: closes a descriptor this test owns.
    unsafe { libc::close(fd) };
}

/// What a stop looked like, recorded without allocating while threads are stopped (a parked
/// thread may hold the malloc lock) and checked after they run again.
struct Snapshot {
    parked: Vec<ParkedThread>,
    /// The stack mapping each parked thread's `rsp` points into, looked up while stopped.
    stacks: Vec<Option<StackBounds>>,
    listed: Vec<i32>,
    dirents: Vec<u8>,
    count: usize,
    /// State letters of listed threads that were not parked (exiting threads), by index.
    states: Vec<u8>,
    progress_frozen: bool,
}

impl Snapshot {
    fn new() -> Snapshot {
        Snapshot {
            parked: Vec::with_capacity(4096),
            stacks: Vec::with_capacity(4096),
            listed: vec![0; 4096],
            dirents: vec![0; 16384],
            count: 0,
            states: vec![0; 4096],
            progress_frozen: false,
        }
    }

    /// Records `stopped`. Allocates nothing.
    fn record(&mut self, stopped: &Stopped<'_>) {
        self.parked.clear();
        assert!(stopped.threads().len() <= self.parked.capacity());
        self.parked.extend_from_slice(stopped.threads());
        self.stacks.clear();
        self.stacks.extend(
            stopped
                .threads()
                .iter()
                .map(|t| stack_bounds(stopped.maps(), t.regs.rsp as usize, t.alt_stack)),
        );
        self.count = threads::list_into(&mut self.dirents, &mut self.listed).unwrap();
        for i in 0..self.count {
            let tid = self.listed[i];
            self.states[i] = if stopped.threads().iter().any(|t| t.tid == tid) {
                b'P'
            } else {
                threads::state(tid).ok().flatten().unwrap_or(b'-')
            };
        }
        let progress = PROGRESS.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(2));
        self.progress_frozen = progress == PROGRESS.load(Ordering::SeqCst);
    }

    /// Every thread of the process but the caller was parked, once, with sane registers, and
    /// nothing ran while stopped.
    fn check(&self, must_include: &[i32]) {
        assert!(self.progress_frozen, "a worker ran while stopped");
        let me = threads::gettid();
        let mut tids: Vec<i32> = self.parked.iter().map(|t| t.tid).collect();
        tids.sort_unstable();
        let before = tids.len();
        tids.dedup();
        assert_eq!(before, tids.len(), "a thread parked twice");
        assert!(!tids.contains(&me), "the caller parked itself");
        for tid in must_include {
            assert!(tids.contains(tid), "thread {tid} not reported");
        }
        for (tid, state) in self.listed[..self.count].iter().zip(&self.states) {
            // Only an exiting thread (dead, or gone since the listing) may be unparked.
            assert!(
                *tid == me || tids.contains(tid) || matches!(state, b'X' | b'Z' | b'-'),
                "thread {tid} (state {}) runs during the stop",
                *state as char
            );
        }
        for (t, bounds) in self.parked.iter().zip(&self.stacks) {
            let bounds = bounds.unwrap_or_else(|| panic!("thread {} has no stack", t.tid));
            let sp = t.regs.rsp as usize;
            assert!(
                bounds.start <= sp && sp <= bounds.end,
                "thread {}: rsp {sp:#x} outside {bounds:?}",
                t.tid
            );
            assert_ne!(t.regs.rip, 0, "thread {}", t.tid);
        }
    }
}

#[test]
fn stops_every_thread_with_sane_registers() {
    let _s = serial();
    use Kind::*;
    let workers = Workers::spawn(&[Spin, Spin, Sleep, Sleep, Pipe, Pipe, Alloc, Alloc]);
    let mut w = world();
    let mut snap = Snapshot::new();
    let stopped = stop(&mut w, TIMEOUT);
    snap.record(&stopped);
    stopped.resume();
    snap.check(&workers.tids);
    // Everyone runs again.
    let progress = PROGRESS.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(20));
    assert!(PROGRESS.load(Ordering::SeqCst) > progress);
    workers.join();
}

#[test]
fn two_hundred_rounds_in_a_row() {
    let _s = serial();
    use Kind::*;
    let workers = Workers::spawn(&[Spin, Spin, Spin, Sleep, Sleep, Pipe, Alloc, Alloc]);
    let mut w = world();
    let mut worst = Duration::ZERO;
    let started = Instant::now();
    for round in 0..200 {
        let t = Instant::now();
        let stopped = stop(&mut w, TIMEOUT);
        let n = stopped.threads().len();
        for tid in &workers.tids {
            assert!(
                stopped.threads().iter().any(|t| t.tid == *tid),
                "round {round}: {tid}"
            );
        }
        drop(stopped);
        worst = worst.max(t.elapsed());
        assert!(n >= workers.tids.len());
    }
    println!(
        "200 rounds with {} workers: {:?} total, worst {:?}",
        workers.tids.len(),
        started.elapsed(),
        worst
    );
    workers.join();
}

/// A thread that sleeps with the stop signal blocked ends the round at once (it may wait for
/// what a parked thread holds), named, however long the stop would wait.
#[test]
fn sleeping_thread_blocking_the_signal_ends_the_round() {
    blocking_the_signal_is_named(false);
}

/// One that runs with it blocked is waited for until the timeout, then named.
#[test]
fn running_thread_blocking_the_signal_is_named_at_the_timeout() {
    blocking_the_signal_is_named(true);
}

fn blocking_the_signal_is_named(spin: bool) {
    let _s = serial();
    let workers = Workers::spawn(&[Kind::Spin, Kind::Sleep]);
    let (tid_tx, tid_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let blocker = std::thread::spawn(move || {
        set_blocked(stop_signal(), true);
        tid_tx.send(threads::gettid()).unwrap();
        if spin {
            while go_rx.try_recv().is_err() {
                std::hint::spin_loop();
            }
        } else {
            go_rx.recv().unwrap();
        }
        // The pending stop signal arrives now, with no stop in progress: it must return.
        set_blocked(stop_signal(), false);
    });
    let blocked = tid_rx.recv().unwrap();
    let mut w = world();
    // A sleeper must be given up on long before this; a spinner only at it.
    let timeout = if spin {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(30)
    };
    match (spin, w.stop(timeout)) {
        (true, Err(StopError::NotParked { tid, .. }))
        | (false, Err(StopError::SignalBlocked { tid, .. })) => assert_eq!(tid, blocked),
        (_, other) => panic!(
            "spin {spin}: expected {}, got {:?}",
            if spin { "NotParked" } else { "SignalBlocked" },
            other.map(|s| s.threads().len())
        ),
    }
    // The others were let go.
    let progress = PROGRESS.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        PROGRESS.load(Ordering::SeqCst) > progress,
        "workers still parked"
    );
    go_tx.send(()).unwrap();
    blocker.join().unwrap();
    // A late signal left nobody parked, and stopping works again.
    let mut snap = Snapshot::new();
    let stopped = stop(&mut w, TIMEOUT);
    snap.record(&stopped);
    drop(stopped);
    snap.check(&workers.tids);
    workers.join();
}

fn set_blocked(sig: i32, blocked: bool) {
    // SAFETY: plain sigset manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        let how = if blocked {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        assert_eq!(libc::pthread_sigmask(how, &set, std::ptr::null_mut()), 0);
    }
}

#[test]
fn threads_created_during_stop_are_stopped() {
    let _s = serial();
    let stop_flag = Arc::new(AtomicBool::new(false));
    let spawned = Arc::new(AtomicUsize::new(0));
    let spawners: Vec<_> = (0..2)
        .map(|_| {
            let stop_flag = Arc::clone(&stop_flag);
            let spawned = Arc::clone(&spawned);
            std::thread::spawn(move || {
                while !stop_flag.load(Ordering::Relaxed) {
                    let kids: Vec<_> = (0..4)
                        .map(|_| {
                            std::thread::spawn(|| {
                                for _ in 0..100 {
                                    PROGRESS.fetch_add(1, Ordering::Relaxed);
                                    std::hint::spin_loop();
                                }
                            })
                        })
                        .collect();
                    spawned.fetch_add(kids.len(), Ordering::Relaxed);
                    for k in kids {
                        k.join().unwrap();
                    }
                }
            })
        })
        .collect();
    let workers = Workers::spawn(&[Kind::Spin]);
    let mut w = world();
    let mut snap = Snapshot::new();
    for _ in 0..100 {
        let stopped = stop(&mut w, TIMEOUT);
        snap.record(&stopped);
        let s1 = spawned.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_micros(500));
        let s2 = spawned.load(Ordering::SeqCst);
        drop(stopped);
        assert_eq!(s1, s2, "a spawner ran while stopped");
        snap.check(&workers.tids);
    }
    assert!(spawned.load(Ordering::SeqCst) > 0);
    stop_flag.store(true, Ordering::SeqCst);
    for s in spawners {
        s.join().unwrap();
    }
    workers.join();
}

#[test]
fn refuses_a_signal_with_a_foreign_handler() {
    let _s = serial();
    let sig = dsu_sys::signal::rt_min() + 7;
    // SAFETY: `noop` only returns.
    unsafe { dsu_sys::signal::install(sig, noop, dsu_sys::signal::BlockDuring::Nothing) }.unwrap();
    assert!(matches!(
        StopWorld::new(sig),
        Err(StopError::SignalInUse { .. } | StopError::OtherSignal { .. })
    ));
    let _w = world();
    assert!(matches!(
        StopWorld::new(stop_signal()),
        Err(StopError::Busy)
    ));
}

/// A program that puts its own handler over the stop signal after the agent installed its
/// own: the next stop names that handler before it signals any thread (signalled, the threads
/// would run the program's handler and never park).
#[test]
fn a_handler_put_over_the_stop_signal_later_is_named_at_the_next_stop() {
    let _s = serial();
    let mut w = world();
    let sig = stop_signal();
    // SAFETY: zeroed `sigaction`s are valid (no handler, empty mask); `noop` only returns.
    let (mut ours, mut theirs): (libc::sigaction, libc::sigaction) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    theirs.sa_sigaction = noop as *const () as usize;
    theirs.sa_flags = libc::SA_SIGINFO;
    // SAFETY: both point to valid `sigaction`s; the old one is kept to put back.
    assert_eq!(unsafe { libc::sigaction(sig, &theirs, &mut ours) }, 0);
    w.prepare().expect("prepare");
    let got = w.stop(TIMEOUT).map(|_| ());
    // SAFETY: puts the agent's handler back, as it was.
    let restored = unsafe { libc::sigaction(sig, &ours, std::ptr::null_mut()) };
    assert_eq!(restored, 0);
    match got {
        Err(StopError::SignalInUse { sig: s, handler }) => {
            assert_eq!(s, sig);
            assert_eq!(handler, noop as *const () as usize);
        }
        other => panic!("expected SignalInUse, got {other:?}"),
    }
    // With its handler back, the world stops again.
    drop(stop(&mut w, TIMEOUT));
}

extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

// ---- activeness ----

/// Spins while `*flag != 0`, with no call inside (inline assembly, so even a debug build
/// keeps the loop inside this function).
#[inline(never)]
extern "C" fn spin_target(flag: *const u8) {
    // SAFETY: reads a byte the caller keeps alive until it is cleared.
    unsafe {
        std::arch::asm!(
            "2:",
            "pause",
            "cmp byte ptr [{0}], 0",
            "jne 2b",
            in(reg) flag,
            options(nostack, readonly),
        )
    }
}

/// Same as `spin_target`, a distinct function: the code a signal interrupts.
#[inline(never)]
extern "C" fn spin_interrupted_target(flag: *const u8) {
    // SAFETY: as in `spin_target`.
    unsafe {
        std::arch::asm!(
            "2:",
            "pause",
            "cmp byte ptr [{0}], 0",
            "jne 2b",
            "nop",
            in(reg) flag,
            options(nostack, readonly),
        )
    }
}

/// Blocks in `read(2)` (inside the C library) until a byte arrives.
#[inline(never)]
extern "C" fn read_target(fd: i32) -> isize {
    let mut b = [0u8; 1];
    // SAFETY: reads one byte into a live buffer.
    let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
    std::hint::black_box(n)
}

/// Never called by anyone.
#[inline(never)]
extern "C" fn idle_target(x: u64) -> u64 {
    std::hint::black_box(x.wrapping_mul(3))
}

/// `[start, end)` of the function at run-time address `addr`, from the executable's symbols.
fn fn_range(addr: usize) -> (usize, usize) {
    let modules = dsu_sys::modules::loaded();
    let main = modules.iter().find(|m| m.is_main).expect("main module");
    let data = std::fs::read("/proc/self/exe").unwrap();
    let file = object::File::parse(&*data).unwrap();
    let link = (addr - main.bias) as u64;
    let sym = file
        .symbols()
        .find(|s| s.address() == link && s.size() > 0)
        .unwrap_or_else(|| panic!("no symbol at {addr:#x}"));
    (addr, addr + sym.size() as usize)
}

/// A checker knowing the modules' code but only the executable's unwind information, given as
/// a `.eh_frame` address and length (the way patches register theirs).
fn unsafe_checker_with_registered_exe_eh_frame() -> Checker {
    let modules: Vec<_> = dsu_sys::modules::loaded()
        .into_iter()
        .map(|mut m| {
            m.eh_frame_hdr = None;
            m
        })
        .collect();
    let main = modules.iter().find(|m| m.is_main).unwrap();
    let data = std::fs::read("/proc/self/exe").unwrap();
    let file = object::File::parse(&*data).unwrap();
    let section = file.section_by_name(".eh_frame").expect(".eh_frame");
    let start = main.bias + section.address() as usize;
    // SAFETY: records of loaded modules (minus their unwind tables); the executable's
    // `.eh_frame` is mapped at its biased address for the life of the process.
    let mut checker = unsafe { Checker::new(&modules) };
    // SAFETY: as above.
    let n = unsafe { checker.add_eh_frame(start, section.size() as usize) }.unwrap();
    assert!(n > 100, "{n} FDEs");
    checker
}

static SIGNAL_PIPE: AtomicU64 = AtomicU64::new(0);
static IN_HANDLER: AtomicBool = AtomicBool::new(false);

/// SIGUSR1 handler: blocks reading the signal pipe (a test-only handler: `read` is
/// async-signal-safe).
extern "C" fn blocking_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IN_HANDLER.store(true, Ordering::SeqCst);
    handler_read(SIGNAL_PIPE.load(Ordering::SeqCst) as i32);
    IN_HANDLER.store(false, Ordering::SeqCst);
}

#[inline(never)]
fn handler_read(fd: i32) {
    let mut b = [0u8; 1];
    // SAFETY: reads one byte into a live buffer.
    unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
}

#[test]
fn activeness_pc_return_address_signal_frame_and_inactive() {
    let _s = serial();
    let spin = fn_range(spin_target as *const () as usize);
    let interrupted = fn_range(spin_interrupted_target as *const () as usize);
    let read = fn_range(read_target as *const () as usize);
    let idle = fn_range(idle_target as *const () as usize);
    std::hint::black_box(idle_target(1));

    // Thread A spins in `spin_target`.
    let flag_a = Box::leak(Box::new(1u8)) as *mut u8 as usize;
    let (tx, rx) = mpsc::channel();
    let txa = tx.clone();
    let a = std::thread::spawn(move || {
        txa.send(('a', threads::gettid())).unwrap();
        spin_target(flag_a as *const u8);
    });
    // Thread B blocks in `read` called from `read_target`.
    let (rb, wb) = pipe();
    let txb = tx.clone();
    let b = std::thread::spawn(move || {
        txb.send(('b', threads::gettid())).unwrap();
        read_target(rb);
    });
    // Thread C spins in `spin_interrupted_target`, then a SIGUSR1 handler blocks on it.
    let (rc, wc) = pipe();
    SIGNAL_PIPE.store(rc as u64, Ordering::SeqCst);
    // SAFETY: a test-only handler; it only reads a pipe and stores atomics.
    unsafe {
        dsu_sys::signal::install(
            libc::SIGUSR1,
            blocking_handler,
            dsu_sys::signal::BlockDuring::Nothing,
        )
    }
    .unwrap();
    let flag_c = Box::leak(Box::new(1u8)) as *mut u8 as usize;
    let txc = tx.clone();
    let c = std::thread::spawn(move || {
        txc.send(('c', threads::gettid())).unwrap();
        spin_interrupted_target(flag_c as *const u8);
    });
    let mut got: Vec<(char, i32)> = (0..3).map(|_| rx.recv().unwrap()).collect();
    got.sort_unstable();
    let [(_, tid_a), (_, tid_b), (_, tid_c)] = got[..] else {
        panic!("{got:?}")
    };
    let tids = [tid_a, tid_b, tid_c];
    std::thread::sleep(Duration::from_millis(50));
    threads::tgkill(tid_c, libc::SIGUSR1).unwrap();
    while !IN_HANDLER.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));

    let ranges: Ranges = [
        (spin.0, spin.1, 0),
        (read.0, read.1, 1),
        (interrupted.0, interrupted.1, 2),
        (idle.0, idle.1, 3),
    ]
    .into_iter()
    .collect();
    let only_idle: Ranges = [(idle.0, idle.1, 3)].into_iter().collect();

    let mut checker = Checker::for_loaded_modules();
    assert!(
        checker.tables().skipped().is_empty(),
        "{:?}",
        checker.tables().skipped()
    );
    // The executable's `.eh_frame` registered as if it were a patch's: its own FDE index.
    let mut registered = unsafe_checker_with_registered_exe_eh_frame();
    // A checker with the modules' code but none of their unwind tables: scan only.
    let stripped: Vec<_> = dsu_sys::modules::loaded()
        .into_iter()
        .map(|mut m| {
            m.eh_frame_hdr = None;
            m
        })
        .collect();
    // SAFETY: records of loaded modules, minus their unwind tables.
    let mut scan_only = unsafe { Checker::new(&stripped) };

    let mut w = world();
    let mut ends = Vec::with_capacity(4096);
    for _ in 0..20 {
        let stopped = stop(&mut w, TIMEOUT);
        let find = |checker: &mut Checker, tid: i32, ranges: &Ranges| {
            let t = stopped.threads().iter().find(|t| t.tid == tid).unwrap();
            checker.find_active(&stopped, t, ranges).unwrap()
        };
        let act = find(&mut checker, tid_a, &ranges).expect("A active");
        assert_eq!((act.target, act.how, act.tid), (0, How::Pc, tid_a));
        let act = find(&mut checker, tid_b, &ranges).expect("B active");
        assert_eq!(act.target, 1);
        assert!(matches!(act.how, How::ReturnAddress { .. }), "{act:?}");
        let act = find(&mut checker, tid_c, &ranges).expect("C active");
        assert_eq!(act.target, 2);
        assert!(matches!(act.how, How::Interrupted { .. }), "{act:?}");

        // Nobody is in `idle_target`, and the precise walk saw whole stacks.
        ends.clear();
        for t in stopped.threads() {
            let a = checker.find_active(&stopped, t, &only_idle).unwrap();
            assert_eq!(a, None, "thread {}", t.tid);
            ends.push((t.tid, checker.last_walk()));
        }
        // Unwinding with the executable's CFI registered by address and length goes from
        // `spin_target` through the test's and std's frames, up to the C library (whose CFI
        // this checker lacks).
        let t = stopped.threads().iter().find(|t| t.tid == tid_a).unwrap();
        assert_eq!(
            registered.find_active(&stopped, t, &only_idle).unwrap(),
            None
        );
        match registered.last_walk() {
            Some(WalkEnd::Failed { at, .. }) => assert!(at.depth >= 3, "{at:?}"),
            other => panic!("{other:?}"),
        }
        // Scanning alone (the correctness floor) finds the same threads.
        for (tid, target) in [(tid_a, 0), (tid_b, 1), (tid_c, 2)] {
            let a = find(&mut scan_only, tid, &ranges).expect("scan finds it");
            assert_eq!(a.target, target, "{a:?}");
        }
        drop(stopped);
        for &(tid, end) in &ends {
            if tids.contains(&tid) {
                assert_eq!(end, Some(WalkEnd::Outermost), "thread {tid}");
            }
        }
    }

    // Let everyone go.
    // SAFETY: the flags were leaked above and stay valid; the threads poll them.
    unsafe {
        *(flag_a as *mut u8) = 0;
        *(flag_c as *mut u8) = 0;
    }
    write_byte(wb);
    write_byte(wc);
    for h in [a, b, c] {
        h.join().unwrap();
    }
    for fd in [rb, wb, rc, wc] {
        close(fd);
    }
}

/// Prints stop/resume round timings at 1, 8 and 64 worker threads (idle in `sleep`, blocked
/// in `read`, or spinning), back to back and with the threads settled for 20 ms before each
/// stop. Not a test of speed: run with `--ignored --nocapture` to read the figures.
#[test]
#[ignore]
fn print_round_timings() {
    let _s = serial();
    let mut out = std::io::stdout().lock();
    let median = |v: &mut Vec<Duration>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    for n in [1usize, 8, 64] {
        for kind in [Kind::Sleep, Kind::Pipe, Kind::Spin] {
            let workers = Workers::spawn(&vec![kind; n]);
            let mut w = world();
            let total = threads::list().unwrap().len();
            let (mut back_to_back, mut settled) = (Vec::new(), Vec::new());
            for round in 0..100 {
                if round % 2 == 1 {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let t = Instant::now();
                let stopped = w.stop(TIMEOUT).expect("stop");
                drop(stopped);
                let took = t.elapsed();
                if round % 2 == 1 {
                    settled.push(took);
                } else {
                    back_to_back.push(took);
                }
            }
            writeln!(
                out,
                "{n:>3} {kind:?} workers ({total} threads): stop+resume median {:?} back to back, \
                 {:?} after 20 ms",
                median(&mut back_to_back),
                median(&mut settled),
            )
            .unwrap();
            drop(w);
            workers.join();
        }
    }
}

/// Prints how long the activeness check of every thread takes (precise walk, nobody active).
/// Run with `--ignored --nocapture`.
#[test]
#[ignore]
fn print_check_timings() {
    let _s = serial();
    let idle = fn_range(idle_target as *const () as usize);
    let only_idle: Ranges = [(idle.0, idle.1, 0)].into_iter().collect();
    let mut checker = Checker::for_loaded_modules();
    for n in [8usize, 64] {
        let workers = Workers::spawn(&vec![Kind::Pipe; n]);
        let mut w = world();
        let mut times = Vec::with_capacity(100);
        let mut outermost = 0;
        for _ in 0..100 {
            let stopped = stop(&mut w, TIMEOUT);
            let t = Instant::now();
            for th in stopped.threads() {
                assert_eq!(checker.find_active(&stopped, th, &only_idle).unwrap(), None);
                outermost += usize::from(checker.last_walk() == Some(WalkEnd::Outermost));
            }
            times.push((t.elapsed(), stopped.threads().len()));
        }
        times.sort_unstable();
        let (median, threads) = times[times.len() / 2];
        println!(
            "check of {threads} threads: median {median:?}, max {:?}; {outermost} of {} walks reached the outermost frame",
            times[times.len() - 1].0,
            100 * threads
        );
        drop(w);
        workers.join();
    }
}

/// Pushes `fake` (a return address into another function) and then a zero, and spins while
/// `*flag != 0`. Its unwind information says the return address is the word at the stack
/// pointer, which is the zero: a walk ends there as if at the outermost frame, with a live
/// return address above it, as after a stack switch or a clobbered frame.
#[unsafe(naked)]
extern "C" fn zero_return_spin(_flag: *const u8, _fake: usize) {
    std::arch::naked_asm!(
        ".cfi_startproc",
        "push rsi",
        "push 0",
        "2:",
        "pause",
        "cmp byte ptr [rdi], 0",
        "jne 2b",
        "add rsp, 16",
        "ret",
        ".cfi_endproc",
    )
}

/// A zero return address that the CFI does not mark outermost proves nothing about the stack
/// above it: the rest is scanned, and the return address into `idle_target` above the zero
/// makes the thread active (it was reported inactive).
#[test]
fn a_zero_return_address_mid_stack_is_not_the_outermost_frame() {
    let _s = serial();
    let idle = fn_range(idle_target as *const () as usize);
    std::hint::black_box(idle_target(1));
    let flag = Box::leak(Box::new(1u8)) as *mut u8 as usize;
    let fake = idle.0 + 1;
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        tx.send(threads::gettid()).unwrap();
        zero_return_spin(flag as *const u8, fake);
    });
    let tid = rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let only_idle: Ranges = [(idle.0, idle.1, 3)].into_iter().collect();
    let mut checker = Checker::for_loaded_modules();
    let mut w = world();
    let found = {
        let stopped = stop(&mut w, TIMEOUT);
        let th = stopped.threads().iter().find(|t| t.tid == tid).unwrap();
        let found = checker.find_active(&stopped, th, &only_idle);
        stopped.resume();
        found
    };
    // SAFETY: the flag is leaked and only written here.
    unsafe { *(flag as *mut u8) = 0 };
    t.join().unwrap();
    let a = found
        .unwrap()
        .expect("a return address above the zero is active");
    assert_eq!(a.target, 3);
    assert!(matches!(a.how, How::StackScan { .. }), "{a:?}");
    assert!(matches!(
        checker.last_walk(),
        Some(WalkEnd::Failed {
            reason: dsu_agent::unwind::Failure::ZeroReturn,
            ..
        })
    ));
}
