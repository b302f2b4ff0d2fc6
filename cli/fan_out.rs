//! Running one job per item on a bounded number of threads.
//!
//! `dsu`'s jobs are system calls (reading `/proc`) and waits for agents (which link and
//! apply in their own processes): threads that block are the simple way to keep several
//! going at once. The caller's thread collects the results as they come.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

/// The threads `dsu` uses for work that keeps the cores busy (reading `/proc`).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// `work` on every item, at most `jobs` at a time; `seen` is called on the calling thread as
/// each finishes. Results are in the order of `items`.
pub fn fan_out<T: Sync, R: Send>(
    items: &[T],
    jobs: usize,
    work: impl Fn(&T) -> R + Sync,
    mut seen: impl FnMut(&R),
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<R>> = items.iter().map(|_| None).collect();
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| {
        let (next, work) = (&next, &work);
        for _ in 0..jobs.clamp(1, items.len().max(1)) {
            let tx = tx.clone();
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    if tx.send((i, work(item))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        for (i, result) in rx {
            seen(&result);
            results[i] = Some(result);
        }
    });
    // Every index below `items.len()` was taken by exactly one thread, which sent its result
    // before taking another (a panicking job ends the scope with its panic instead).
    results.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_is_done_once_and_in_order() {
        let items: Vec<u32> = (0..100).collect();
        let mut seen = 0;
        let results = fan_out(&items, 7, |x| x * 2, |_| seen += 1);
        assert_eq!(results, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        assert_eq!(seen, 100);
        assert!(fan_out(&[] as &[u32], 4, |x| *x, |_| ()).is_empty());
    }

    #[test]
    fn no_more_than_jobs_run_at_once() {
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let items = [(); 40];
        fan_out(
            &items,
            3,
            |_| {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::yield_now();
                running.fetch_sub(1, Ordering::SeqCst);
            },
            |_| (),
        );
        assert!(most.load(Ordering::SeqCst) <= 3);
    }
}
