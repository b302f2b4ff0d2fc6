//! Survey: which threads of the process run, and where the others wait, without disturbing
//! any of them.
//!
//! Only running threads are stopped with a signal; a thread blocked in a system call is
//! checked from what the kernel reports (`/proc/self/task/<tid>/syscall`: its stack and
//! instruction pointers), so its `poll`, `epoll_wait`, `nanosleep` or `sem_wait` never sees a
//! signal, an `EINTR` or an early wake-up, whatever signals it blocks.
//!
//! Each waiting thread's switch count (`schedstat`) is read first: when it is the same after
//! the thread's stack was checked, the thread did not run in between and the check saw one
//! consistent state ([`Survey::still_waiting`]).
//!
//! The survey runs while threads may be held at breakpoints (see [`crate::hold`]): it
//! allocates nothing, takes no lock and prints nothing; [`Survey::prepare`] sizes its buffers.

use std::io;
use std::time::Duration;

use dsu_sys::raw::Moment as Instant;

use dsu_sys::tasks::{self, SyscallState};
use dsu_sys::threads;

const DIRENT_BUF: usize = 16 * 1024;
const MARGIN: usize = 64;

/// A thread blocked in the kernel, as the survey found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    pub tid: i32,
    /// System call number (`-1`: blocked outside one, such as a stopped thread).
    pub nr: i64,
    pub sp: u64,
    pub pc: u64,
    /// Times it had been put on a CPU when it was surveyed.
    pub switches: u64,
}

/// Why a survey could not be taken. Every variant leaves threads as they were.
#[derive(Debug, thiserror::Error)]
pub enum SurveyError {
    #[error("listing the threads of the process: {0}")]
    List(io::Error),
    #[error("reading /proc/self/task/{tid}: {source}")]
    Read { tid: i32, source: io::Error },
    #[error("more threads than prepared for; prepare again")]
    PrepareAgain,
    #[error(
        "the thread list did not settle ({listed} listed, {counted} counted): threads are \
         being created or exiting; retry"
    )]
    Unsettled { listed: usize, counted: usize },
}

/// The threads of the process, split into running and waiting.
#[derive(Debug, Default)]
pub struct Survey {
    dirents: Vec<u8>,
    listed: Vec<i32>,
    /// Threads to stop: first the `unsettled` ones (seen running; they may block again before
    /// the stop, see [`Survey::settle_running`]), then those a check of their copy could not
    /// prove inactive (reading them again would only repeat that check).
    running: Vec<i32>,
    unsettled: usize,
    waiting: Vec<Waiting>,
}

impl Survey {
    pub fn new() -> Survey {
        Survey::default()
    }

    /// Sizes the buffers for the current number of threads and a margin. Allocates.
    pub fn prepare(&mut self) -> io::Result<()> {
        let capacity = threads::list()?.len() * 2 + MARGIN;
        self.dirents.resize(DIRENT_BUF, 0);
        if self.listed.len() < capacity {
            self.listed.resize(capacity, 0);
        }
        self.running.clear();
        self.running.reserve(capacity);
        self.waiting.clear();
        self.waiting.reserve(capacity);
        Ok(())
    }

    /// Surveys every thread but `me`. A listing the kernel cut short (a thread exited during
    /// it) is taken again, for at most `settle`. Allocates nothing.
    pub fn take(&mut self, me: i32, settle: Duration) -> Result<(), SurveyError> {
        let deadline = Instant::now() + settle;
        let n = loop {
            let n = threads::list_into(&mut self.dirents, &mut self.listed).map_err(|e| {
                if e.raw_os_error() == Some(threads::CAPACITY_EXCEEDED) {
                    SurveyError::PrepareAgain
                } else {
                    SurveyError::List(e)
                }
            })?;
            let counted = threads::count().map_err(SurveyError::List)?;
            if n >= counted {
                break n;
            }
            if Instant::now() >= deadline {
                return Err(SurveyError::Unsettled { listed: n, counted });
            }
            dsu_sys::raw::yield_now();
        };
        self.running.clear();
        self.unsettled = 0;
        self.waiting.clear();
        for i in 0..n {
            let tid = self.listed[i];
            if tid == me {
                continue;
            }
            let read = |source| SurveyError::Read { tid, source };
            let Some(switches) = tasks::switch_ins(tid).map_err(read)? else {
                continue; // exited
            };
            let Some(state) = tasks::syscall_state(tid).map_err(read)? else {
                continue;
            };
            if self.running.len() == self.running.capacity()
                || self.waiting.len() == self.waiting.capacity()
            {
                return Err(SurveyError::PrepareAgain);
            }
            match state {
                SyscallState::Running => {
                    self.running.push(tid);
                    self.unsettled += 1;
                }
                SyscallState::Blocked { nr, sp, pc } => self.waiting.push(Waiting {
                    tid,
                    nr,
                    sp,
                    pc,
                    switches,
                }),
            }
        }
        Ok(())
    }

    /// Reads thread `tid` again: `Some` when it is blocked in the kernel now (`None`: running,
    /// gone, or unreadable). Allocates nothing.
    pub fn reread(tid: i32) -> Option<Waiting> {
        let switches = tasks::switch_ins(tid).ok()??;
        match tasks::syscall_state(tid).ok()?? {
            SyscallState::Running => None,
            SyscallState::Blocked { nr, sp, pc } => Some(Waiting {
                tid,
                nr,
                sp,
                pc,
                switches,
            }),
        }
    }

    /// Moves the threads seen running that have blocked since to the waiting ones: a thread
    /// that waits most of the time runs only for moments, and signalling it right as it
    /// blocks again would interrupt its system call. Threads marked with
    /// [`Survey::mark_unproven`] stay. Allocates nothing.
    pub fn settle_running(&mut self) {
        let mut i = 0;
        while i < self.unsettled {
            let tid = self.running[i];
            match Self::reread(tid) {
                Some(w) if self.waiting.len() < self.waiting.capacity() => {
                    self.waiting.push(w);
                    // `remove`, not `swap_remove`: the unproven threads after `unsettled`
                    // keep their place.
                    self.running.remove(i);
                    self.unsettled -= 1;
                }
                _ => i += 1,
            }
        }
    }

    /// Threads to stop: found on a CPU or ready to run, or marked.
    pub fn running(&self) -> &[i32] {
        &self.running
    }

    /// Whether any thread to stop was seen running (or marked so) and may block again:
    /// worth another [`Survey::settle_running`] after a nap. Threads only
    /// [`Survey::mark_unproven`] are not: napping would not change their check.
    pub fn any_unsettled(&self) -> bool {
        self.unsettled > 0
    }

    /// Threads found blocked in the kernel.
    pub fn waiting(&self) -> &[Waiting] {
        &self.waiting
    }

    /// Adds `tid` to the threads to stop as one seen running (a waiting thread that kept
    /// running during its checks): a later [`Survey::settle_running`] reads it again.
    /// Allocates nothing; false when there is no room.
    pub fn mark_running(&mut self, tid: i32) -> bool {
        if self.running.len() == self.running.capacity() {
            return false;
        }
        self.running.insert(self.unsettled, tid);
        self.unsettled += 1;
        true
    }

    /// Adds `tid` to the threads to stop as one whose copy did not prove it inactive (a walk
    /// that needs a register the kernel does not report): stopped and checked from its
    /// registers, never read again before that. Allocates nothing; false when there is no
    /// room.
    pub fn mark_unproven(&mut self, tid: i32) -> bool {
        if self.running.len() == self.running.capacity() {
            return false;
        }
        self.running.push(tid);
        true
    }

    /// Whether `w` has not run since it was surveyed: its switch count is unchanged (an exited
    /// thread counts as still waiting: it runs nothing any more).
    pub fn still_waiting(w: &Waiting) -> bool {
        match tasks::switch_ins(w.tid) {
            Ok(Some(now)) => now == w.switches,
            Ok(None) => true,
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    use std::sync::{Arc, mpsc};

    /// A thread blocked in `recv` until the sender is dropped, and its tid; returned once the
    /// kernel reports it blocked.
    fn blocked_thread() -> (i32, mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let handle = std::thread::spawn(move || {
            tid_tx.send(threads::gettid()).unwrap();
            let _ = stop_rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        while Survey::reread(tid).is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        (tid, stop_tx, handle)
    }

    /// A survey with room, and nothing in it (the test harness's other threads come and go).
    fn empty_survey() -> Survey {
        let mut survey = Survey::new();
        survey.prepare().unwrap();
        survey
    }

    #[test]
    fn a_blocked_thread_is_waiting_and_the_caller_is_left_out() {
        let (tid, stop, handle) = blocked_thread();
        let mut survey = empty_survey();
        survey
            .take(threads::gettid(), Duration::from_secs(1))
            .unwrap();
        let me = threads::gettid();
        assert!(!survey.running().contains(&me) && survey.waiting().iter().all(|w| w.tid != me));
        let w = survey
            .waiting()
            .iter()
            .find(|w| w.tid == tid)
            .expect("listed as waiting");
        assert!(w.nr >= 0 && w.sp != 0 && w.pc != 0, "{w:?}");
        assert!(Survey::still_waiting(w));
        assert!(!survey.running().contains(&tid));
        drop(stop);
        handle.join().unwrap();
    }

    #[test]
    fn an_unproven_thread_stays_to_be_stopped_and_is_not_read_again() {
        let (tid, stop, handle) = blocked_thread();
        let mut survey = empty_survey();
        assert!(survey.mark_unproven(tid));
        assert!(
            !survey.any_unsettled(),
            "an unproven thread is no reason to nap"
        );
        survey.settle_running();
        assert_eq!(
            survey.running(),
            &[tid][..],
            "settling must not take it back"
        );
        assert!(survey.waiting().is_empty(), "nor list it as waiting again");
        drop(stop);
        handle.join().unwrap();
    }

    #[test]
    fn a_thread_marked_running_that_blocked_is_settled_back_to_waiting() {
        let (tid, stop, handle) = blocked_thread();
        let (other, stop_other, handle_other) = blocked_thread();
        let mut survey = empty_survey();
        assert!(survey.mark_unproven(other));
        assert!(survey.mark_running(tid));
        assert_eq!(survey.running(), &[tid, other][..]);
        assert!(survey.any_unsettled());
        survey.settle_running();
        assert_eq!(survey.running(), &[other][..], "the unproven one stays");
        assert_eq!(
            survey.waiting().iter().map(|w| w.tid).collect::<Vec<_>>(),
            [tid]
        );
        assert!(!survey.any_unsettled());
        drop((stop, stop_other));
        handle.join().unwrap();
        handle_other.join().unwrap();
    }

    #[test]
    fn a_spinning_thread_is_running_and_stays_so_when_settled() {
        let spin = Arc::new(AtomicBool::new(true));
        let tid = Arc::new(AtomicI32::new(0));
        let handle = {
            let (spin, tid) = (spin.clone(), tid.clone());
            std::thread::spawn(move || {
                tid.store(threads::gettid(), Ordering::SeqCst);
                while spin.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        while tid.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let tid = tid.load(Ordering::SeqCst);
        let mut survey = empty_survey();
        survey
            .take(threads::gettid(), Duration::from_secs(1))
            .unwrap();
        assert!(survey.running().contains(&tid));
        assert!(survey.any_unsettled());
        survey.settle_running();
        assert!(
            survey.running().contains(&tid),
            "still spinning: still to be stopped"
        );
        assert!(survey.any_unsettled());
        spin.store(false, Ordering::Relaxed);
        handle.join().unwrap();
    }
}
