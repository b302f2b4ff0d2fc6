//! Application threads for the benchmarks: mostly idle ones (blocked in `nanosleep` or on a
//! futex) or CPU-bound ones, stopped and joined on drop.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the threads do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// Blocked: even threads in `nanosleep`, odd ones on a futex (`park_timeout`), waking
    /// every 50 ms.
    Idle,
    /// Spinning on [`crate::targets::spin`], never blocking.
    Busy,
}

impl Load {
    pub fn as_str(self) -> &'static str {
        match self {
            Load::Idle => "idle",
            Load::Busy => "busy",
        }
    }

    pub fn parse(s: &str) -> Option<Load> {
        match s {
            "idle" => Some(Load::Idle),
            "busy" => Some(Load::Busy),
            _ => None,
        }
    }
}

/// Running application threads.
#[derive(Debug)]
pub struct Workers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

const NAP: Duration = Duration::from_millis(50);

impl Workers {
    /// Starts `n` threads doing `load`.
    pub fn spawn(n: usize, load: Load) -> Workers {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..n)
            .map(|i| {
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .stack_size(256 * 1024)
                    .spawn(move || work(i, load, &stop))
                    .expect("spawn a worker thread")
            })
            .collect();
        Workers { stop, handles }
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

fn work(i: usize, load: Load, stop: &AtomicBool) {
    let mut x = i as u64;
    while !stop.load(Ordering::Relaxed) {
        match load {
            Load::Idle if i.is_multiple_of(2) => std::thread::sleep(NAP),
            Load::Idle => std::thread::park_timeout(NAP),
            Load::Busy => x = crate::targets::spin(x),
        }
    }
    black_box(x);
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in &self.handles {
            h.thread().unpark();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
