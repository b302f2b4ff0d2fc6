//! Shared helpers of the end-to-end tests: build real patches and programs with `cc` and
//! `rustc` at test time, in a scratch directory under cargo's target dir.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Compiles C source to a relocatable object as a patch author would.
pub fn cc_object(dir: &Path, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    let obj = dir.join(format!("{name}.o"));
    std::fs::write(&src, source).unwrap();
    run(Command::new("cc")
        .args([
            "-c",
            "-fPIC",
            "-O2",
            "-ffunction-sections",
            "-fdata-sections",
        ])
        .args(flags)
        .arg("-o")
        .arg(&obj)
        .arg(&src));
    obj
}

/// Compiles and links C source into an executable.
pub fn cc_program(dir: &Path, name: &str, sources: &[(&str, &str)], flags: &[&str]) -> PathBuf {
    let exe = dir.join(name);
    let mut cmd = Command::new("cc");
    cmd.args(["-O2", "-g", "-o"]).arg(&exe);
    for (file, text) in sources {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        cmd.arg(path);
    }
    cmd.args(flags);
    run(&mut cmd);
    exe
}

/// Compiles Rust source (edition 2024) to a relocatable object with the toolchain that built
/// the tests, so core/std symbols match the running program's.
pub fn rustc_object(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.rs"));
    let obj = dir.join(format!("{name}.o"));
    std::fs::write(&src, source).unwrap();
    run(Command::new(rustc())
        .args(["--edition=2024", "--crate-type=lib", "--emit=obj", "-O"])
        .args(["--crate-name", name])
        .arg("-o")
        .arg(&obj)
        .arg(&src));
    obj
}

pub fn rustc() -> String {
    std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string())
}

/// Path of a binary built by cargo for this workspace (`dsu`, examples).
pub fn cargo_bin(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let profile_dir = deps.parent().unwrap().parent().unwrap();
    let direct = profile_dir.join(name);
    if direct.exists() {
        return direct;
    }
    profile_dir.join("examples").join(name)
}
