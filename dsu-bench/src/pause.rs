//! Pause: the longest time any application thread is held, by an update and by a bare
//! stop/resume of the same threads, in the same process.
//!
//! One child process per (threads, load). It starts the threads, then:
//! 1. before the agent: the agent's own `StopWorld` stop + resume, and the bare
//!    [`Handshake`] with cascaded wake-ups (a diagnostic), from a stopper thread while the
//!    main thread waits blocked, as it would in `apply_bytes`;
//! 2. with the agent installed on the same stop signal, each repetition runs one bare cycle
//!    (from a stopper thread of its own) and one update of a one-function patch plus its
//!    revert (from the agent's thread), reading the update's pause from `Applied::stages`.
//!    Interleaved, bare and update see the same machine; each holds the same threads: the
//!    workers, the main thread and the other stopper, all idle but the workers.

use std::time::Duration;

use dsu_agent::stop::StopWorld;
use serde_json::{Value, json};

use crate::bare::{self, Handshake};
use crate::patches::{self, Placement};
use crate::report::{Table, num, ratio};
use crate::run::{Args, Ctx};
use crate::stats::{Summary, us};
use crate::workers::{Load, Workers};

const PARK_TIMEOUT: Duration = Duration::from_secs(5);
const SETTLE: Duration = Duration::from_millis(2);

/// The agent's policy in the benchmark children: generous timeouts (hundreds of CPU-bound
/// threads on two cores take long to schedule), logging off.
pub fn install_agent() -> Result<dsu_agent::Agent, String> {
    let policy = dsu_agent::Policy {
        timeout: Duration::from_secs(30),
        park_timeout: PARK_TIMEOUT,
        ..Default::default()
    };
    dsu_agent::Builder::new()
        .policy(policy)
        .log(false)
        .install()
        .map_err(|e| format!("install: {e}"))
}

/// Samples of the floor phase, us.
#[derive(Debug, Default)]
struct Floor {
    held: usize,
    bare_total: Vec<f64>,
    bare_stop: Vec<f64>,
    bare_last_exit: Vec<f64>,
    cascade_total: Vec<f64>,
    cascade_last_exit: Vec<f64>,
    sw_total: Vec<f64>,
    sw_stop: Vec<f64>,
}

/// A thread that runs bare cycles on request, so the thread that asks waits blocked, as it
/// does in `apply_bytes`.
struct BareStopper {
    ask: Option<std::sync::mpsc::Sender<()>>,
    answers: std::sync::mpsc::Receiver<Result<bare::Cycle, String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BareStopper {
    fn spawn(mut hs: Handshake) -> BareStopper {
        let (ask, asks) = std::sync::mpsc::channel::<()>();
        let (answer, answers) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            for () in asks {
                let c = hs
                    .cycle(PARK_TIMEOUT, false, true)
                    .map_err(|e| format!("bare cycle: {e}"));
                if answer.send(c).is_err() {
                    break;
                }
            }
        });
        BareStopper {
            ask: Some(ask),
            answers,
            thread: Some(thread),
        }
    }

    fn cycle(&self) -> Result<bare::Cycle, String> {
        self.ask
            .as_ref()
            .ok_or("stopper gone")?
            .send(())
            .map_err(|_| "the stopper thread is gone")?;
        self.answers
            .recv()
            .map_err(|_| "the stopper thread is gone")?
    }
}

impl Drop for BareStopper {
    fn drop(&mut self) {
        self.ask = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `child pause threads=N load=idle|busy reps=R patch=PATH`
pub fn child(args: &Args) -> Result<Value, String> {
    let n: usize = args.num("threads")?;
    let load = Load::parse(args.str("load")?).ok_or("load= idle or busy")?;
    let reps: usize = args.num("reps")?;
    let patch = args.bytes("patch")?;
    let workers = Workers::spawn(n, load);
    std::thread::sleep(Duration::from_millis(50));

    // Phase 1, before the agent: the agent's own StopWorld cycle, and the bare cycle with
    // cascaded wake-ups (a diagnostic), on a stopper thread while main waits.
    let stop_sig = bare::agent_stop_signal();
    let (mut f, hs) = std::thread::spawn(move || -> Result<_, String> {
        let mut hs = Handshake::install(stop_sig + 1).map_err(|e| format!("handshake: {e}"))?;
        let mut world = StopWorld::new(stop_sig).map_err(|e| format!("StopWorld: {e}"))?;
        world.prepare().map_err(|e| format!("prepare: {e}"))?;
        let mut f = Floor::default();
        for _ in 0..reps {
            let c = bare::stop_world_cycle(&mut world, PARK_TIMEOUT)
                .map_err(|e| format!("StopWorld cycle: {e}"))?;
            f.sw_total.push(us(c.total));
            f.sw_stop.push(us(c.stop));
            std::thread::sleep(SETTLE);
            let c = hs
                .cycle(PARK_TIMEOUT, true, true)
                .map_err(|e| format!("bare cycle: {e}"))?;
            f.cascade_total.push(us(c.total));
            f.cascade_last_exit.extend(c.last_exit.map(us));
            std::thread::sleep(SETTLE);
        }
        Ok((f, hs))
    })
    .join()
    .map_err(|_| "the stopper thread panicked")??;

    // What reading /proc/self/maps costs here: the agent reads it while the world is stopped
    // (stack bounds) and twice more per apply before (code, placement).
    let maps_read: Vec<f64> = (0..50)
        .map(|_| {
            let t = std::time::Instant::now();
            let _ = std::hint::black_box(dsu_sys::maps::read_self());
            us(t.elapsed())
        })
        .collect();

    // Phase 2: the agent installed. Each repetition: one bare cycle (from a stopper thread
    // of its own, main waiting), then one update and its revert (from the agent's thread,
    // main waiting in `apply_bytes`). Interleaved, so both see the same machine. Each holds
    // the workers, main and the other stopper, idle.
    let agent = install_agent()?;
    // One untimed round: the symbol index and call sites are built on first use.
    agent
        .apply_bytes(patch.clone(), "pause-warm-up")
        .map_err(|e| format!("apply: {e}"))?;
    agent.revert(None).map_err(|e| format!("revert: {e}"))?;
    let mut hs = hs;
    hs.exclude_agent_threads();
    let bare_stopper = BareStopper::spawn(hs);
    let mut st: [Vec<f64>; 7] = Default::default();
    let mut revert_pause = Vec::new();
    let mut attempts = Vec::new();
    for _ in 0..reps {
        let c = bare_stopper.cycle()?;
        f.held = c.threads;
        f.bare_total.push(us(c.total));
        f.bare_stop.push(us(c.stop));
        f.bare_last_exit.extend(c.last_exit.map(us));
        std::thread::sleep(SETTLE);
        let a = agent
            .apply_bytes(patch.clone(), "pause")
            .map_err(|e| format!("apply: {e}"))?;
        let s = a.stages;
        for (v, d) in st.iter_mut().zip([
            s.pause(),
            s.stop + s.check + s.write,
            s.stop,
            s.check,
            s.write,
            s.resume,
            a.elapsed,
        ]) {
            v.push(us(d));
        }
        attempts.push(f64::from(a.attempts));
        std::thread::sleep(SETTLE);
        let r = agent.revert(None).map_err(|e| format!("revert: {e}"))?;
        revert_pause.push(us(r.stages.pause()));
        std::thread::sleep(SETTLE);
    }
    drop(bare_stopper);
    let floor = f;
    drop(workers);
    let [pause, to_release, stop, check, write, resume, elapsed] =
        st.map(|v| Summary::of(&v).json());
    let sum = |v: &[f64]| Summary::of(v).json();
    Ok(json!({
        "threads": n,
        "load": load.as_str(),
        "held": floor.held,
        "reps": reps,
        "bare_us": {"total": sum(&floor.bare_total), "stop": sum(&floor.bare_stop),
                    "last_exit": sum(&floor.bare_last_exit)},
        "bare_cascade_us": {"total": sum(&floor.cascade_total),
                            "last_exit": sum(&floor.cascade_last_exit)},
        "stopworld_us": {"total": sum(&floor.sw_total), "stop": sum(&floor.sw_stop)},
        "update_us": {"pause": pause, "stop_check_write": to_release, "stop": stop,
                      "check": check, "write": write, "resume": resume, "elapsed": elapsed},
        "revert_pause_us": Summary::of(&revert_pause).json(),
        "maps_read_us": sum(&maps_read),
        "attempts": Summary::of(&attempts).json(),
    }))
}

fn get(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_f64()
        .unwrap_or(f64::NAN)
}

/// Runs every configuration; prints the tables; returns the JSON of the section.
pub fn run(ctx: &Ctx) -> Result<Value, String> {
    let patch = ctx.patch(
        "pause_one",
        &patches::changed_targets(0..1, Placement::InPlace),
    )?;
    // (threads, load, repetitions, in short mode). CPU-bound threads that outnumber the cores
    // make every cycle last hundreds of milliseconds: few repetitions there.
    let configs: [(usize, Load, usize, usize); 8] = [
        (1, Load::Idle, 300, 20),
        (8, Load::Idle, 300, 20),
        (64, Load::Idle, 150, 10),
        (256, Load::Idle, 60, 4),
        (1, Load::Busy, 200, 10),
        (8, Load::Busy, 200, 10),
        (64, Load::Busy, 30, 2),
        (256, Load::Busy, 15, 1),
    ];
    let mut rows = Vec::new();
    let mut table = Table::new(
        "Pause: longest hold of application threads, update vs bare stop/resume, us \
         (until the release call returned, as the agent counts it)",
        &[
            "threads",
            "load",
            "bare p50",
            "bare p99",
            "StopWorld p50",
            "update p50",
            "update p99",
            "update max",
            "stop|check|write|resume p50",
            "update/bare",
            "update/StopWorld",
        ],
    );
    let mut wake = Table::new(
        "Pause, seen from the threads: until the last thread left the handler, us (bare cycle)",
        &[
            "threads",
            "load",
            "release returned p50",
            "last thread out p50",
            "last out p99",
            "cascade: last out p50",
            "cascade p99",
            "update stop+check+write p50",
            "read /proc/self/maps p50",
        ],
    );
    for (n, load, full, quick) in configs {
        let mut v = ctx.child(
            "pause",
            &[
                ("threads", n.to_string()),
                ("load", load.as_str().to_string()),
                ("reps", ctx.reps(full, quick).to_string()),
                ("patch", patch.display().to_string()),
            ],
        )?;
        let g = |path: &[&str]| get(&v, path);
        let bare = g(&["bare_us", "total", "p50"]);
        let sw = g(&["stopworld_us", "total", "p50"]);
        let upd = g(&["update_us", "pause", "p50"]);
        let split = ["stop", "check", "write", "resume"]
            .iter()
            .map(|s| num(g(&["update_us", s, "p50"]), 0))
            .collect::<Vec<_>>()
            .join("|");
        let threads = format!("{n}+2");
        table.row(vec![
            threads.clone(),
            load.as_str().to_string(),
            num(bare, 0),
            num(g(&["bare_us", "total", "p99"]), 0),
            num(sw, 0),
            num(upd, 0),
            num(g(&["update_us", "pause", "p99"]), 0),
            num(g(&["update_us", "pause", "max"]), 0),
            split,
            ratio(upd / bare),
            ratio(upd / sw),
        ]);
        wake.row(vec![
            threads,
            load.as_str().to_string(),
            num(bare, 0),
            num(g(&["bare_us", "last_exit", "p50"]), 0),
            num(g(&["bare_us", "last_exit", "p99"]), 0),
            num(g(&["bare_cascade_us", "last_exit", "p50"]), 0),
            num(g(&["bare_cascade_us", "last_exit", "p99"]), 0),
            num(g(&["update_us", "stop_check_write", "p50"]), 0),
            num(g(&["maps_read_us", "p50"]), 0),
        ]);
        v["ratio_update_to_bare_p50"] = json!(crate::stats::round3(upd / bare));
        v["ratio_update_to_stopworld_p50"] = json!(crate::stats::round3(upd / sw));
        rows.push(v);
    }
    table.print();
    println!(
        "threads: N workers + 2 idle (the requester, main, and the other stopper), all held. \
         bare: list, signal, wait until parked, release (futex wake), interleaved with the \
         updates in the same process. StopWorld: the agent's stop + resume alone, before the \
         agent was installed."
    );
    wake.print();
    Ok(json!({ "configs": rows, "goal_ratio": 1.5 }))
}
