//! Steady-state cost per call (criterion): no agent, agent installed with nothing patched,
//! then patched to the same code in place, by redirect (through a pointer: the entry jump;
//! direct: the rewritten call site), and the peer, a retour detour; and the time to install
//! a redirect of one function: dsu's `apply_bytes` against retour.
//!
//! One process, in that order (the agent cannot be uninstalled; every dsu update comes before
//! retour's first detour). Each iteration makes 1000
//! calls. `cargo bench --bench calls`; figures in `docs/benchmarks.md`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dsu_bench::calls::{VARIANTS, detour, set_detour};
use dsu_bench::patches::{self, Compiler, Placement};
use dsu_bench::targets as t;

dsu_bench::subjects!();

const CALLS: u64 = 1000;

fn measure_all(c: &mut Criterion, phase: &str) {
    let mut g = c.benchmark_group(format!("call/{phase}"));
    g.throughput(Throughput::Elements(CALLS))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    for v in &VARIANTS {
        g.bench_function(v.name, |b| b.iter(|| (v.run)(&SUBJECTS, black_box(CALLS))));
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("dsu-bench-calls-{}", std::process::id()));
    let compiler = Compiler::new(&dir.join("patches")).expect("scratch directory");
    let compile = |name: &str, src: String| compiler.bytes(name, &src).expect("compile a patch");
    let in_place = compile(
        "same_in_place",
        patches::same_code("dsu_bench_in_place", t::K_IN_PLACE, Placement::InPlace),
    );
    let redirect = compile(
        "same_redirect",
        patches::same_code("dsu_bench_redirect", t::K_REDIRECT, Placement::Redirect),
    );
    let peer = compile(
        "peer_redirect",
        patches::changed("dsu_bench_peer_dsu", t::K_PEER_DSU, Placement::Redirect),
    );

    measure_all(c, "no_agent");

    let agent = dsu_agent::Builder::new()
        .control_dir(dir.join("ctl"))
        .log(false)
        .install()
        .expect("install the agent");
    std::thread::sleep(Duration::from_millis(300)); // the agent's index warm-up
    measure_all(c, "agent_idle");

    let mut g = c.benchmark_group("install_redirect");
    g.sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("dsu_apply_bytes", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t0 = Instant::now();
                agent.apply_bytes(peer.clone(), "peer").expect("apply");
                total += t0.elapsed();
                agent.revert(None).expect("revert");
            }
            total
        })
    });
    g.finish();

    let a = agent.apply_bytes(in_place, "same_in_place").expect("apply");
    let b = agent.apply_bytes(redirect, "same_redirect").expect("apply");
    assert_eq!(a.patch.functions[0].strategy.as_str(), "in-place");
    assert_eq!(b.patch.functions[0].strategy.as_str(), "redirect");
    assert!(
        b.patch.functions[0].call_sites >= 1,
        "the direct call site was not rewritten"
    );
    measure_all(c, "dsu_patched");
    agent.revert(None).expect("revert");
    agent.revert(None).expect("revert");

    // retour last: it makes its target's page writable and back, which splits the text
    // mapping, and the agent refuses a function straddling two mappings (docs/benchmarks.md).
    // SAFETY: both are `Target`s of this program; only this thread calls them.
    let d = unsafe { detour(SUBJECTS.retour, SUBJECTS.retour_replacement) }.expect("retour");
    // SAFETY: as above.
    unsafe { set_detour(&d, true) }.expect("retour");
    measure_all(c, "retour_detoured");
    drop(d);

    let mut g = c.benchmark_group("install_redirect");
    g.sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("retour", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t0 = Instant::now();
                // SAFETY: both are `Target`s of this program; only this thread calls them.
                let d = unsafe { detour(SUBJECTS.peer_retour, SUBJECTS.peer_replacement) }
                    .expect("retour");
                // SAFETY: as above.
                unsafe { set_detour(&d, true) }.expect("retour");
                total += t0.elapsed();
            }
            total
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
    dsu_bench::run::forget_perf_map(std::process::id());
}

criterion_group!(benches, bench);
criterion_main!(benches);
