//! Thin Linux/x86_64 platform layer for dsu.
//!
//! Every item here is a small wrapper around one operating-system or CPU facility, returning
//! `std::io::Result` and keeping `unsafe` local. Porting dsu to another architecture means
//! editing this crate (and the agent's architecture module) only.
//!
//! Items marked *async-signal-safe* may be called from a signal handler or while other threads
//! of the process are stopped: they allocate nothing, take no lock and only issue raw syscalls.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod code;
pub mod cpu;
pub mod dl;
pub mod file_map;
pub mod frames;
pub mod futex;
pub mod gdb_jit;
pub mod ids;
pub mod maps;
pub mod mem;
pub mod modules;
pub mod net;
pub mod process;
pub mod raw;
pub mod signal;
pub mod stack;
pub mod tasks;
pub mod threads;
pub mod tls;
pub mod x86;
