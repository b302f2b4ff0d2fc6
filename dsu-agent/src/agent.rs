//! The agent: its thread, which runs every update, and the handle programs use to drive
//! updates themselves.
//!
//! All updates run on the agent thread, whether triggered by the signal, by `dsu` over the
//! control socket, or by the in-process API: the thread that asks is then stopped and checked
//! like any other, so a function it is executing is never replaced under it.
//!
//! The agent thread blocks every signal (but the synchronous ones its own faults would raise),
//! so the program's signals (a `signalfd` or `sigwait` reader's `SIGHUP`, say) always go to
//! the program's own threads. A `fork()`ed child has no agent thread: the API refuses at once
//! there instead of waiting for one.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use dsu_sys::code::CodeWriter;

use crate::audit::Audit;
use crate::config::Builder;
use crate::control::socket::{Client, Listener, SOCKET_FILE};
use crate::control::{ControlDir, Op, Request, RequestOp, SocketInfo, cleanup};
use crate::error::Error;
use crate::persist::Kept;
use crate::report::{
    AgentState, FunctionReport, KeptReport, Outcome, PatchReport, RecordReport, StagesReport,
    Status, StatusReport, ThreadsStopped,
};
use crate::stop::StopWorld;
use crate::trigger::{self, Trigger, Waiter, Waker};
use crate::update::{
    Applied, AppliedPatch, Engine, Policy, Reverted, Stages, Switched, UpdateError,
};

/// Handle to the installed agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    jobs: Mutex<VecDeque<Job>>,
    waker: Waker,
    control: ControlDir,
    config: Builder,
    patches: Mutex<Vec<AppliedPatch>>,
    /// The process the agent was installed in; a forked child has another pid.
    pid: u32,
    trigger: Trigger,
    /// The control socket's path, when it listens.
    socket: Option<std::path::PathBuf>,
    /// Set once the takeover of the trigger signal has been logged.
    takeover_logged: std::sync::atomic::AtomicBool,
    /// The system log, where every apply, revert and refusal is recorded.
    audit: Audit,
    /// This process's executable, for the records.
    exe: String,
    /// Whether the agent has trusted keys (a verified signature is then required).
    has_keys: bool,
    /// What became of the patches kept for this program, tried at install.
    kept: Mutex<Vec<KeptReport>>,
}

#[derive(Debug)]
enum Job {
    Apply {
        bytes: Vec<u8>,
        file: String,
        policy: Policy,
        reply: mpsc::Sender<Result<Applied, UpdateError>>,
    },
    Revert {
        id: Option<u64>,
        policy: Policy,
        reply: mpsc::Sender<Result<Reverted, UpdateError>>,
    },
}

static INSTALLED: OnceLock<Mutex<Option<Agent>>> = OnceLock::new();

pub(crate) fn install(mut config: Builder) -> Result<Agent, Error> {
    let mut slot = INSTALLED
        .get_or_init(|| Mutex::new(None))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(agent) = &*slot {
        let pid = std::process::id();
        if agent.shared.pid != pid {
            return Err(Error::Forked {
                agent_pid: agent.shared.pid,
                pid,
            });
        }
        return Ok(agent.clone());
    }
    let signals = config.signals()?;
    config.policy = config.effective_policy()?;
    // A bad trusted-keys file is an install error: an agent must not run with weaker trust
    // than it was configured with.
    let trust = config.trust_policy()?;
    let audit = Audit::new(config.syslog_socket_path());
    // Looked for before anything starts: without a directory this costs a failed `stat` per
    // base, and install() then does not wait for the agent thread.
    let kept = crate::persist::find(
        &config.patch_bases().list(),
        dsu_sys::ids::effective_uid(),
        crate::persist::build_id::of_this_process,
    );
    let dir = config
        .control_dir
        .clone()
        .unwrap_or_else(|| ControlDir::resolve(std::process::id()));
    let control = ControlDir::open_or_create(dir)?;
    let stopper = StopWorld::new(signals.stop).map_err(|e| match &signals.stop_var {
        Some(value) => Error::SignalVar {
            var: "DSU_STOP_SIGNAL",
            value: value.clone(),
            reason: e.to_string(),
        },
        None => Error::Stop(e),
    })?;
    let writer = CodeWriter::open().map_err(Error::CodeWriter)?;
    // Without SYNC_CORE the write stage relies on sigreturn serialising parked threads.
    let _ = dsu_sys::cpu::register_sync_core();
    let (waiter, waker, trigger) =
        trigger::register(signals.trigger).map_err(|source| Error::TriggerSignal {
            signal: signals.trigger.unwrap_or(0),
            source,
        })?;
    // Without a socket the agent still serves the raw trigger and in-process calls;
    // agent.json says why, so that `dsu` can tell the operator.
    let (listener, socket_info) = match Listener::bind(control.path()) {
        Ok(listener) => (
            Some(listener),
            SocketInfo {
                name: Some(SOCKET_FILE.to_owned()),
                error: None,
            },
        ),
        Err(e) => {
            if config.log {
                eprintln!("dsu: no control socket: {e}");
            }
            (
                None,
                SocketInfo {
                    name: None,
                    error: Some(e.to_string()),
                },
            )
        }
    };
    control.write_agent_info(signals.trigger.unwrap_or(0), socket_info)?;
    if let Err(e) = cleanup::remove_at_exit(control.path(), control.created())
        && config.log
    {
        eprintln!("dsu: the control directory will stay after exit: {e}");
    }

    let shared = Arc::new(Shared {
        jobs: Mutex::new(VecDeque::new()),
        waker,
        control,
        config,
        patches: Mutex::new(Vec::new()),
        pid: std::process::id(),
        trigger,
        socket: listener.as_ref().map(|l| l.path().to_owned()),
        takeover_logged: std::sync::atomic::AtomicBool::new(false),
        audit,
        exe: std::fs::read_link("/proc/self/exe")
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        has_keys: !trust.keys.is_empty(),
        kept: Mutex::new(Vec::new()),
    });
    let mut engine = Engine::new(stopper, writer);
    engine.set_trust(trust);
    let thread_shared = shared.clone();
    // The thread starts with every signal blocked but those raised by its own faults (a new
    // thread inherits the mask): the program's signals must reach the program's threads,
    // never the agent's.
    let saved = dsu_sys::signal::block_asynchronous().map_err(Error::Thread)?;
    let wait_for_kept = !kept.is_empty();
    let (kept_done, kept_applied) = mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("dsu-agent".into())
        .spawn(move || run(&thread_shared, engine, waiter, listener, kept, kept_done));
    let restored = dsu_sys::signal::set_mask(&saved);
    spawned.map_err(Error::Thread)?;
    restored.map_err(Error::Thread)?;
    if wait_for_kept {
        // The program's code runs the kept fixes from its first call after install(). An
        // error means the agent thread ended; the program starts regardless.
        let _ = kept_applied.recv();
    }
    let agent = Agent { shared };
    *slot = Some(agent.clone());
    Ok(agent)
}

impl Agent {
    /// Applies a patch given as the bytes of an ELF relocatable object, with the agent's
    /// policy. Blocks until it is applied or refused. `file` names it in reports.
    pub fn apply_bytes(&self, bytes: Vec<u8>, file: &str) -> Result<Applied, UpdateError> {
        self.apply_with(bytes, file, self.shared.config.policy)
    }

    /// Applies the patch file at `path`.
    pub fn apply_file(&self, path: impl AsRef<std::path::Path>) -> Result<Applied, ApplyFileError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| ApplyFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(self.apply_bytes(bytes, &path.display().to_string())?)
    }

    /// Applies with an explicit policy.
    pub fn apply_with(
        &self,
        bytes: Vec<u8>,
        file: &str,
        policy: Policy,
    ) -> Result<Applied, UpdateError> {
        self.in_agent_process()?;
        let (reply, answer) = mpsc::channel();
        self.submit(Job::Apply {
            bytes,
            file: file.to_string(),
            policy,
            reply,
        });
        answer.recv().unwrap_or(Err(UpdateError::AgentGone))
    }

    /// Reverts patch `id`, or the newest patch when `None`, with the agent's policy. Blocks
    /// until reverted or refused.
    pub fn revert(&self, id: Option<u64>) -> Result<Reverted, UpdateError> {
        self.in_agent_process()?;
        let (reply, answer) = mpsc::channel();
        self.submit(Job::Revert {
            id,
            policy: self.shared.config.policy,
            reply,
        });
        answer.recv().unwrap_or(Err(UpdateError::AgentGone))
    }

    /// Refuses at once in a `fork()`ed child, where no agent thread would ever answer.
    fn in_agent_process(&self) -> Result<(), UpdateError> {
        let pid = std::process::id();
        if pid == self.shared.pid {
            return Ok(());
        }
        Err(UpdateError::Forked {
            agent_pid: self.shared.pid,
            pid,
        })
    }

    fn submit(&self, job: Job) {
        self.shared
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(job);
        self.shared.waker.wake();
    }

    /// The patches in effect, oldest first.
    pub fn patches(&self) -> Vec<AppliedPatch> {
        self.shared
            .patches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The control directory this agent watches.
    pub fn control_dir(&self) -> &std::path::Path {
        self.shared.control.path()
    }

    /// The control socket's path, `None` when it could not be created.
    pub fn socket_path(&self) -> Option<&std::path::Path> {
        self.shared.socket.as_deref()
    }
}

/// Why `Agent::apply_file` failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyFileError {
    #[error("cannot read patch {}: {source}", .path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Update(#[from] UpdateError),
}

/// The agent thread: apply the kept patches and tell install() (`kept_done`); then wait for a
/// wake-up or a connection; run queued in-process jobs, then every request in the control
/// directory, then every pending connection.
fn run(
    shared: &Shared,
    mut engine: Engine,
    mut waiter: Waiter,
    listener: Option<Listener>,
    kept: Vec<Kept>,
    kept_done: mpsc::Sender<()>,
) {
    // One sequence for every request, whatever its source: an applied patch's id is the seq of
    // the request that applied it.
    let mut seq = 0u64;
    apply_kept(shared, &mut engine, kept, &mut seq);
    let _ = kept_done.send(());
    engine.warm_up();
    publish_status(shared, &engine);
    while let Ok(woken) = waiter.wait(listener.as_ref().map(|l| l.as_fd())) {
        if woken.trigger {
            run_jobs(shared, &mut engine, &mut seq);
            serve_directory(shared, &mut engine, &mut seq);
        }
        if woken.socket
            && let Some(listener) = &listener
        {
            serve_socket(shared, &mut engine, listener, &mut seq);
        }
    }
}

/// The patches kept for this program, each applied as an apply request of the process's own
/// uid (the same engine entry, so the same trust checks), whatever became of the others. Each
/// takes a number, as a request does; a file refused before the engine saw it too.
fn apply_kept(shared: &Shared, engine: &mut Engine, kept: Vec<Kept>, seq: &mut u64) {
    use sha2::{Digest, Sha256};
    if kept.is_empty() {
        return;
    }
    let mut reports = Vec::with_capacity(kept.len());
    // (sha256, patch id) of each kept patch applied: the same patch kept twice (system-wide and
    // per user) applies once.
    let mut applied: Vec<(String, u64)> = Vec::new();
    let no_result = &Err::<Switched, _>(UpdateError::AgentGone);
    for Kept { path, patch } in kept {
        *seq += 1;
        let label = path.display().to_string();
        let mut outcome = Outcome::new(*seq, None, "apply".into(), Status::Applied, None);
        let not_applied = |outcome: &mut Outcome, error: String| {
            if shared.config.log {
                eprintln!("dsu: {error}");
            }
            outcome.outcome = Status::Refused;
            outcome.error = Some(error);
        };
        let record = match patch {
            Ok(bytes) => {
                let hash = crate::trust::keys::hex(&Sha256::digest(&bytes));
                if let Some((_, id)) = applied.iter().find(|(h, _)| *h == hash) {
                    let error = format!(
                        "kept patch {label} is the same patch as patch {id}, applied already; \
                         skipped"
                    );
                    not_applied(&mut outcome, error);
                    record_of(shared, Some(own_uid()), Some(&bytes), no_result)
                } else {
                    let policy = shared.config.policy;
                    let result = guarded(|| engine.apply(&bytes, *seq, &label, &policy));
                    log_applied(shared, &label, &result);
                    report_switch(&mut outcome, &result);
                    if let Ok(done) = &result {
                        applied.push((hash, done.patch.id));
                    }
                    record_of(shared, Some(own_uid()), Some(&bytes), &result)
                }
            }
            Err(e) => {
                not_applied(&mut outcome, format!("{e}; not applied"));
                record_of(shared, Some(own_uid()), None, no_result)
            }
        };
        outcome.record = Some(record);
        shared.audit.send(&crate::audit::kept_line(&outcome, &path));
        reports.push(KeptReport {
            file: label,
            outcome: outcome.outcome,
            error: outcome.error,
            patch_id: outcome.patch_id,
        });
    }
    *shared.kept.lock().unwrap_or_else(|e| e.into_inner()) = reports;
    remember_patches(shared, engine);
}

/// The in-process API's jobs.
fn run_jobs(shared: &Shared, engine: &mut Engine, seq: &mut u64) {
    loop {
        let job = shared
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        let Some(job) = job else { break };
        *seq += 1;
        let seq = *seq;
        match job {
            Job::Apply {
                bytes,
                file,
                policy,
                reply,
            } => {
                let result = guarded(|| engine.apply(&bytes, seq, &file, &policy));
                log_applied(shared, &file, &result);
                let mut outcome = Outcome::new(seq, None, "apply".into(), Status::Applied, None);
                report_switch(&mut outcome, &result);
                outcome.record = Some(record_of(shared, Some(own_uid()), Some(&bytes), &result));
                shared.audit.record(&outcome);
                remember_patches(shared, engine);
                let _ = reply.send(result);
                // Names for profilers once the caller has its answer (best effort).
                let _ = engine.publish_names();
                write_status(shared, engine);
            }
            Job::Revert { id, policy, reply } => {
                let result = guarded(|| engine.revert(id, &policy));
                log_reverted(shared, &result);
                let mut outcome = Outcome::new(seq, None, "revert".into(), Status::Applied, None);
                report_switch(&mut outcome, &result);
                outcome.record = Some(record_of(shared, Some(own_uid()), None, &result));
                shared.audit.record(&outcome);
                remember_patches(shared, engine);
                let _ = reply.send(result);
                write_status(shared, engine);
            }
        }
    }
}

/// Every request waiting in the control directory (the raw trigger and `request.json`).
fn serve_directory(shared: &Shared, engine: &mut Engine, seq: &mut u64) {
    loop {
        let next = *seq + 1;
        match shared.control.take_request(next) {
            Ok(None) => break,
            Ok(Some(request)) => {
                *seq = next;
                let requester = shared.control.requester(next);
                let outcome = serve(shared, engine, request, next, requester);
                if outcome.op != "status" {
                    shared.audit.record(&outcome);
                }
                // status.json before the answer: a reader of result.json then finds
                // status.json up to date.
                publish_status(shared, engine);
                let _ = shared.control.write_result(&outcome);
                let _ = engine.publish_names();
            }
            Err(e) => {
                *seq = next;
                if shared.config.log {
                    eprintln!("dsu: {e}");
                }
                match e.outcome(next) {
                    Some(mut outcome) => {
                        outcome.record = Some(record_of::<Switched>(
                            shared,
                            shared.control.requester(next),
                            None,
                            &Err(UpdateError::AgentGone),
                        ));
                        shared.audit.record(&outcome);
                        let _ = shared.control.write_result(&outcome);
                    }
                    None => break, // untrusted directory: write nothing into it
                }
            }
        }
    }
}

/// Every pending connection on the control socket, one after the other.
fn serve_socket(shared: &Shared, engine: &mut Engine, listener: &Listener, seq: &mut u64) {
    loop {
        match listener.accept() {
            Ok(Some(client)) => serve_client(shared, engine, client, seq),
            Ok(None) => break,
            Err(e) => {
                if shared.config.log {
                    eprintln!("dsu: control socket: {e}");
                }
                // Out of descriptors, say: the connection stays pending and poll reports it
                // again at once. Pause rather than spin.
                std::thread::sleep(std::time::Duration::from_millis(10));
                break;
            }
        }
    }
}

/// One connection: check the peer, read the request, say it is taken, carry it out, answer.
/// A `status` request changes nothing and writes nothing; an apply or a revert is recorded
/// in `status.json` and `result.json` like a file request.
fn serve_client(shared: &Shared, engine: &mut Engine, mut client: Client, seq: &mut u64) {
    let refuse = |client: &Client, e: &dyn std::fmt::Display, outcome: Outcome| {
        if shared.config.log {
            eprintln!("dsu: control socket: {e}");
        }
        let _ = client.answer(&outcome);
    };
    let peer = match client.check_peer(shared.control.owner()) {
        Ok(uid) => uid,
        Err(e) => {
            let mut outcome = e.outcome(None);
            outcome.record = Some(record_of::<Switched>(
                shared,
                e.peer_uid(),
                None,
                &Err(UpdateError::AgentGone),
            ));
            shared.audit.record(&outcome);
            return refuse(&client, &e, outcome);
        }
    };
    let request = match client.read_request() {
        Ok(Some(request)) => request,
        Ok(None) => return, // connected and closed: someone checked that the agent lives
        Err(e) => {
            let mut outcome = e.outcome(None);
            outcome.record = Some(record_of::<Switched>(
                shared,
                Some(peer),
                None,
                &Err(UpdateError::AgentGone),
            ));
            shared.audit.record(&outcome);
            return refuse(&client, &e, outcome);
        }
    };
    if let Err(e) = shared.control.recheck() {
        let e = crate::control::socket::SocketError::from(e);
        return refuse(&client, &e, e.outcome(Some(&request.header)));
    }
    // A status request changes nothing and leaves no trace: it takes no number of its own
    // (patch ids stay consecutive however often `dsu status` runs), and answers with the
    // number of the last request.
    let is_status = request.header.op == RequestOp::Status;
    let next = if is_status { *seq } else { *seq + 1 };
    if client.take(next).is_err() {
        return; // the client gave up before the request was taken: nothing happens
    }
    *seq = next;
    // Kept where a file request's inputs would be, before it is carried out: the report
    // names the patch, and whoever watches the directory sees the update under way.
    if !is_status {
        let kept = shared
            .control
            .keep_request(next, &request.header)
            .and_then(|()| match &request.patch {
                Some(bytes) => shared.control.keep_patch(next, bytes),
                None => Ok(()),
            });
        if let Err(e) = kept
            && shared.config.log
        {
            eprintln!("dsu: cannot keep the request: {e}");
        }
    }
    let request = request.into_request(shared.control.consumed_patch(next));
    let mut outcome = serve(shared, engine, request, next, Some(peer));
    if !is_status {
        shared.audit.record(&outcome);
    }
    if is_status {
        outcome.status = Some(status_report(shared, engine));
    } else {
        // The files first, as for a file request: once `dsu` has its answer, status.json
        // and result.json tell the same.
        publish_status(shared, engine);
        let _ = shared.control.write_result(&outcome);
    }
    let _ = client.answer(&outcome);
    let _ = engine.publish_names();
}

/// Mirrors the patches in effect into memory (for `Agent::patches`) and `status.json`.
fn publish_status(shared: &Shared, engine: &Engine) {
    remember_patches(shared, engine);
    write_status(shared, engine);
}

/// The in-memory mirror, updated before an in-process caller gets its answer.
fn remember_patches(shared: &Shared, engine: &Engine) {
    *shared.patches.lock().unwrap_or_else(|e| e.into_inner()) = engine.patches().to_vec();
}

/// `status.json`, written after the answer: renaming a file is slower than the answer itself.
fn write_status(shared: &Shared, engine: &Engine) {
    let report = status_report(shared, engine);
    if let Err(e) = shared.control.write_status(&report)
        && shared.config.log
    {
        eprintln!("dsu: cannot write status: {e}");
    }
}

/// The patches in effect and how the agent can be reached now.
fn status_report(shared: &Shared, engine: &Engine) -> StatusReport {
    let taken_over = shared.trigger.taken_over();
    if taken_over
        && shared.config.log
        && !shared
            .takeover_logged
            .swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        eprintln!(
            "dsu: the program replaced the handler of signal {}: the raw trigger no longer \
             reaches the agent; dsu still does through its socket",
            shared.trigger.signal.unwrap_or(0)
        );
    }
    StatusReport {
        pid: shared.pid,
        patches: engine.patches().iter().map(patch_report).collect(),
        agent: Some(AgentState {
            trigger_signal: shared.trigger.signal,
            trigger_taken_over: taken_over,
            socket: shared.socket.as_ref().map(|p| p.display().to_string()),
        }),
        kept: shared
            .kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    }
}

fn patch_report(p: &AppliedPatch) -> PatchReport {
    PatchReport {
        id: p.id,
        file: p.file.clone(),
        sha256: p.sha256.clone(),
        signer: p.signer.clone(),
        applied_at: p
            .applied_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        functions: function_reports(p),
        added: p.added.clone(),
    }
}

/// A bug in the agent must not take the process down: it fails the one request.
fn guarded<T>(f: impl FnOnce() -> Result<T, UpdateError>) -> Result<T, UpdateError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        Err(UpdateError::Internal(what))
    })
}

fn log_reverted(shared: &Shared, result: &Result<Reverted, UpdateError>) {
    if !shared.config.log {
        return;
    }
    match result {
        Ok(r) => eprintln!(
            "dsu: reverted patch {} ({}) in {} us",
            r.patch.id,
            r.patch.file,
            r.elapsed.as_micros()
        ),
        Err(e) => eprintln!("dsu: revert refused: {e}"),
    }
}

fn log_applied(shared: &Shared, file: &str, result: &Result<Applied, UpdateError>) {
    if !shared.config.log {
        return;
    }
    match result {
        Ok(a) => {
            eprintln!(
                "dsu: applied patch {} ({file}): {} in {} us",
                a.patch.id,
                a.patch
                    .functions
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                a.elapsed.as_micros()
            );
            for warning in &a.warnings {
                eprintln!("dsu: patch {}: {warning}", a.patch.id);
            }
        }
        Err(e) => eprintln!("dsu: patch {file} not applied: {e}"),
    }
}

fn serve(
    shared: &Shared,
    engine: &mut Engine,
    request: Request,
    seq: u64,
    requester: Option<u32>,
) -> Outcome {
    let started = Instant::now();
    let op = request.op.name().to_string();
    let mut outcome = Outcome::new(seq, request.id, op, Status::Applied, None);
    match request.op {
        Op::Apply {
            bytes,
            file,
            timeout,
            allow_stale_clones,
        } => {
            let mut policy = policy_with(shared, timeout);
            policy.allow_stale_clones |= allow_stale_clones;
            let label = file.display().to_string();
            let result = guarded(|| engine.apply(&bytes, seq, &label, &policy));
            log_applied(shared, &label, &result);
            report_switch(&mut outcome, &result);
            outcome.record = Some(record_of(shared, requester, Some(&bytes), &result));
        }
        Op::Revert { patch_id, timeout } => {
            let policy = policy_with(shared, timeout);
            let result = guarded(|| engine.revert(patch_id, &policy));
            log_reverted(shared, &result);
            report_switch(&mut outcome, &result);
            outcome.record = Some(record_of(shared, requester, None, &result));
        }
        Op::Status => {
            outcome.functions = engine.patches().iter().flat_map(function_reports).collect();
        }
    }
    outcome.elapsed_us = started.elapsed().as_micros() as u64;
    outcome
}

/// The agent's policy, with the request's timeout when it gives one.
fn policy_with(shared: &Shared, timeout: Option<std::time::Duration>) -> Policy {
    let mut policy = shared.config.policy;
    if let Some(t) = timeout {
        policy.timeout = t;
    }
    policy
}

fn stages_report(s: &Stages) -> StagesReport {
    let us = |d: std::time::Duration| d.as_micros() as u64;
    StagesReport {
        link_us: us(s.link),
        prepare_us: us(s.prepare),
        stop_us: us(s.stop),
        check_us: us(s.check),
        write_us: us(s.write),
        resume_us: us(s.resume),
        pause_us: us(s.pause()),
    }
}

/// Fills `outcome` from the result of an apply or a revert.
fn report_switch(outcome: &mut Outcome, result: &Result<Switched, UpdateError>) {
    match result {
        Ok(done) => {
            outcome.attempts = done.attempts;
            outcome.functions = function_reports(&done.patch);
            outcome.patch_id = Some(done.patch.id);
            outcome.stages_us = Some(stages_report(&done.stages));
            outcome.threads_stopped = Some(if done.stages.every_thread_stopped {
                ThreadsStopped::All
            } else {
                ThreadsStopped::Running
            });
            outcome.warnings = done.warnings.clone();
        }
        Err(e) => refuse(outcome, e),
    }
}

fn refuse(outcome: &mut Outcome, e: &UpdateError) {
    outcome.outcome = if e.is_refusal() {
        Status::Refused
    } else {
        Status::Failed
    };
    outcome.attempts = e.attempts();
    outcome.error = Some(e.to_string());
}

fn function_reports(patch: &AppliedPatch) -> Vec<FunctionReport> {
    patch
        .functions
        .iter()
        .map(|f| FunctionReport {
            name: f.name.clone(),
            module: f.module.clone(),
            old_address: FunctionReport::hex(f.old_address as u64),
            new_address: FunctionReport::hex(f.new_address as u64),
            strategy: f.strategy.as_str().to_string(),
            call_sites: f.call_sites,
        })
        .collect()
}

/// The record of a request: the patch received (`patch`) or, for a revert, the patch
/// reverted (from `result`), who asked, and this process.
fn record_of<T: std::borrow::Borrow<Switched>>(
    shared: &Shared,
    requester: Option<u32>,
    patch: Option<&[u8]>,
    result: &Result<T, UpdateError>,
) -> RecordReport {
    use sha2::{Digest, Sha256};
    let done = result.as_ref().ok().map(|d| &d.borrow().patch);
    let (patch_sha256, signer) = match (patch, done) {
        (Some(bytes), _) => (
            Some(crate::trust::keys::hex(&Sha256::digest(bytes))),
            crate::trust::claimed_signer(bytes).map(|k| k.to_string()),
        ),
        (None, Some(p)) => (Some(p.sha256.clone()), p.signer.clone()),
        (None, None) => (None, None),
    };
    RecordReport {
        signature_verified: shared.has_keys && signer.is_some() && result.is_ok(),
        patch_sha256,
        signer,
        requester_uid: requester,
        pid: shared.pid,
        exe: shared.exe.clone(),
    }
}

/// This process's effective uid: the requester of an in-process call.
fn own_uid() -> u32 {
    dsu_sys::ids::effective_uid()
}
