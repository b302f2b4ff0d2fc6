//! Human-readable lines for agent answers.

use dsu_agent::report::{
    AgentInfo, AgentState, FunctionReport, KeptReport, Outcome, Status, StatusReport,
    ThreadsStopped,
};

/// Writes `line` and a newline to stdout. A reader that went away (`dsu inspect | head`) is
/// not an error, as with other command-line tools: the rest of the output is dropped quietly.
pub fn print_line(line: impl std::fmt::Display) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}")
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("dsu: cannot write to standard output: {e}");
    }
}

/// How the agent is reached: its socket and its trigger signal.
fn agent_lines(state: &AgentState) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(socket) = &state.socket {
        lines.push(format!("control socket {socket}"));
    }
    lines.push(match state.trigger_signal {
        None => "trigger signal: none (the socket only)".to_owned(),
        Some(signal) if state.trigger_taken_over => format!(
            "trigger signal {}: taken over by the program; dsu still reaches the agent \
             through its socket",
            signal_name(signal)
        ),
        Some(signal) => format!("trigger signal {}", signal_name(signal)),
    });
    lines
}

/// `SIGUSR2` for 12, `SIGRTMIN+3` for the fourth real-time signal, the number otherwise.
fn signal_name(signal: i32) -> String {
    const NAMES: [(i32, &str); 6] = [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGWINCH, "SIGWINCH"),
        (libc::SIGPWR, "SIGPWR"),
        (libc::SIGURG, "SIGURG"),
    ];
    if let Some((_, name)) = NAMES.iter().find(|(n, _)| *n == signal) {
        return (*name).to_owned();
    }
    let rt_min = libc::SIGRTMIN();
    if (rt_min..=libc::SIGRTMAX()).contains(&signal) {
        return format!("SIGRTMIN+{}", signal - rt_min);
    }
    format!("{signal}")
}

/// One line per function, e.g.
/// `price (/usr/bin/app): 0x55d0c0a01234 -> 0x7f3a9c000040, redirect, 2 call sites rewritten`.
pub fn function_line(f: &FunctionReport) -> String {
    let sites = match f.call_sites {
        1 => "1 call site rewritten".to_owned(),
        n => format!("{n} call sites rewritten"),
    };
    format!(
        "{} ({}): {} -> {}, {}, {sites}",
        f.name, f.module, f.old_address, f.new_address, f.strategy
    )
}

/// The closing line of a successful `apply` or `revert`.
pub fn summary_line(pid: u32, outcome: &Outcome) -> String {
    let verb = match outcome.op.as_str() {
        "revert" => "reverted",
        _ => "applied",
    };
    // The fallback path is worth knowing: it holds every thread, waiting ones included.
    let every = match outcome.threads_stopped {
        Some(ThreadsStopped::All) => ", every thread stopped",
        _ => "",
    };
    format!(
        "{verb} patch {} in process {pid} in {} us after {}{every}",
        outcome.patch_id.unwrap_or(outcome.seq),
        outcome.elapsed_us,
        attempts(outcome.attempts)
    )
}

/// `dsu status` without `--json`: the agent, the patches in effect, the last answer.
pub fn status_lines(
    pid: u32,
    agent: &AgentInfo,
    status: &StatusReport,
    last: Option<&Outcome>,
) -> Vec<String> {
    let mut lines = vec![format!(
        "process {pid}: dsu agent {} (protocol {})",
        agent.version, agent.protocol
    )];
    if let Some(state) = &status.agent {
        lines.extend(agent_lines(state));
    }
    match status.patches.as_slice() {
        [] => lines.push("no patch applied".to_owned()),
        patches => {
            lines.push(format!(
                "{} patch(es) applied, oldest first:",
                patches.len()
            ));
            for p in patches {
                lines.push(format!(
                    "patch {}: {} (sha256 {}), applied {}",
                    p.id,
                    p.file,
                    p.sha256.get(..16).unwrap_or(&p.sha256),
                    when(p.applied_at, now_unix())
                ));
                lines.extend(
                    p.functions
                        .iter()
                        .map(|f| format!("  {}", function_line(f))),
                );
            }
        }
    }
    lines.extend(kept_lines(&status.kept));
    let Some(outcome) = last else {
        lines.push("no request answered yet".to_owned());
        return lines;
    };
    let source = match &outcome.request {
        Some(id) => format!("request {id}"),
        None => "raw trigger".to_owned(),
    };
    let mut last = format!(
        "last: {} #{} ({source}): {} in {} us after {}",
        outcome.op,
        outcome.seq,
        outcome.outcome.as_str(),
        outcome.elapsed_us,
        attempts(outcome.attempts)
    );
    if outcome.outcome != Status::Applied
        && let Some(error) = &outcome.error
    {
        last.push_str(": ");
        last.push_str(&crate::error::one_line(error));
    }
    lines.push(last);
    lines.extend(
        outcome
            .functions
            .iter()
            .map(|f| format!("  {}", function_line(f))),
    );
    lines
}

/// What became of the kept patches the agent found at install, one line each.
fn kept_lines(kept: &[KeptReport]) -> Vec<String> {
    if kept.is_empty() {
        return Vec::new();
    }
    let mut lines = vec![format!("{} kept patch(es) tried at start-up:", kept.len())];
    lines.extend(kept.iter().map(|k| match (k.patch_id, &k.error) {
        (Some(id), _) => format!("  {}: applied as patch {id}", k.file),
        (None, Some(error)) => format!(
            "  {}: {}: {}",
            k.file,
            k.outcome.as_str(),
            crate::error::one_line(error)
        ),
        (None, None) => format!("  {}: {}", k.file, k.outcome.as_str()),
    }));
    lines
}

fn attempts(n: u32) -> String {
    match n {
        1 => "1 attempt".to_owned(),
        n => format!("{n} attempts"),
    }
}

/// Seconds since the Unix epoch now.
fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `2026-11-29 14:10:27 UTC (3 min ago)` for a Unix time, given the time now.
fn when(unix: u64, now: u64) -> String {
    let ago = now.saturating_sub(unix);
    let ago = match ago {
        0..60 => format!("{ago} s ago"),
        60..3600 => format!("{} min ago", ago / 60),
        3600..86_400 => format!("{} h {} min ago", ago / 3600, ago % 3600 / 60),
        _ => format!("{} days ago", ago / 86_400),
    };
    format!("{} UTC ({ago})", dsu_agent::report::utc(unix))
}

#[cfg(test)]
mod tests {
    #[test]
    fn unix_times_read_as_utc_dates() {
        assert_eq!(dsu_agent::report::utc(0), "1970-01-01 00:00:00");
        assert_eq!(dsu_agent::report::utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(dsu_agent::report::utc(1_795_961_427), "2026-11-29 14:10:27");
        assert_eq!(dsu_agent::report::utc(4_107_542_399), "2100-02-28 23:59:59");
        assert_eq!(
            super::when(1_795_961_427, 1_795_961_430),
            "2026-11-29 14:10:27 UTC (3 s ago)"
        );
        assert!(super::when(0, 200_000).ends_with("(2 days ago)"));
        assert!(super::when(0, 3_700).ends_with("(1 h 1 min ago)"));
    }

    use super::*;

    #[test]
    fn function_lines_read_well() {
        let f = FunctionReport {
            name: "price".into(),
            module: "/usr/bin/app".into(),
            old_address: "0x1000".into(),
            new_address: "0x2000".into(),
            strategy: "redirect".into(),
            call_sites: 1,
        };
        assert_eq!(
            function_line(&f),
            "price (/usr/bin/app): 0x1000 -> 0x2000, redirect, 1 call site rewritten"
        );
    }

    #[test]
    fn the_summary_says_when_every_thread_was_stopped() {
        let mut outcome = Outcome::new(4, None, "apply".into(), Status::Applied, None);
        outcome.attempts = 2;
        outcome.elapsed_us = 812;
        outcome.patch_id = Some(4);
        for (stopped, tail) in [
            (None, ""),
            (Some(ThreadsStopped::Running), ""),
            (Some(ThreadsStopped::All), ", every thread stopped"),
        ] {
            outcome.threads_stopped = stopped;
            assert_eq!(
                summary_line(77, &outcome),
                format!("applied patch 4 in process 77 in 812 us after 2 attempts{tail}")
            );
        }
    }
}
