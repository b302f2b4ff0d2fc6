//! `dsu-bench`: the whole-process benchmarks of dsu. See `docs/benchmarks.md`.
//!
//! ```text
//! dsu-bench [--quick] [--out DIR] [--only SECTION,..]   run, print tables, write DIR/*.json
//! dsu-bench criterion-summary [--out DIR] [--criterion DIR]   criterion's estimates as JSON
//! dsu-bench child SECTION key=value..                   (internal) one measured process
//! ```
//!
//! Sections: calls, pause, apply, memory, restart. `DIR` defaults to `target/bench`. Build it
//! in release with the rest (`cargo build --release --workspace --all-targets`): it runs the
//! `dsu` binary and `examples/demo_service` found beside it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use dsu_bench::report::{Table, num, write_json};
use dsu_bench::run::{Args, Ctx, print_result};
use dsu_bench::{apply, calls, memory, pause, restart};
use serde_json::{Value, json};

dsu_bench::subjects!();

const SECTIONS: [&str; 5] = ["calls", "pause", "apply", "memory", "restart"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("child") => return child(&args[1..]),
        Some("criterion-summary") => criterion_summary(&args[1..]),
        Some("--help" | "-h") => {
            println!(
                "usage: dsu-bench [--quick] [--out DIR] [--only {}]\n       \
                 dsu-bench criterion-summary [--out DIR] [--criterion DIR]",
                SECTIONS.join(",")
            );
            Ok(())
        }
        _ => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dsu-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--name VALUE` of `args`.
fn option<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn child(args: &[String]) -> ExitCode {
    let section = args.first().map(String::as_str).unwrap_or("");
    let a = Args::parse(args.get(1..).unwrap_or(&[]));
    let result = match section {
        "pause" => pause::child(&a),
        "apply" => apply::child(&a),
        "serve" => apply::serve(&a),
        "calls" => calls::child(&a, &SUBJECTS),
        "memory" => memory::child(&a),
        other => Err(format!("unknown child section {other:?}")),
    };
    match result {
        Ok(v) => {
            print_result(&v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_result(&json!({ "error": e }));
            ExitCode::FAILURE
        }
    }
}

fn bench(args: &[String]) -> Result<(), String> {
    let quick = args.iter().any(|a| a == "--quick");
    let out = PathBuf::from(option(args, "--out").unwrap_or("target/bench"));
    let only: Vec<&str> = option(args, "--only")
        .map(|s| s.split(',').collect())
        .unwrap_or_else(|| SECTIONS.to_vec());
    if let Some(bad) = only.iter().find(|s| !SECTIONS.contains(s)) {
        return Err(format!("unknown section {bad:?}; sections: {SECTIONS:?}"));
    }
    let ctx = Ctx::new(quick, out.clone())?;
    for tool in [ctx.dsu(), ctx.example("demo_service")] {
        if !tool.exists() {
            return Err(format!(
                "{} is missing: build with `cargo build --release --workspace --all-targets`",
                tool.display()
            ));
        }
    }
    let machine = machine();
    println!(
        "dsu-bench{}: {} ({} CPUs), kernel {}, {}",
        if quick { " --quick" } else { "" },
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["date"].as_str().unwrap_or("?")
    );
    let started = Instant::now();
    let mut results = serde_json::Map::new();
    for section in SECTIONS.iter().filter(|s| only.contains(s)) {
        let t = Instant::now();
        let value = match *section {
            "calls" => calls::run(&ctx),
            "pause" => pause::run(&ctx),
            "apply" => apply::run(&ctx),
            "memory" => memory::run(&ctx),
            "restart" => restart::run(&ctx),
            _ => unreachable!("checked above"),
        }
        .map_err(|e| format!("section {section}: {e}"))?;
        println!("({section}: {:.1} s)", t.elapsed().as_secs_f64());
        write_json(&out, section, &value).map_err(|e| format!("writing {section}.json: {e}"))?;
        results.insert(section.to_string(), value);
    }
    let goals = goals(&results);
    let summary = json!({
        "machine": machine,
        "quick": quick,
        "seconds": started.elapsed().as_secs_f64(),
        "goals": goals,
    });
    write_json(&out, "summary", &summary).map_err(|e| format!("writing summary.json: {e}"))?;
    let _ = std::fs::remove_dir_all(&ctx.work);
    println!(
        "\nwrote {}/*.json in {:.1} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The goals of BRIEF §6 that these figures decide, each met or missed; printed as a table.
fn goals(r: &serde_json::Map<String, Value>) -> Value {
    let mut table = Table::new("Goals (BRIEF §6)", &["goal", "measured", "met"]);
    let mut out = Vec::new();
    let mut add = |goal: String, measured: String, met: Option<bool>| {
        let verdict = match met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "reported",
        };
        table.row(vec![goal.clone(), measured.clone(), verdict.into()]);
        out.push(json!({ "goal": goal, "measured": measured, "met": met }));
    };
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    if let Some(p) = r.get("pause") {
        for c in p["configs"].as_array().into_iter().flatten() {
            let ratio = f(&c["ratio_update_to_bare_p50"]);
            add(
                format!(
                    "pause <= 1.5x bare, {}+2 {} threads",
                    c["threads"],
                    c["load"].as_str().unwrap_or("")
                ),
                format!(
                    "{:.2}x ({:.0} vs {:.0} us)",
                    ratio,
                    f(&c["update_us"]["pause"]["p50"]),
                    f(&c["bare_us"]["total"]["p50"])
                ),
                Some(ratio <= 1.5),
            );
        }
    }
    if let Some(a) = r.get("apply") {
        let row = a["in_process"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["label"] == "1" && c["threads"] == 8);
        if let Some(c) = row {
            let p50 = f(&c["us"]["wall"]["p50"]);
            add(
                "apply, 1 function, 8 threads: p50 < 1 ms".into(),
                format!("{p50:.0} us"),
                Some(p50 < 1000.0),
            );
        }
        let first = f(&a["first"]["first_apply_wall_us"]["p50"]);
        if !first.is_nan() {
            add(
                "... the first apply of a process: p50 < 1 ms".into(),
                format!("{first:.0} us"),
                Some(first < 1000.0),
            );
        }
        let cli = f(&a["cli"]["apply_wall_us"]["p50"]) / 1000.0;
        add(
            format!(
                "`dsu apply` <= 1/3 of ulp trigger ({} ms)",
                apply::ULP_TRIGGER_MS
            ),
            format!(
                "{cli:.2} ms = {:.2} of {} ms",
                cli / apply::ULP_TRIGGER_MS,
                apply::ULP_TRIGGER_MS
            ),
            Some(cli <= apply::ULP_TRIGGER_MS / 3.0),
        );
    }
    if let Some(c) = r.get("calls") {
        let s = &c["summary"];
        add(
            "no cost while nothing is patched (idle agent / no agent, min)".into(),
            format!(
                "{:.3}x (p50 {:.3}x)",
                f(&s["agent_idle_ratio"]),
                f(&s["agent_idle_ratio_p50"])
            ),
            Some(f(&s["agent_idle_ratio"]) <= 1.02),
        );
        add(
            "in-place call within 2% of native".into(),
            format!("{:.3}x", f(&s["in_place_ratio"])),
            Some(f(&s["in_place_ratio"]) <= 1.02),
        );
        add(
            "rewritten call site within 2% of native".into(),
            format!("{:.3}x", f(&s["call_site_ratio"])),
            Some(f(&s["call_site_ratio"]) <= 1.02),
        );
        add(
            "entry jump cost: through a pointer / direct (retour's same jmp)".into(),
            format!(
                "{:.3}x, {:+.3} ns / {:.3}x, {:+.3} ns per call",
                f(&s["entry_jump_ratio"]),
                f(&s["entry_jump_extra_ns"]),
                f(&s["retour_ratio"]),
                f(&s["retour_extra_ns"])
            ),
            None,
        );
    }
    if let Some(m) = r.get("memory") {
        let s = &m["summary"];
        add(
            "agent idle footprint / per-patch overhead".into(),
            format!(
                "{:.0} kB / {:.0} kB RSS, {:.0} kB mapped",
                f(&s["agent_idle_rss_kb"]),
                f(&s["per_patch_rss_kb_mean"]),
                f(&s["image_kb"]["p50"])
            ),
            None,
        );
    }
    if let Some(x) = r.get("restart") {
        add(
            "vs restart: failed requests, ms unavailable".into(),
            format!(
                "dsu {} / {:.1} ms; restart {} / {:.1} ms",
                x["update"]["failed"],
                f(&x["update"]["unavailable_ms"]),
                x["restart"]["failed"],
                f(&x["restart"]["unavailable_ms"])
            ),
            None,
        );
    }
    table.print();
    Value::Array(out)
}

/// The machine: CPU model, CPUs, kernel, and the date (UTC).
fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    json!({ "cpu": cpu, "cpus": cpus, "kernel": kernel, "date": utc_now() })
}

/// `YYYY-MM-DDTHH:MM:SSZ` of now (civil-from-days, proleptic Gregorian).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{}Z", dsu_agent::report::utc(secs).replace(' ', "T"))
}

/// Reads criterion's estimates (`<criterion>/**/new/estimates.json`) into
/// `<out>/criterion.json` and prints them.
fn criterion_summary(args: &[String]) -> Result<(), String> {
    let out = PathBuf::from(option(args, "--out").unwrap_or("target/bench"));
    let dir = PathBuf::from(option(args, "--criterion").unwrap_or("target/criterion"));
    let mut found = Vec::new();
    collect_estimates(&dir, &mut found);
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut table = Table::new(
        "criterion (cargo bench): time per iteration",
        &["benchmark", "median", "mean", "unit"],
    );
    let mut entries = Vec::new();
    for (id, est) in &found {
        let median = est["median"]["point_estimate"].as_f64().unwrap_or(f64::NAN);
        let mean = est["mean"]["point_estimate"].as_f64().unwrap_or(f64::NAN);
        let (scale, unit) = if median >= 1e6 {
            (1e-6, "ms")
        } else if median >= 1e3 {
            (1e-3, "us")
        } else {
            (1.0, "ns")
        };
        table.row(vec![
            id.clone(),
            num(median * scale, 3),
            num(mean * scale, 3),
            unit.into(),
        ]);
        entries.push(json!({ "id": id, "median_ns": median, "mean_ns": mean,
            "median_ci_ns": [est["median"]["confidence_interval"]["lower_bound"],
                             est["median"]["confidence_interval"]["upper_bound"]] }));
    }
    if entries.is_empty() {
        return Err(format!("no criterion estimates under {}", dir.display()));
    }
    table.print();
    write_json(&out, "criterion", &json!({ "benchmarks": entries }))
        .map_err(|e| format!("writing criterion.json: {e}"))
}

/// `(full id, estimates)` of every benchmark under `dir`.
fn collect_estimates(dir: &Path, out: &mut Vec<(String, Value)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            let read = |name: &str| -> Option<Value> {
                serde_json::from_slice(&std::fs::read(path.join(name)).ok()?).ok()
            };
            if let (Some(bench), Some(est)) = (read("benchmark.json"), read("estimates.json")) {
                let id = bench["full_id"].as_str().unwrap_or("?").to_string();
                out.push((id, est));
            }
        } else if path.file_name().is_some_and(|n| n != "report") {
            collect_estimates(&path, out);
        }
    }
}
