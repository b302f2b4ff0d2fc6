//! The in-process API: a program that updates itself through the handle `install()` returns,
//! the way a service's admin endpoint would (see `docs/api.md`).
//!
//! `in_process PATCH.o` installs the agent and answers a fixed script of admin requests, one
//! line of output each:
//!
//! ```text
//! price 3       -> price(3) = 30
//! apply PATCH.o -> applied patch 1 from PATCH.o in 812 us after 1 attempt: dsu_example_price (in-place)
//! price 3       -> price(3) = 27              (whatever the patch computes)
//! patches       -> patch 1: PATCH.o, sha256 <64 hex digits>, replaces dsu_example_price
//! revert        -> reverted patch 1
//! price 3       -> price(3) = 30
//! patches       -> no patch applied
//! ```
//!
//! Any error is printed with its `Display` on stderr (`in_process: <error>`) and the program
//! exits with status 1. A patch for it is the new `dsu_example_price` compiled to an object:
//!
//! ```sh
//! cat > fix.rs <<'EOF'
//! #[unsafe(no_mangle)]
//! pub extern "C" fn dsu_example_price(qty: u64) -> u64 { qty * 9 }
//! EOF
//! rustc --edition=2024 --crate-type=lib --emit=obj -O fix.rs -o fix.o
//! cargo run --example in_process -- fix.o
//! ```
//!
//! The script calls [`admin`] the way an HTTP handler would: every update runs on the agent's
//! thread, and the thread that asks is stopped and checked like any other while it waits for
//! the answer. So a request may come from any thread, as long as that thread is not itself
//! inside a function the patch replaces.

use std::error::Error;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::Duration;

use dsu_agent::Agent;

/// The function a patch replaces: ten per item.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dsu_example_price(qty: u64) -> u64 {
    black_box(qty) * 10
}

/// Answers one admin request: `price N`, `apply PATH`, `patches`, `revert [ID]`.
fn admin(agent: &Agent, request: &str) -> Result<String, Box<dyn Error>> {
    let (verb, argument) = request.split_once(' ').unwrap_or((request, ""));
    match verb {
        "price" => {
            let qty: u64 = argument.parse()?;
            Ok(format!("price({qty}) = {}", dsu_example_price(qty)))
        }
        "apply" => {
            // Blocks until applied or refused (after the agent's timeout if a function to
            // replace stays active).
            let applied = agent.apply_file(argument)?;
            let functions: Vec<String> = applied
                .patch
                .functions
                .iter()
                .map(|f| format!("{} ({})", f.name, f.strategy.as_str()))
                .collect();
            Ok(format!(
                "applied patch {} from {} in {} us after {} attempt{}: {}",
                applied.patch.id,
                applied.patch.file,
                applied.elapsed.as_micros(),
                applied.attempts,
                if applied.attempts == 1 { "" } else { "s" },
                functions.join(", ")
            ))
        }
        "patches" => {
            let patches = agent.patches();
            if patches.is_empty() {
                return Ok("no patch applied".to_string());
            }
            let lines: Vec<String> = patches
                .iter()
                .map(|p| {
                    let names: Vec<&str> = p.functions.iter().map(|f| f.name.as_str()).collect();
                    format!(
                        "patch {}: {}, sha256 {}, replaces {}",
                        p.id,
                        p.file,
                        p.sha256,
                        names.join(", ")
                    )
                })
                .collect();
            Ok(lines.join("\n"))
        }
        "revert" => {
            // `None`: the newest patch, as `dsu revert` without an id.
            let id = match argument {
                "" => None,
                id => Some(id.parse()?),
            };
            let reverted = agent.revert(id)?;
            Ok(format!("reverted patch {}", reverted.patch.id))
        }
        _ => Err(format!("unknown request {request:?}").into()),
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let patch = std::env::args()
        .nth(1)
        .ok_or("usage: in_process PATCH.o (an object file that defines dsu_example_price)")?;
    // Idempotent: a second call anywhere in the program returns the same agent.
    let agent = dsu_agent::Builder::new()
        .timeout(Duration::from_secs(2))
        .log(false)
        .install()?;
    let apply = format!("apply {patch}");
    let script = [
        "price 3",
        apply.as_str(),
        "price 3",
        "patches",
        "revert",
        "price 3",
        "patches",
    ];
    for request in script {
        println!("{}", admin(&agent, request)?);
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("in_process: {e}");
            ExitCode::FAILURE
        }
    }
}
