//! The JSON documents the agent writes into its control directory.
//!
//! These types are the wire format of protocol version 1 (`docs/control-protocol.md`): the
//! agent serialises them and the `dsu` command reads them back, so both sides share one
//! definition. Fields added later must be optional (`#[serde(default)]`) so that a `dsu` of
//! one version can read what an agent of a neighbouring version wrote.

use serde::{Deserialize, Serialize};

/// Version of the control protocol written into `agent.json`. Bump it only for changes an
/// older `dsu` could misread; adding an optional field is not such a change.
pub const PROTOCOL_VERSION: u32 = 1;

/// `agent.json`: written once at install, tells `dsu` that an agent listens and how to wake it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// [`PROTOCOL_VERSION`] of the agent that wrote the file.
    pub protocol: u32,
    /// Process id of the agent's process. A control directory left behind by a process that
    /// has exited may be found again by a new process with the same pid; `dsu` compares this
    /// and `start_time` with the live process before it sends any signal.
    pub pid: u32,
    /// Signal number that triggers the agent (`SIGUSR2` = 12 by default).
    pub signal: i32,
    /// Version of the `dsu-agent` crate.
    pub version: String,
    /// Start time of the process in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
    /// Together with `pid` it names one process for its whole life, even after pid reuse.
    /// Optional because a hand-written `agent.json` may leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
    /// File name of the control socket in the directory (`agent.sock`), when it listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// Why the agent has no control socket, when it could not create one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_error: Option<String>,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The operation took effect.
    Applied,
    /// The agent declined (bad input, activeness timeout, verification failure); the process
    /// is unchanged.
    Refused,
    /// Something went wrong while carrying the operation out (an I/O or system error); the
    /// process is unchanged as well, since an update never half-happens.
    Failed,
}

/// Which threads an update stopped ([`Outcome::threads_stopped`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThreadsStopped {
    /// Only the threads that ran; waiting ones were checked from copies of their stacks.
    Running,
    /// Every thread, parked while the edits were written.
    All,
}

impl Status {
    /// The word used on the wire and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Applied => "applied",
            Status::Refused => "refused",
            Status::Failed => "failed",
        }
    }
}

/// `result.json`: the outcome of the last request, raw trigger or `dsu` request alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Sequence number of the request in this process (1, 2, ...); also the patch id that
    /// `dsu revert` names, and the `consumed/<seq>.patch` file name.
    pub seq: u64,
    /// The `id` of the `request.json` this answers; `None` for a raw trigger. `dsu` waits for
    /// the result whose `request` equals the id it sent.
    pub request: Option<String>,
    /// `"apply"`, `"revert"`, `"status"`, or `"unknown"` when the request could not be parsed.
    pub op: String,
    /// How it ended.
    pub outcome: Status,
    /// One-line reason when refused or failed.
    #[serde(default)]
    pub error: Option<String>,
    /// How many times the activeness check ran (retries with backoff while a function was
    /// active); 0 when the request ended before the check.
    #[serde(default)]
    pub attempts: u32,
    /// Time from trigger to outcome, in microseconds.
    #[serde(default)]
    pub elapsed_us: u64,
    /// One entry per function replaced (or restored, for a revert).
    #[serde(default)]
    pub functions: Vec<FunctionReport>,
    /// The patch applied or reverted: for an apply it equals `seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_id: Option<u64>,
    /// Where the time went, when the update happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages_us: Option<StagesReport>,
    /// Which threads the update stopped, when it happened: `running` (the usual path: threads
    /// waiting in system calls were checked from copies of their stacks and kept waiting) or
    /// `all` (the fallback: every thread parked, as under a debugger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads_stopped: Option<ThreadsStopped>,
    /// For a `status` request over the control socket: the patches in effect and the agent's
    /// state, as `status.json` would hold them now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
    /// What an update that happened did not do or could not announce (compiler clones it
    /// left to the old code, a debugger registration that failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Who asked, for what and with which patch: the fields the system log records too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordReport>,
}

/// The record of an apply, a revert or a refusal: the same fields as its system log line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordReport {
    /// SHA-256 of the patch file as received (trailer included), hex; for a revert, of the
    /// patch reverted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_sha256: Option<String>,
    /// The key id (16 hex digits) the patch's signature trailer names, if it is signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// Whether that signature was verified against a trusted key (false when the agent has
    /// no trusted keys, or refused the patch).
    #[serde(default)]
    pub signature_verified: bool,
    /// The requester's uid: the socket peer's, the owner of a request file in the control
    /// directory, or the process's own for the in-process API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester_uid: Option<u32>,
    /// The target process.
    pub pid: u32,
    /// Its executable.
    #[serde(default)]
    pub exe: String,
}

impl Outcome {
    /// The answer to request `seq` before anything ran: no attempts, no functions.
    pub fn new(
        seq: u64,
        request: Option<String>,
        op: String,
        outcome: Status,
        error: Option<String>,
    ) -> Outcome {
        Outcome {
            seq,
            request,
            op,
            outcome,
            error,
            attempts: 0,
            elapsed_us: 0,
            functions: Vec::new(),
            patch_id: None,
            stages_us: None,
            threads_stopped: None,
            status: None,
            warnings: Vec::new(),
            record: None,
        }
    }
}

/// `update::Stages` in microseconds. `pause_us` is how long the threads were held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagesReport {
    pub link_us: u64,
    pub prepare_us: u64,
    pub stop_us: u64,
    pub check_us: u64,
    pub write_us: u64,
    pub resume_us: u64,
    pub pause_us: u64,
}

/// `status.json`: the patches in effect, oldest first, rewritten after every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub pid: u32,
    pub patches: Vec<PatchReport>,
    /// How the agent can be reached (absent in files of older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentState>,
    /// The patches kept for this program that the agent found at install, in the order it
    /// tried them, and what became of each (absent when there were none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<KeptReport>,
}

/// One kept patch (or a refused directory of them) the agent tried at install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptReport {
    /// The kept file, or the directory when the whole directory was refused.
    pub file: String,
    /// `applied`, or `refused`/`failed` with `error`.
    pub outcome: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The patch id it was applied as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_id: Option<u64>,
}

/// How the agent can be reached right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// The trigger signal, `None` when the agent was configured without one (`DSU_SIGNAL=none`).
    pub trigger_signal: Option<i32>,
    /// Whether the program has replaced the agent's handler of the trigger signal since
    /// install: the raw trigger then no longer reaches the agent; the socket still does.
    pub trigger_taken_over: bool,
    /// Path of the control socket, when it listens.
    pub socket: Option<String>,
}

/// One applied patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchReport {
    /// Patch id: the `seq` of the request that applied it.
    pub id: u64,
    /// The file it was applied from (`consumed/<seq>.patch` for `dsu` and the raw trigger).
    pub file: String,
    /// SHA-256 of the patch file, hex.
    pub sha256: String,
    /// The key id of its signature, if it is signed (verified when the agent has keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// When it was applied, seconds since the Unix epoch.
    pub applied_at: u64,
    pub functions: Vec<FunctionReport>,
    /// Global functions of the patch that replace nothing.
    #[serde(default)]
    pub added: Vec<String>,
}

/// What happened to one function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionReport {
    /// Symbol name as in the symbol table (mangled for Rust).
    pub name: String,
    /// Path of the module (executable or shared library) that holds the old function.
    pub module: String,
    /// Address of the old function, `"0x..."` hex.
    pub old_address: String,
    /// Address of the new code, `"0x..."` hex.
    pub new_address: String,
    /// `"redirect"` (entry jump to new code) or `"in-place"` (new code overwrote the old).
    pub strategy: String,
    /// Direct call sites rewritten to call the new code.
    #[serde(default)]
    pub call_sites: u32,
}

impl FunctionReport {
    /// Formats an address the way the report carries it.
    pub fn hex(address: u64) -> String {
        format!("{address:#x}")
    }
}

/// `YYYY-MM-DD HH:MM:SS` of a Unix time, in UTC (the proleptic Gregorian calendar, counted
/// in 400-year eras of 146 097 days).
pub fn utc(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_round_trips_with_the_documented_field_names() {
        let outcome = Outcome {
            seq: 3,
            request: Some("r1".into()),
            op: "apply".into(),
            outcome: Status::Refused,
            error: Some("price is active".into()),
            attempts: 7,
            elapsed_us: 1200,
            functions: vec![FunctionReport {
                name: "price".into(),
                module: "/usr/bin/app".into(),
                old_address: FunctionReport::hex(0x5555_0000_1234),
                new_address: FunctionReport::hex(0x7f00_0000_0000),
                strategy: "redirect".into(),
                call_sites: 2,
            }],
            patch_id: None,
            stages_us: None,
            threads_stopped: None,
            status: None,
            warnings: vec!["a warning".into()],
            record: None,
        };
        let json = serde_json::to_value(&outcome).unwrap();
        assert_eq!(json["outcome"], "refused");
        assert_eq!(json["functions"][0]["old_address"], "0x555500001234");
        let back: Outcome = serde_json::from_value(json).unwrap();
        assert_eq!(back, outcome);
    }

    #[test]
    fn agent_info_reads_a_minimal_hand_written_file() {
        let info: AgentInfo =
            serde_json::from_str(r#"{"protocol":1,"pid":42,"signal":12,"version":"0.1.0"}"#)
                .unwrap();
        assert_eq!(info.pid, 42);
        assert_eq!(info.start_time, None);
    }
}
