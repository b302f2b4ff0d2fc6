//! dsu agent: applies live patches to the running process.
//!
//! The modules follow the update sequence:
//! trigger -> load -> resolve -> relocate -> place (together: link) -> prepare -> stop ->
//! check -> write -> report.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod check;
pub mod config;
pub mod control;
pub mod error;
pub mod inspect;
pub mod link;
pub mod load;
pub mod place;
pub mod prepare;
pub mod relocate;
pub mod report;
pub mod resolve;
pub mod stop;
pub mod unwind;
pub mod update;
pub mod write;

mod capi;
mod trigger;
