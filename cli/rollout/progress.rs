//! The progress line of a host-wide command, on stderr when it is a terminal.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// `applying [#######       ] 120/400, 2 failed` on stderr, redrawn in place at most every
/// 50 ms, when stderr is a terminal; nothing otherwise.
pub struct Progress {
    on: bool,
    verb: &'static str,
    total: usize,
    done: usize,
    failed: usize,
    drawn: Option<Instant>,
}

const BAR: usize = 30;
const REDRAW: Duration = Duration::from_millis(50);

impl Progress {
    pub fn new(verb: &'static str, total: usize) -> Progress {
        Progress {
            on: std::io::stderr().is_terminal() && total > 0,
            verb,
            total,
            done: 0,
            failed: 0,
            drawn: None,
        }
    }

    /// One more process done, failed or not.
    pub fn step(&mut self, failed: bool) {
        self.done += 1;
        self.failed += usize::from(failed);
        if self.on && (self.done == self.total || self.drawn.is_none_or(|t| t.elapsed() >= REDRAW))
        {
            let _ = write!(std::io::stderr().lock(), "\r{}", self.line());
            self.drawn = Some(Instant::now());
        }
    }

    fn line(&self) -> String {
        let filled = (self.done * BAR).checked_div(self.total).unwrap_or(BAR);
        format!(
            "{} [{}{}] {}/{}, {} failed",
            self.verb,
            "#".repeat(filled),
            " ".repeat(BAR - filled),
            self.done,
            self.total,
            self.failed
        )
    }

    /// Clears the line before the summary is printed.
    pub fn finish(&mut self) {
        if self.drawn.take().is_some() {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_fills_its_bar() {
        let mut p = Progress::new("applying", 4);
        p.on = false;
        p.step(false);
        p.step(true);
        assert_eq!(
            p.line(),
            format!(
                "applying [{}{}] 2/4, 1 failed",
                "#".repeat(15),
                " ".repeat(15)
            )
        );
    }
}
