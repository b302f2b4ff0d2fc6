//! dsu agent: applies live patches to the running process.
//!
//! Add `dsu_agent::install()?;` to `main`; then an operator runs `dsu apply -p PID fix.o` (or
//! drops `fix.o` as `<control dir>/patch` and sends `SIGUSR2`). The modules follow the update
//! sequence:
//!
//! trigger -> load -> resolve -> relocate -> place (together: [`link`]) -> [`prepare`] ->
//! [`hold`] (breakpoints on the edits) -> [`survey`] (which threads run, which wait) ->
//! [`stop`] (the running ones) -> [`check`] -> [`mod@write`] -> [`report`], driven by
//! [`update`]. Once an update is done, [`names`] and [`debugger`] tell profilers and
//! debuggers about the new code.

#![deny(unsafe_op_in_unsafe_fn)]
// Unsafe code only in the modules that say why they need it (`#![allow(unsafe_code)]`).
#![deny(unsafe_code)]

pub mod agent;
pub mod audit;
pub mod callsites;
mod capi;
pub mod check;
pub mod config;
pub mod control;
pub mod debugger;
pub mod error;
pub mod frame_rules;
pub mod gate;
pub mod hold;
pub mod inspect;
pub mod link;
pub mod load;
pub mod names;
pub mod persist;
pub mod place;
pub mod prepare;
pub mod relocate;
pub mod report;
pub mod resolve;
pub mod stacks;
pub mod stop;
pub mod survey;
mod trigger;
pub mod trust;
pub mod unwind;
pub mod update;
pub mod write;

pub use agent::Agent;
pub use config::Builder;
pub use error::Error;
pub use update::{Applied, AppliedPatch, Policy, Reverted, Stages, Switched, UpdateError};

/// Installs the agent with the default configuration (see [`Builder`]). Idempotent: later
/// calls return the same agent. The agent runs for the life of the process.
pub fn install() -> Result<Agent, Error> {
    Builder::new().install()
}
