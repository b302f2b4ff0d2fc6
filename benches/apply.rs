//! Apply latency in process (criterion): `Agent::apply_bytes` of a patch replacing 1 or 50
//! functions, with 1 or 8 idle application threads besides the caller; each apply is undone
//! (untimed) before the next. `cargo bench --bench apply`; figures in `docs/benchmarks.md`.

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use dsu_bench::patches::{self, Compiler, Placement};
use dsu_bench::workers::{Load, Workers};

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("dsu-bench-apply-{}", std::process::id()));
    let compiler = Compiler::new(&dir.join("patches")).expect("scratch directory");
    let one = compiler
        .bytes("one", &patches::changed_targets(0..1, Placement::InPlace))
        .expect("compile");
    let fifty = compiler
        .bytes(
            "fifty",
            &patches::changed_targets(0..50, Placement::InPlace),
        )
        .expect("compile");
    std::hint::black_box(dsu_bench::targets::touch_all(1));
    let agent = dsu_agent::Builder::new()
        .control_dir(dir.join("ctl"))
        .log(false)
        .install()
        .expect("install the agent");
    // Warm-up: the symbol index (built at install) and the call-site index (first apply).
    agent.apply_bytes(one.clone(), "warm-up").expect("apply");
    agent.revert(None).expect("revert");

    let mut g = c.benchmark_group("apply");
    g.sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut workers = None;
    for threads in [1usize, 8] {
        // `threads` idle workers besides the calling thread.
        drop(workers.take());
        workers = Some(Workers::spawn(threads, Load::Idle));
        for (label, patch) in [("1_function", &one), ("50_functions", &fifty)] {
            g.bench_function(format!("{label}/{threads}_threads"), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t0 = Instant::now();
                        agent.apply_bytes(patch.clone(), label).expect("apply");
                        total += t0.elapsed();
                        agent.revert(None).expect("revert");
                    }
                    total
                })
            });
        }
    }
    g.finish();
    drop(workers);
    let _ = std::fs::remove_dir_all(&dir);
    dsu_bench::run::forget_perf_map(std::process::id());
}

criterion_group!(benches, bench);
criterion_main!(benches);
