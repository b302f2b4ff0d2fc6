//! Benchmarks of dsu: what an update costs, measured against the alternatives.
//!
//! The benchmark program (`dsu-bench`, `src/main.rs`) measures the whole-process figures, each
//! section in child processes of its own, and prints a table per section and writes JSON
//! (`target/bench/*.json`); the criterion benches of the root package (`benches/`) measure the
//! in-process micro figures with the same functions and patches. `docs/benchmarks.md` has the
//! figures, the machine and the commands.
//!
//! | module | measures |
//! | --- | --- |
//! | [`pause`] | longest hold of application threads: update vs bare stop/resume ([`bare`]) |
//! | [`apply`] | apply latency in process, split in stages; `dsu apply` start to exit |
//! | [`calls`] | steady-state cost per call (no agent, idle agent, patched); the peer, retour |
//! | [`memory`] | idle agent footprint, per-patch growth |
//! | [`restart`] | the demo service updated vs restarted under load |
//!
//! [`targets`] holds the functions that are patched and called, [`patches`] writes and
//! compiles the patches, [`workers`] the application threads.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod apply;
pub mod bare;
pub mod calls;
pub mod memory;
pub mod patches;
pub mod pause;
pub mod procfs;
pub mod report;
pub mod restart;
pub mod run;
pub mod stats;
pub mod targets;
pub mod workers;
