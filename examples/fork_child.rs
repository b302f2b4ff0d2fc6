//! The in-process API in a `fork()`ed child: `tests/control_socket.rs` runs this program.
//!
//! It installs the agent, forks, and in the child calls `Agent::apply_bytes` and `install()`:
//! both must return an error at once (a child has no agent thread). The child then exits
//! normally; its exit must leave the parent's control directory alone. The parent prints
//! whether its directory is still there and that its own agent still answers.

use std::process::ExitCode;

fn main() -> ExitCode {
    let agent = match dsu_agent::Builder::new().log(false).install() {
        Ok(agent) => agent,
        Err(e) => {
            eprintln!("install failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: the child only calls the agent's API (which checks the pid before anything
    // else), prints and exits; the agent thread, the only other thread, holds no lock the
    // child needs.
    let child = unsafe { libc::fork() };
    if child < 0 {
        eprintln!("fork failed");
        return ExitCode::FAILURE;
    }
    if child == 0 {
        let apply = agent.apply_bytes(b"\x7fELF not really".to_vec(), "child.o");
        println!(
            "child apply: {}",
            apply.map_or_else(|e| e.to_string(), |_| "applied".to_owned())
        );
        let install = dsu_agent::install();
        println!(
            "child install: {}",
            install.map_or_else(|e| e.to_string(), |_| "installed".to_owned())
        );
        std::process::exit(0);
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    unsafe { libc::waitpid(child, &mut status, 0) };
    println!("parent dir exists: {}", agent.control_dir().exists());
    let apply = agent.apply_bytes(b"not an object".to_vec(), "parent.o");
    println!(
        "parent apply: {}",
        apply.map_or_else(|e| e.to_string(), |_| "applied".to_owned())
    );
    ExitCode::SUCCESS
}
