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
    running: Vec<i32>,
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
                SyscallState::Running => self.running.push(tid),
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

    /// Moves the running threads that have blocked since the survey to the waiting ones: a
    /// thread that waits most of the time runs only for moments, and signalling it right as
    /// it blocks again would interrupt its system call. Allocates nothing.
    pub fn settle_running(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let tid = self.running[i];
            match Self::reread(tid) {
                Some(w) if self.waiting.len() < self.waiting.capacity() => {
                    self.waiting.push(w);
                    self.running.swap_remove(i);
                }
                _ => i += 1,
            }
        }
    }

    /// Threads found on a CPU or ready to run.
    pub fn running(&self) -> &[i32] {
        &self.running
    }

    /// Threads found blocked in the kernel.
    pub fn waiting(&self) -> &[Waiting] {
        &self.waiting
    }

    /// Adds `tid` to the running threads (a waiting thread that ran meanwhile, to be stopped
    /// and checked precisely). Allocates nothing; false when there is no room.
    pub fn mark_running(&mut self, tid: i32) -> bool {
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
