//! The floor of an update's pause (criterion): a bare stop/resume cycle (list, signal each
//! thread, wait until all are parked, release) and the agent's own `StopWorld` stop + resume,
//! with 1, 8 and 64 idle threads, in a process without the agent.
//! `cargo bench --bench stop`; figures in `docs/benchmarks.md`.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use dsu_agent::stop::StopWorld;
use dsu_bench::bare::{Handshake, agent_stop_signal, stop_world_cycle};
use dsu_bench::workers::{Load, Workers};

const TIMEOUT: Duration = Duration::from_secs(5);
const SETTLE: Duration = Duration::from_millis(1);

fn bench(c: &mut Criterion) {
    let sig = agent_stop_signal();
    let mut handshake = Handshake::install(sig + 1).expect("install the handshake");
    let mut world = StopWorld::new(sig).expect("StopWorld");
    let mut g = c.benchmark_group("stop_resume");
    g.sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut workers = None;
    for threads in [1usize, 8, 64] {
        drop(workers.take());
        workers = Some(Workers::spawn(threads, Load::Idle));
        std::thread::sleep(Duration::from_millis(20));
        world.prepare().expect("prepare");
        // Each cycle is timed alone, then the threads get a millisecond to go back to sleep
        // (back to back, they would still be awake from the last cycle).
        g.bench_function(format!("bare/{threads}_idle"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let c = handshake.cycle(TIMEOUT, false, false).expect("cycle");
                        std::thread::sleep(SETTLE);
                        c.total
                    })
                    .sum()
            })
        });
        g.bench_function(format!("stopworld/{threads}_idle"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let c = stop_world_cycle(&mut world, TIMEOUT).expect("cycle");
                        std::thread::sleep(SETTLE);
                        c.total
                    })
                    .sum()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
