//! Steady state: what a call costs with no agent, with the agent installed and nothing
//! patched, and after patching to the same code (in place, redirect through the entry jump,
//! rewritten direct call site); and the peer, retour, side by side: its detour's per-call cost
//! and the time to install one, against `apply_bytes` of the same change.
//!
//! All in one child process, in this order:
//! 1. no agent: `rounds` of every call loop;
//! 2. agent installed, nothing patched: the same;
//! 3. paired rounds: unpatched, then patched (two dsu patches applied), then reverted again,
//!    so each patched figure has an unpatched one taken moments before it: the ratio per
//!    round is free of the machine's drift;
//! 4. install times of dsu `apply_bytes` (in place and redirect), undone untimed in between;
//! 5. the same paired rounds and install times for a retour detour (`GenericDetour::new` +
//!    `enable`), after every dsu update (see the comment in [`child`]).
//!
//! `unsafe` here: retour's detours (creating and enabling one is `unsafe` in retour).

use std::time::{Duration, Instant};

use retour::GenericDetour;
use serde_json::{Value, json};

use crate::patches::{self, Placement};
use crate::pause::install_agent;
use crate::report::{Table, num, ratio};
use crate::run::{Args, Ctx};
use crate::stats::{Summary, round3, us};
use crate::targets::{self as t, Subjects, Target};

/// A measured call: `run(subjects, n)` makes `n` calls.
pub struct Variant {
    pub name: &'static str,
    pub what: &'static str,
    pub run: fn(&Subjects, u64) -> u64,
}

/// Every call loop, the unpatched native one first.
pub const VARIANTS: [Variant; 6] = [
    Variant {
        name: "native",
        what: "direct call, never patched",
        run: |s, n| (s.loop_native)(n),
    },
    Variant {
        name: "native_ptr",
        what: "call through a pointer, never patched",
        run: |s, n| t::loop_ptr(s.native, n),
    },
    Variant {
        name: "in_place",
        what: "direct call; patched in place",
        run: |s, n| (s.loop_in_place)(n),
    },
    Variant {
        name: "redirect_direct",
        what: "direct call; redirected, call site rewritten",
        run: |s, n| (s.loop_redirect)(n),
    },
    Variant {
        name: "redirect_ptr",
        what: "call through a pointer; redirected: entry jump",
        run: |s, n| t::loop_ptr(s.redirect, n),
    },
    Variant {
        name: "retour",
        what: "direct call; retour GenericDetour (entry jump)",
        run: |s, n| (s.loop_retour)(n),
    },
];

/// How many times each variant runs per round; the fastest run counts (a run that was
/// preempted or interrupted is slower, never faster).
const BEST_OF: usize = 3;

/// One round: nanoseconds per call of every variant, `calls` calls per run.
pub fn round(s: &Subjects, calls: u64) -> Vec<f64> {
    VARIANTS
        .iter()
        .map(|v| {
            (0..BEST_OF)
                .map(|_| {
                    let t0 = Instant::now();
                    std::hint::black_box((v.run)(s, calls));
                    t0.elapsed().as_nanos() as f64 / calls as f64
                })
                .fold(f64::INFINITY, f64::min)
        })
        .collect()
}

/// A measured round after a short unmeasured one (caches, predictors, clock after a sleep).
fn warm_round(s: &Subjects, calls: u64) -> Vec<f64> {
    round(s, calls / 8);
    round(s, calls)
}

fn rounds(s: &Subjects, n: usize, calls: u64) -> Rows {
    (0..n).map(|_| warm_round(s, calls)).collect()
}

/// Per variant: the summary of column `i` of `rows`.
fn column(rows: &[Vec<f64>], i: usize) -> Vec<f64> {
    rows.iter().map(|r| r[i]).collect()
}

fn phase_json(rows: &[Vec<f64>]) -> Value {
    let mut m = serde_json::Map::new();
    for (i, v) in VARIANTS.iter().enumerate() {
        m.insert(v.name.into(), Summary::of(&column(rows, i)).json());
    }
    Value::Object(m)
}

pub type Detour = GenericDetour<Target>;

const SETTLE: Duration = Duration::from_millis(5);

/// A retour detour of `target` to `replacement`, not enabled yet.
///
/// # Safety
/// - `target` and `replacement` are functions of this program with the signature of
///   [`Target`];
/// - no other thread calls `target` while this runs.
pub unsafe fn detour(target: Target, replacement: Target) -> Result<Detour, String> {
    // SAFETY: the caller's contract, which is retour's.
    unsafe { GenericDetour::new(target, replacement) }.map_err(|e| format!("retour: {e}"))
}

/// Enables or disables `d`.
///
/// # Safety
/// No other thread calls the detoured function while this runs.
pub unsafe fn set_detour(d: &Detour, on: bool) -> Result<(), String> {
    // SAFETY: the caller's contract, which is retour's.
    unsafe { if on { d.enable() } else { d.disable() } }.map_err(|e| format!("retour: {e}"))
}

/// `child calls reps=R calls=K in_place=.. redirect=.. peer_in_place=.. peer_redirect=..
/// install_reps=N`
pub fn child(args: &Args, s: &Subjects) -> Result<Value, String> {
    let reps: usize = args.num("reps")?;
    let calls: u64 = args.num("calls")?;
    let install_reps: usize = args.num("install_reps")?;
    let in_place = args.bytes("in_place")?;
    let redirect = args.bytes("redirect")?;
    let peer_in_place = args.bytes("peer_in_place")?;
    let peer_redirect = args.bytes("peer_redirect")?;
    let no_agent = rounds(s, reps, calls);
    let agent = install_agent()?;
    std::thread::sleep(Duration::from_millis(300)); // the agent's index warm-up
    let agent_idle = rounds(s, reps, calls);

    // Every dsu update comes before any retour detour: retour makes the page of its target
    // writable and back (mprotect), which splits the text mapping, and the agent refuses a
    // function that straddles two mappings ("not mapped readable", see docs/benchmarks.md).
    let mut strategies = json!(null);
    let dsu_rounds = paired_rounds(s, reps, calls, |patch| {
        if !patch {
            agent.revert(None).map_err(|e| format!("revert: {e}"))?;
            agent.revert(None).map_err(|e| format!("revert: {e}"))?;
            return Ok(());
        }
        let a = agent
            .apply_bytes(in_place.clone(), "same_in_place")
            .map_err(|e| format!("apply: {e}"))?;
        let b = agent
            .apply_bytes(redirect.clone(), "same_redirect")
            .map_err(|e| format!("apply: {e}"))?;
        let f = |x: &dsu_agent::Applied| {
            let f = &x.patch.functions[0];
            json!({"function": f.name, "strategy": f.strategy.as_str(),
                   "call_sites": f.call_sites, "old_size": f.old_size, "new_size": f.new_size})
        };
        strategies = json!([f(&a), f(&b), {"redirect_entry": entry_bytes(s.redirect)}]);
        Ok(())
    })?;
    let (mut dsu_in_place_us, mut dsu_redirect_us) = (Vec::new(), Vec::new());
    for _ in 0..install_reps {
        for (bytes, out) in [
            (&peer_in_place, &mut dsu_in_place_us),
            (&peer_redirect, &mut dsu_redirect_us),
        ] {
            let t0 = Instant::now();
            agent
                .apply_bytes(bytes.clone(), "peer")
                .map_err(|e| format!("apply: {e}"))?;
            out.push(us(t0.elapsed()));
            agent.revert(None).map_err(|e| format!("revert: {e}"))?;
        }
    }

    // SAFETY: both functions are `Target`s of this program, and only this thread calls them
    // (the same holds for every detour below).
    let retour_detour = unsafe { detour(s.retour, s.retour_replacement) }?;
    let mut retour_entry = String::new();
    let retour_rounds = paired_rounds(s, reps, calls, |on| {
        // SAFETY: see `retour_detour`.
        unsafe { set_detour(&retour_detour, on) }?;
        if on {
            retour_entry = entry_bytes(s.retour);
        }
        Ok(())
    })?;
    drop(retour_detour);
    let mut retour_us = Vec::new();
    for _ in 0..install_reps {
        let t0 = Instant::now();
        // SAFETY: see `retour_detour`.
        let d = unsafe { detour(s.peer_retour, s.peer_replacement) }?;
        // SAFETY: see `retour_detour`.
        unsafe { set_detour(&d, true) }?;
        retour_us.push(us(t0.elapsed()));
        if (s.peer_retour)(3) != (s.peer_replacement)(3) {
            return Err("the retour detour did not take effect".into());
        }
    }

    let mut paired = serde_json::Map::new();
    for (i, v) in VARIANTS.iter().enumerate() {
        // Each variant from the rounds that patch it (the native ones from dsu's).
        let (unpatched, patched) = if v.name == "retour" {
            &retour_rounds
        } else {
            &dsu_rounds
        };
        let ratios: Vec<f64> = patched
            .iter()
            .zip(unpatched)
            .map(|(p, u)| p[i] / u[i])
            .collect();
        let extra: Vec<f64> = patched
            .iter()
            .zip(unpatched)
            .map(|(p, u)| p[i] - u[i])
            .collect();
        paired.insert(
            v.name.into(),
            json!({
                "what": v.what,
                "unpatched_ns": Summary::of(&column(unpatched, i)).json(),
                "patched_ns": Summary::of(&column(patched, i)).json(),
                "ratio": Summary::of(&ratios).json(),
                "extra_ns": Summary::of(&extra).json(),
            }),
        );
    }
    Ok(json!({
        "reps": reps,
        "calls_per_round": calls,
        "no_agent_ns": phase_json(&no_agent),
        "agent_idle_ns": phase_json(&agent_idle),
        "paired": paired,
        "strategies": strategies,
        "retour_entry": retour_entry,
        "retour_replacement_offset": s.retour_replacement as usize as i64 - s.retour as usize as i64,
        "install_us": {
            "retour": Summary::of(&retour_us).json(),
            "dsu_in_place": Summary::of(&dsu_in_place_us).json(),
            "dsu_redirect": Summary::of(&dsu_redirect_us).json(),
        },
    }))
}

/// The first 16 bytes of `f`'s code, hex: what a patch or detour wrote at its entry.
fn entry_bytes(f: Target) -> String {
    let at = f as *const () as usize;
    // SAFETY: reading the code of a function of this program, which is mapped readable
    // and at least 16 bytes from the end of its mapping (functions are followed by others or
    // padding in the text segment).
    let code = unsafe { std::slice::from_raw_parts(at as *const u8, 16) };
    code.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Rounds of ns-per-call figures, one row per round, one column per variant.
type Rows = Vec<Vec<f64>>;

/// `reps` rounds of: measure, `switch(true)`, measure, `switch(false)`. Returns the unpatched
/// and the patched rows.
fn paired_rounds(
    s: &Subjects,
    reps: usize,
    calls: u64,
    mut switch: impl FnMut(bool) -> Result<(), String>,
) -> Result<(Rows, Rows), String> {
    let (mut unpatched, mut patched) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        unpatched.push(warm_round(s, calls));
        switch(true)?;
        // The agent thread finishes its report (status.json, perf map) after answering.
        std::thread::sleep(SETTLE);
        patched.push(warm_round(s, calls));
        switch(false)?;
        std::thread::sleep(SETTLE);
    }
    Ok((unpatched, patched))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Runs the child; prints the steady-state and peer tables.
pub fn run(ctx: &Ctx) -> Result<Value, String> {
    let in_place = ctx.patch(
        "same_in_place",
        &patches::same_code("dsu_bench_in_place", t::K_IN_PLACE, Placement::InPlace),
    )?;
    let redirect = ctx.patch(
        "same_redirect",
        &patches::same_code("dsu_bench_redirect", t::K_REDIRECT, Placement::Redirect),
    )?;
    let peer_in_place = ctx.patch(
        "peer_in_place",
        &patches::changed("dsu_bench_peer_dsu", t::K_PEER_DSU, Placement::InPlace),
    )?;
    let peer_redirect = ctx.patch(
        "peer_redirect",
        &patches::changed("dsu_bench_peer_dsu", t::K_PEER_DSU, Placement::Redirect),
    )?;
    let v = ctx.child(
        "calls",
        &[
            ("reps", ctx.reps(60, 12).to_string()),
            ("calls", ctx.reps(500_000, 100_000).to_string()),
            ("install_reps", ctx.reps(200, 20).to_string()),
            ("in_place", in_place.display().to_string()),
            ("redirect", redirect.display().to_string()),
            ("peer_in_place", peer_in_place.display().to_string()),
            ("peer_redirect", peer_redirect.display().to_string()),
        ],
    )?;

    let mut idle = Table::new(
        "Steady state, nothing patched: ns per call, no agent vs agent installed \
         (phases seconds apart: the min is the figure least disturbed by the machine)",
        &[
            "call",
            "no agent p50",
            "agent idle p50",
            "ratio p50",
            "no agent min",
            "agent idle min",
            "ratio min",
        ],
    );
    for name in ["native", "native_ptr"] {
        let a = f(&v["no_agent_ns"][name]["p50"]);
        let b = f(&v["agent_idle_ns"][name]["p50"]);
        let am = f(&v["no_agent_ns"][name]["min"]);
        let bm = f(&v["agent_idle_ns"][name]["min"]);
        idle.row(vec![
            name.into(),
            num(a, 3),
            num(b, 3),
            ratio(b / a),
            num(am, 3),
            num(bm, 3),
            ratio(bm / am),
        ]);
    }
    idle.print();

    let mut table = Table::new(
        "Steady state after patching to the same code: ns per call, paired rounds",
        &[
            "call",
            "how it reaches the code",
            "unpatched p50",
            "patched p50",
            "patched p99",
            "ratio p50",
            "ratio min..max",
            "extra ns p50",
        ],
    );
    for var in &VARIANTS {
        let p = &v["paired"][var.name];
        table.row(vec![
            var.name.into(),
            var.what.into(),
            num(f(&p["unpatched_ns"]["p50"]), 3),
            num(f(&p["patched_ns"]["p50"]), 3),
            num(f(&p["patched_ns"]["p99"]), 3),
            num(f(&p["ratio"]["p50"]), 3),
            format!(
                "{}..{}",
                num(f(&p["ratio"]["min"]), 3),
                num(f(&p["ratio"]["max"]), 3)
            ),
            num(f(&p["extra_ns"]["p50"]), 3),
        ]);
    }
    table.print();
    println!("strategies chosen: {}", v["strategies"]);
    println!(
        "retour's entry: {} (its replacement is at entry{:+#x})",
        v["retour_entry"].as_str().unwrap_or(""),
        v["retour_replacement_offset"].as_i64().unwrap_or(0)
    );

    let mut peer = Table::new(
        "Peer: installing a redirect of one function, us (same process, same run)",
        &["tool", "p50", "p99", "min", "max"],
    );
    for (label, key) in [
        ("retour GenericDetour::new + enable", "retour"),
        ("dsu apply_bytes, in place", "dsu_in_place"),
        ("dsu apply_bytes, redirect + call sites", "dsu_redirect"),
    ] {
        let s = &v["install_us"][key];
        peer.row(vec![
            label.into(),
            num(f(&s["p50"]), 1),
            num(f(&s["p99"]), 1),
            num(f(&s["min"]), 1),
            num(f(&s["max"]), 1),
        ]);
    }
    peer.print();
    let mut v = v;
    let pr = |name: &str| round3(f(&v["paired"][name]["ratio"]["p50"]));
    v["summary"] = json!({
        "agent_idle_ratio": round3(f(&v["agent_idle_ns"]["native"]["min"]) / f(&v["no_agent_ns"]["native"]["min"])),
        "agent_idle_ratio_p50": round3(f(&v["agent_idle_ns"]["native"]["p50"]) / f(&v["no_agent_ns"]["native"]["p50"])),
        "in_place_ratio": pr("in_place"),
        "call_site_ratio": pr("redirect_direct"),
        "entry_jump_ratio": pr("redirect_ptr"),
        "entry_jump_extra_ns": round3(f(&v["paired"]["redirect_ptr"]["extra_ns"]["p50"])),
        "retour_ratio": pr("retour"),
        "retour_extra_ns": round3(f(&v["paired"]["retour"]["extra_ns"]["p50"])),
    });
    Ok(v)
}
