//! Apply latency: from the request to the patch being in effect, split into the engine's
//! stages, in process (`Agent::apply_bytes`) and from outside (`dsu apply`, spawned as an
//! operator runs it, start to exit).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::patches::{self, Placement};
use crate::pause::install_agent;
use crate::report::{Table, num};
use crate::run::{Args, Ctx};
use crate::stats::{Summary, us};
use crate::workers::{Load, Workers};

/// libpulp's `ulp trigger` per process, p50, as `scripts/bench-libpulp.sh` measured it side
/// by side on the 2-core VM of `docs/benchmarks.md` (libpulp 0.3.17, 2026-11-29): the
/// reference for `dsu apply`, which should take at most a third of it. Run that script for
/// the figure of another machine.
pub const ULP_TRIGGER_MS: f64 = 3.12;

const STAGES: [&str; 9] = [
    "wall", "elapsed", "link", "prepare", "survey", "stop", "check", "write", "resume",
];

/// `child apply threads=N reps=R patch=PATH`: N idle workers besides the (blocked) caller.
pub fn child(args: &Args) -> Result<Value, String> {
    let n: usize = args.num("threads")?;
    let reps: usize = args.num("reps")?;
    let patch = args.bytes("patch")?;
    let _workers = Workers::spawn(n, Load::Idle);
    let agent = install_agent()?;
    // The agent builds its symbol index right after install; let it finish, so the first
    // apply measured below is "first" only for the call-site index it builds on first use.
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let first = agent
        .apply_bytes(patch.clone(), "first")
        .map_err(|e| format!("apply: {e}"))?;
    let first_wall = us(t.elapsed());
    let f = first.stages;
    let first_stages: serde_json::Map<String, Value> = STAGES[1..]
        .iter()
        .zip([
            first.elapsed,
            f.link,
            f.prepare,
            f.survey,
            f.stop,
            f.check,
            f.write,
            f.resume,
        ])
        .map(|(name, d)| (name.to_string(), json!(crate::stats::round3(us(d)))))
        .collect();
    let strategies: Vec<&str> = first
        .patch
        .functions
        .iter()
        .map(|f| f.strategy.as_str())
        .collect();
    let call_sites: u32 = first.patch.functions.iter().map(|f| f.call_sites).sum();
    let functions = first.patch.functions.len();
    let in_place = strategies.iter().filter(|s| **s == "in-place").count();
    agent.revert(None).map_err(|e| format!("revert: {e}"))?;

    let mut samples: [Vec<f64>; STAGES.len()] = Default::default();
    let mut pause = Vec::new();
    let mut revert_wall = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let a = agent
            .apply_bytes(patch.clone(), "apply")
            .map_err(|e| format!("apply: {e}"))?;
        let wall = t.elapsed();
        let s = a.stages;
        let values = [
            wall, a.elapsed, s.link, s.prepare, s.survey, s.stop, s.check, s.write, s.resume,
        ];
        for (v, d) in samples.iter_mut().zip(values) {
            v.push(us(d));
        }
        pause.push(us(s.pause()));
        let t = Instant::now();
        agent.revert(None).map_err(|e| format!("revert: {e}"))?;
        revert_wall.push(us(t.elapsed()));
    }
    let mut stages = serde_json::Map::new();
    for (name, v) in STAGES.iter().zip(&samples) {
        stages.insert(name.to_string(), Summary::of(v).json());
    }
    stages.insert("pause".into(), Summary::of(&pause).json());
    Ok(json!({
        "threads": n,
        "functions": functions,
        "in_place": in_place,
        "redirect": functions - in_place,
        "call_sites": call_sites,
        "reps": reps,
        "first_apply_wall_us": crate::stats::round3(first_wall),
        "first_apply_prepare_us": crate::stats::round3(us(first.stages.prepare)),
        "first_apply_stages_us": first_stages,
        "us": Value::Object(stages),
        "revert_wall_us": Summary::of(&revert_wall).json(),
    }))
}

/// `child serve threads=N`: installs the agent, starts N idle workers, prints `ready PID` and
/// runs until its standard input closes: a target for `dsu apply`.
pub fn serve(args: &Args) -> Result<Value, String> {
    let n: usize = args.num("threads")?;
    let _workers = Workers::spawn(n, Load::Idle);
    let _agent = install_agent()?;
    crate::targets::touch_all(1);
    std::thread::sleep(Duration::from_millis(300));
    println!("ready {}", std::process::id());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut sink = String::new();
    while std::io::stdin()
        .read_line(&mut sink)
        .map_err(|e| e.to_string())?
        > 0
    {}
    Ok(json!({}))
}

/// A running `child serve`; killed on drop.
struct Target {
    child: std::process::Child,
    pid: u32,
}

impl Target {
    fn start(ctx: &Ctx, threads: usize, control: &Path) -> Result<Target, String> {
        let mut child = Command::new(&ctx.exe)
            .args(["child", "serve", &format!("threads={threads}")])
            .env("DSU_CONTROL_DIR", control)
            .env("DSU_LOG", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting the target: {e}"))?;
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped"))
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let pid = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("target said {line:?}"))?;
        Ok(Target { child, pid })
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        crate::run::forget_perf_map(self.pid);
    }
}

/// Runs `dsu ARGS` against the target; its wall time from spawn to exit.
fn dsu(ctx: &Ctx, control: &Path, args: &[&str]) -> Result<Duration, String> {
    let t = Instant::now();
    let out = Command::new(ctx.dsu())
        .args(args)
        .env("DSU_CONTROL_DIR", control)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", ctx.dsu().display()))?;
    let wall = t.elapsed();
    if !out.status.success() {
        return Err(format!(
            "dsu {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(wall)
}

/// `dsu apply` of a one-function patch to a target with `threads` idle workers, `reps` times
/// (each followed by an untimed `dsu revert`); also `dsu status`, the tool's own floor.
fn cli(ctx: &Ctx, patch: &Path, threads: usize, reps: usize) -> Result<Value, String> {
    let control = ctx.control_dir(&format!("cli-{threads}"));
    let target = Target::start(ctx, threads, &control)?;
    let pid = target.pid.to_string();
    let patch = patch.to_str().ok_or("patch path is not UTF-8")?;
    // Untimed warm-up (call-site index, page cache of the dsu binary).
    dsu(ctx, &control, &["apply", "-p", &pid, patch])?;
    dsu(ctx, &control, &["revert", "-p", &pid])?;
    let (mut wall, mut agent_elapsed, mut agent_pause, mut status, mut revert) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        wall.push(us(dsu(ctx, &control, &["apply", "-p", &pid, patch])?));
        let result: Value = std::fs::read(control.join("result.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("no result.json after dsu apply")?;
        agent_elapsed.push(result["elapsed_us"].as_f64().unwrap_or(f64::NAN));
        agent_pause.push(result["stages_us"]["pause_us"].as_f64().unwrap_or(f64::NAN));
        status.push(us(dsu(ctx, &control, &["status", "-p", &pid])?));
        revert.push(us(dsu(ctx, &control, &["revert", "-p", &pid])?));
    }
    drop(target);
    let _ = std::fs::remove_dir_all(&control);
    Ok(json!({
        "threads": threads,
        "reps": reps,
        "apply_wall_us": Summary::of(&wall).json(),
        "agent_elapsed_us": Summary::of(&agent_elapsed).json(),
        "agent_pause_us": Summary::of(&agent_pause).json(),
        "status_wall_us": Summary::of(&status).json(),
        "revert_wall_us": Summary::of(&revert).json(),
        "ulp_trigger_ms": ULP_TRIGGER_MS,
    }))
}

/// Runs the in-process and CLI configurations; prints the tables.
pub fn run(ctx: &Ctx) -> Result<Value, String> {
    let one = ctx.patch(
        "apply_one",
        &patches::changed_targets(0..1, Placement::InPlace),
    )?;
    let one_redirect = ctx.patch(
        "apply_one_redirect",
        &patches::changed_targets(0..1, Placement::Redirect),
    )?;
    let fifty = ctx.patch(
        "apply_fifty",
        &patches::changed_targets(0..50, Placement::InPlace),
    )?;
    let reps = ctx.reps(200, 20);
    let configs = [
        (1, &one, "1"),
        (8, &one, "1"),
        (8, &one_redirect, "1 (redirect)"),
        (1, &fifty, "50"),
        (8, &fifty, "50"),
    ];
    let mut table = Table::new(
        "Apply latency in process (Agent::apply_bytes), us",
        &[
            "functions",
            "threads",
            "strategy",
            "wall p50",
            "wall p99",
            "link",
            "prepare",
            "survey",
            "stop",
            "check",
            "write",
            "resume",
            "first apply",
        ],
    );
    let mut rows = Vec::new();
    for (threads, patch, label) in configs {
        // `threads` idle application threads, besides the caller (blocked while it waits).
        let v = ctx.child(
            "apply",
            &[
                ("threads", threads.to_string()),
                ("reps", reps.to_string()),
                ("patch", patch.display().to_string()),
            ],
        )?;
        let p50 = |s: &str| num(v["us"][s]["p50"].as_f64().unwrap_or(f64::NAN), 0);
        let strategy = if v["redirect"].as_u64() == Some(0) {
            "in place".to_string()
        } else {
            format!("redirect, {} call sites", v["call_sites"])
        };
        table.row(vec![
            label.to_string(),
            threads.to_string(),
            strategy,
            p50("wall"),
            num(v["us"]["wall"]["p99"].as_f64().unwrap_or(f64::NAN), 0),
            p50("link"),
            p50("prepare"),
            p50("survey"),
            p50("stop"),
            p50("check"),
            p50("write"),
            p50("resume"),
            num(v["first_apply_wall_us"].as_f64().unwrap_or(f64::NAN), 0),
        ]);
        let mut v = v;
        v["label"] = json!(label);
        rows.push(v);
    }
    table.print();
    let first = first_applies(ctx, &one)?;

    let cli_reps = ctx.reps(100, 10);
    let mut cli_table = Table::new(
        "`dsu apply` start to exit (spawned release binary), one function, 8 threads, ms",
        &[
            "command",
            "p50",
            "p99",
            "min",
            "max",
            "vs ulp trigger (3.12 ms)",
        ],
    );
    let c = cli(ctx, &one, 8, cli_reps)?;
    for (label, key) in [
        ("dsu apply", "apply_wall_us"),
        ("  of which agent (elapsed_us)", "agent_elapsed_us"),
        ("dsu status", "status_wall_us"),
        ("dsu revert", "revert_wall_us"),
    ] {
        let ms = |s: &str| c[key][s].as_f64().unwrap_or(f64::NAN) / 1000.0;
        cli_table.row(vec![
            label.to_string(),
            num(ms("p50"), 2),
            num(ms("p99"), 2),
            num(ms("min"), 2),
            num(ms("max"), 2),
            if key == "apply_wall_us" {
                format!("{:.2} (goal <= 0.33)", ms("p50") / ULP_TRIGGER_MS)
            } else {
                String::new()
            },
        ]);
    }
    cli_table.print();
    Ok(json!({ "in_process": rows, "first": first, "cli": c }))
}

/// The first apply of a process, one function, 8 idle threads, in many processes: one sample
/// per process, so the table above gives one figure per row, which the noise of a shared
/// machine can double. Beside it, the p50 of the later applies of the same processes.
fn first_applies(ctx: &Ctx, patch: &Path) -> Result<Value, String> {
    let processes = ctx.reps(30, 5);
    let (mut first, mut later) = (Vec::new(), Vec::new());
    for _ in 0..processes {
        let v = ctx.child(
            "apply",
            &[
                ("threads", "8".to_string()),
                ("reps", ctx.reps(30, 5).to_string()),
                ("patch", patch.display().to_string()),
            ],
        )?;
        first.push(v["first_apply_wall_us"].as_f64().unwrap_or(f64::NAN));
        later.push(v["us"]["wall"]["p50"].as_f64().unwrap_or(f64::NAN));
    }
    let (first, later) = (Summary::of(&first), Summary::of(&later));
    let mut table = Table::new(
        &format!("First apply of a process, one function, 8 threads, {processes} processes, us"),
        &["figure", "p50", "min", "max"],
    );
    for (label, s) in [
        ("first apply (one per process)", &first),
        ("later applies (p50 of each process)", &later),
    ] {
        table.row(vec![
            label.to_string(),
            num(s.p50, 0),
            num(s.min, 0),
            num(s.max, 0),
        ]);
    }
    table.print();
    Ok(json!({
        "processes": processes,
        "first_apply_wall_us": first.json(),
        "later_wall_p50_us": later.json(),
    }))
}
