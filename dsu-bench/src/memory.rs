//! Memory: the resident footprint of an idle agent (the same program with and without it) and
//! what each applied patch adds (resident memory, mappings, the image's mapped size).

use std::time::Duration;

use serde_json::{Value, json};

use crate::patches::{self, Placement};
use crate::pause::install_agent;
use crate::procfs;
use crate::report::{Table, num};
use crate::run::{Args, Ctx};
use crate::stats::Summary;

/// `child memory agent=0|1 patches=DIR count=N`: idles, optionally installs the agent, then
/// (with the agent) applies `DIR/mem_<i>.o` for i in 0..N, each replacing another function.
pub fn child(args: &Args) -> Result<Value, String> {
    let with_agent = args.str("agent")? == "1";
    let count: usize = args.num("count")?;
    let dir = args.path("patches")?;
    std::hint::black_box(crate::targets::touch_all(1));
    std::thread::sleep(Duration::from_millis(100));
    let rss_start = procfs::rss_kb();
    let agent = if with_agent {
        Some(install_agent()?)
    } else {
        None
    };
    // Idle: the agent has built its symbol index (right after install) and sleeps.
    std::thread::sleep(Duration::from_millis(700));
    let rss_idle = procfs::rss_kb();
    let anon_idle = procfs::rss_anon_kb();
    let (maps_idle, mapped_idle) = procfs::mappings();
    let mut steps = Vec::new();
    if let Some(agent) = &agent {
        for i in 0..count {
            let bytes = std::fs::read(dir.join(format!("mem_{i}.o")))
                .map_err(|e| format!("patch {i}: {e}"))?;
            let a = agent
                .apply_bytes(bytes, &format!("mem_{i}"))
                .map_err(|e| format!("apply: {e}"))?;
            let (maps, mapped) = procfs::mappings();
            steps.push(json!({
                "rss_kb": procfs::rss_kb(),
                "anon_kb": procfs::rss_anon_kb(),
                "maps": maps,
                "mapped_kb": mapped,
                "image_bytes": a.patch.image.1,
                "strategy": a.patch.functions[0].strategy.as_str(),
            }));
        }
    }
    Ok(json!({
        "agent": with_agent,
        "rss_start_kb": rss_start,
        "rss_idle_kb": rss_idle,
        "anon_idle_kb": anon_idle,
        "maps_idle": maps_idle,
        "mapped_idle_kb": mapped_idle,
        "patches": steps,
    }))
}

fn n(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

pub fn run(ctx: &Ctx) -> Result<Value, String> {
    let count = ctx.reps(20, 5);
    let dir = ctx.work.join("patches");
    for i in 0..count {
        // Redirect: each patch gets an image of its own (in place would map and drop one).
        let src = patches::changed_targets(i..i + 1, Placement::Redirect);
        let obj = ctx.patch(&format!("mem_src_{i}"), &src)?;
        std::fs::copy(&obj, dir.join(format!("mem_{i}.o"))).map_err(|e| e.to_string())?;
    }
    let dir_s = dir.display().to_string();
    let without = ctx.child(
        "memory",
        &[
            ("agent", "0".into()),
            ("count", "0".into()),
            ("patches", dir_s.clone()),
        ],
    )?;
    let with = ctx.child(
        "memory",
        &[
            ("agent", "1".into()),
            ("count", count.to_string()),
            ("patches", dir_s),
        ],
    )?;
    let idle_delta = n(&with["rss_idle_kb"]) - n(&without["rss_idle_kb"]);
    let in_process_delta = n(&with["rss_idle_kb"]) - n(&with["rss_start_kb"]);
    let steps = with["patches"].as_array().cloned().unwrap_or_default();
    let mut rss = vec![n(&with["rss_idle_kb"])];
    let mut mapped = vec![n(&with["mapped_idle_kb"])];
    let mut image = Vec::new();
    for s in &steps {
        rss.push(n(&s["rss_kb"]));
        mapped.push(n(&s["mapped_kb"]));
        image.push(n(&s["image_bytes"]) / 1024.0);
    }
    let first_rss = rss.get(1).map_or(f64::NAN, |r| r - rss[0]);
    let later_rss: Vec<f64> = rss.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
    let later_mapped: Vec<f64> = mapped.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
    let per_patch_rss = if rss.len() > 2 {
        (rss[rss.len() - 1] - rss[1]) / (rss.len() - 2) as f64
    } else {
        f64::NAN
    };
    let image_kb = Summary::of(&image);

    let mut table = Table::new("Memory, kB", &["figure", "value"]);
    for (label, v) in [
        ("RSS idle, no agent", n(&without["rss_idle_kb"])),
        ("RSS idle, agent installed", n(&with["rss_idle_kb"])),
        ("agent idle footprint (with - without)", idle_delta),
        ("  same process, after - before install", in_process_delta),
        (
            "first patch: RSS growth (builds the call-site index)",
            first_rss,
        ),
        ("each later patch: RSS growth, mean", per_patch_rss),
        (
            "each later patch: mapped growth, p50",
            Summary::of(&later_mapped).p50,
        ),
        ("patch image mapped size, p50", image_kb.p50),
    ] {
        table.row(vec![label.into(), num(v, 0)]);
    }
    table.print();
    Ok(json!({
        "without_agent": without,
        "with_agent": with,
        "summary": {
            "agent_idle_rss_kb": idle_delta,
            "agent_idle_rss_in_process_kb": in_process_delta,
            "first_patch_rss_kb": first_rss,
            "per_patch_rss_kb_mean": per_patch_rss,
            "per_patch_rss_kb": Summary::of(&later_rss).json(),
            "per_patch_mapped_kb": Summary::of(&later_mapped).json(),
            "image_kb": image_kb.json(),
        },
    }))
}
