//! `dsu`: apply, revert and inspect live patches of a running process through its agent.
//!
//! The commands talk to the agent through the control socket in its control directory
//! (`docs/control-protocol.md`); exit codes and output are documented in `docs/cli.md`.

mod build;
mod discover;
mod error;
mod fan_out;
mod fleet;
mod inspect;
mod output;
mod pack;
mod patch;
mod persist;
mod ps;
mod request;
mod rollout;
mod sys;
mod target;
mod trust;

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dsu_agent::control::{RESULT_FILE, RequestOp, STATUS_FILE};
use dsu_agent::report::{Outcome, Status, StatusReport};

use crate::error::CliError;
use crate::target::Target;

#[derive(Debug, Parser)]
#[command(
    name = "dsu",
    version,
    about = "Live-patch functions of a running Linux process",
    long_about = "Live-patch functions of a running Linux process. The target must run the dsu \
                  agent: linked (dsu_agent::install() in Rust, dsu_install() in C) or preloaded \
                  (LD_PRELOAD=libdsu_agent.so).",
    after_help = "Examples:\n  \
                  cc -c -fPIC -O2 fix.c -o fix.o && dsu apply -p 4242 fix.o\n  \
                  dsu status -p 4242\n  \
                  dsu revert -p 4242\n  \
                  dsu ps\n  \
                  dsu apply --all --exe /usr/bin/shop fix.o\n  \
                  dsu inspect fix.o --against 4242\n  \
                  dsu build orig/shop.o fixed/shop.o -o fix.o"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply a patch to a running process and wait until it is applied.
    Apply(ApplyArgs),
    /// Revert a patch (the newest by default).
    Revert(RevertArgs),
    /// Show the agent and the answer to its last request.
    Status(StatusArgs),
    /// List the processes with a dsu agent: pid, user, build id, patches, executable.
    Ps(ps::PsArgs),
    /// Show what a patch replaces, adds and needs.
    Inspect(inspect::InspectArgs),
    /// Build a patch from the object of a source file before and after a fix.
    Build(build::BuildArgs),
    /// Create an ed25519 key pair for signing patches (KEY and KEY.pub).
    Keygen(trust::KeygenArgs),
    /// Sign a patch: append a signature trailer agents with trusted keys verify.
    Sign(trust::SignArgs),
    /// Bind a patch to a program: record the build id and code hash of each function it
    /// replaces (section .dsu.expect).
    Pack(pack::PackArgs),
}

#[derive(Debug, Args)]
struct TargetArgs {
    /// Process id of the target.
    #[arg(short, long, value_name = "PID", value_parser = clap::value_parser!(u32).range(1..=i32::MAX as i64))]
    pid: u32,
    /// The target's control directory, when its agent was configured with one its
    /// environment does not name.
    #[arg(long, value_name = "DIR")]
    control_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ApplyArgs {
    #[command(flatten)]
    target: rollout::Targets,
    /// The patch: an ELF relocatable object (`cc -c -fPIC`, `rustc --emit=obj`).
    #[arg(value_name = "PATCH")]
    patch: PathBuf,
    /// Seconds the agent may keep retrying while a function to replace is active.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_timeout)]
    timeout: Duration,
    /// Apply even though the program has compiler clones of a replaced function
    /// (`NAME.constprop.N`, `.isra.N`, `.part.N`) that the patch leaves alone: their callers
    /// keep the old code.
    #[arg(long)]
    allow_stale_clones: bool,
    #[command(flatten)]
    canary: rollout::CanaryArgs,
    /// Also keep the patch for the program's build, so that processes of it started later
    /// apply it at start-up (`dsu revert` removes it).
    #[arg(long, conflicts_with = "allow_stale_clones")]
    persist: bool,
}

#[derive(Debug, Args)]
struct RevertArgs {
    #[command(flatten)]
    target: rollout::Targets,
    /// Patch id (the `seq` of its apply, as `dsu status` shows); the newest if omitted.
    #[arg(value_name = "ID")]
    id: Option<u64>,
    /// Seconds the agent may keep retrying while a function to restore is active.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_timeout)]
    timeout: Duration,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Print the patches in effect as JSON (`status.json`: `{"pid":N,"patches":[...]}`).
    #[arg(long)]
    json: bool,
}

/// A positive number of seconds, fractions allowed, at most a day.
fn parse_timeout(value: &str) -> Result<Duration, String> {
    let secs: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("{value} is not between 0 and 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Apply(args) => apply(args),
        Command::Revert(args) => revert(args),
        Command::Status(args) => status(args),
        Command::Ps(args) => ps::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Build(args) => build::run(args),
        Command::Keygen(args) => trust::keygen(args),
        Command::Sign(args) => trust::sign(args),
        Command::Pack(args) => pack::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dsu: {}", e.one_line());
            ExitCode::from(e.exit_code())
        }
    }
}

fn apply(args: &ApplyArgs) -> Result<(), CliError> {
    let Some(target_args) = args.target.single() else {
        return rollout::apply(args);
    };
    // Local checks first: a bad file is refused before the process is touched, and on record
    // like the agent's refusals.
    let bytes = patch::read_patch(&args.patch).inspect_err(|e| {
        let audit = dsu_agent::audit::Audit::new(dsu_agent::audit::socket_from_env());
        let uid = sys::effective_uid();
        let line = dsu_agent::audit::tool_refusal_line(
            "apply",
            target_args.pid,
            uid,
            &args.patch,
            &e.to_string(),
        );
        audit.send(&line);
    })?;
    let target = locate(&target_args)?;
    let keep_for = if args.persist {
        Some(persist::before_apply(target.pid)?)
    } else {
        None
    };
    let op = RequestOp::Apply {
        // Over the socket only a label: the agent keeps the bytes as consumed/<seq>.patch.
        file: args.patch.display().to_string(),
    };
    let outcome = request::exchange(
        &target,
        op,
        Some(&bytes),
        args.timeout,
        args.allow_stale_clones,
    )?;
    let patch_id = outcome.patch_id.unwrap_or(outcome.seq);
    report(target.pid, outcome)?;
    match keep_for {
        Some(build_id) => persist::after_apply(target.pid, patch_id, &bytes, &build_id),
        None => Ok(()),
    }
}

fn revert(args: &RevertArgs) -> Result<(), CliError> {
    let Some(target_args) = args.target.single() else {
        return rollout::revert(args);
    };
    let target = locate(&target_args)?;
    let op = RequestOp::Revert { patch_id: args.id };
    let outcome = request::exchange(&target, op, None, args.timeout, false)?;
    let reverted = outcome.record.as_ref().and_then(|r| r.patch_sha256.clone());
    report(target.pid, outcome)?;
    match reverted {
        Some(sha256) => persist::after_revert(target.pid, &sha256),
        None => Ok(()),
    }
}

/// How long `dsu status` waits for the agent (plus the exchange's grace) before it shows
/// `status.json` instead: the agent answers between updates, and one may be retrying.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

fn status(args: &StatusArgs) -> Result<(), CliError> {
    let target = locate(&args.target)?;
    // Asked over the socket: the agent reports its state as it is now (a taken-over trigger
    // signal, say), and an agent that is not running is noticed at once.
    let (status, busy) =
        match request::exchange(&target, RequestOp::Status, None, STATUS_TIMEOUT, false) {
            Ok(mut answer) => match answer.status.take() {
                Some(status) => (status, false),
                None if answer.outcome != Status::Applied => {
                    return Err(CliError::Agent {
                        outcome: Box::new(answer),
                    });
                }
                None => (empty_status(target.pid), false),
            },
            // Busy with an update that is still retrying: what it wrote after the last change.
            Err(CliError::TimedOut { .. }) => (read_status_file(&target)?, true),
            Err(e) => return Err(e),
        };
    if args.json {
        output::print_line(serde_json::to_string(&status).expect("a status report serialises"));
        return Ok(());
    }
    let result_path = target.dir.join(RESULT_FILE);
    let last = read_optional(&result_path)?
        .as_deref()
        .map(serde_json::from_str::<Outcome>)
        .transpose()
        .map_err(|e| CliError::Malformed {
            path: result_path.clone(),
            reason: e.to_string(),
        })?;
    if busy {
        output::print_line(format_args!(
            "the agent is busy with an update; as of its last change ({}):",
            target.dir.join(STATUS_FILE).display()
        ));
    }
    for line in output::status_lines(target.pid, &target.agent, &status, last.as_ref()) {
        output::print_line(line);
    }
    Ok(())
}

fn empty_status(pid: u32) -> StatusReport {
    StatusReport {
        pid,
        patches: Vec::new(),
        agent: None,
        kept: Vec::new(),
    }
}

/// `status.json` as the agent last wrote it; no patches before its first write.
fn read_status_file(target: &Target) -> Result<StatusReport, CliError> {
    let path = target.dir.join(STATUS_FILE);
    match read_optional(&path)? {
        Some(text) => serde_json::from_str(&text).map_err(|e| CliError::Malformed {
            path,
            reason: e.to_string(),
        }),
        None => Ok(empty_status(target.pid)),
    }
}

/// A file's text, `None` when it does not exist. The directory belongs to the target's user,
/// who may plant anything there (`dsu` may run as root): read as the agent reads requests.
fn read_optional(path: &std::path::Path) -> Result<Option<String>, CliError> {
    use dsu_agent::control::{Limited, MAX_ANSWER_SIZE, read_limited};
    let malformed = |reason: String| CliError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    match read_limited(path, MAX_ANSWER_SIZE) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|e| malformed(e.to_string())),
        Err(Limited::Io(e)) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(Limited::Io(e)) if e.kind() == io::ErrorKind::InvalidInput => {
            Err(malformed(e.to_string()))
        }
        Err(Limited::Io(e)) => Err(CliError::proc(path.to_path_buf(), e)),
        Err(Limited::TooLarge(size)) => Err(malformed(format!(
            "{size} bytes, over the limit of {MAX_ANSWER_SIZE}"
        ))),
    }
}

fn locate(args: &TargetArgs) -> Result<Target, CliError> {
    sweep_dead_agents();
    Target::locate(args.pid, args.control_dir.as_deref())
}

/// Removes the control directories (and perf maps) that agents of exited processes left in
/// this user's base directories: `$XDG_RUNTIME_DIR/dsu` and `/tmp/dsu-<uid>`.
fn sweep_dead_agents() {
    use dsu_agent::control::cleanup::sweep_dead;
    let uid = sys::effective_uid();
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && runtime.is_absolute()
    {
        sweep_dead(&runtime.join("dsu"), uid);
    }
    sweep_dead(&PathBuf::from(format!("/tmp/dsu-{uid}")), uid);
}

/// Prints an applied outcome, or turns any other into the error `dsu` exits with.
fn report(pid: u32, outcome: Outcome) -> Result<(), CliError> {
    if outcome.outcome != Status::Applied {
        return Err(CliError::Agent {
            outcome: Box::new(outcome),
        });
    }
    for function in &outcome.functions {
        output::print_line(output::function_line(function));
    }
    output::print_line(output::summary_line(pid, &outcome));
    for warning in &outcome.warnings {
        eprintln!("dsu: warning: {warning}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn timeouts_accept_fractions_and_refuse_nonsense() {
        assert_eq!(parse_timeout("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["0", "-1", "nan", "inf", "abc", "100000"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }
}
