//! The patches the benchmarks apply, compiled at run time with `rustc --emit=obj` as a patch
//! author would (the flags of `tests/support/mod.rs`), by the `rustc` that built the benchmark
//! (`$RUSTC`, else `rustc` on the `PATH`).
//!
//! Which strategy the engine picks follows from the object: a new version alone in its section
//! that fits the old function's bytes goes in place; a version that shares its section with
//! another function is redirected (entry jump, direct call sites rewritten). rustc puts each
//! function in a section of its own, so a redirect patch puts its function and a small added
//! helper into one named section with `#[unsafe(link_section)]`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::targets::{self, CHANGED_SHIFT, SHIFT};

/// How a patch wants to be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Alone in its section: in place when it fits.
    InPlace,
    /// Shares a section with an added helper: redirect.
    Redirect,
}

/// Source of a patch that replaces each `(name, k)` with `x * k ^ (x >> shift)`.
pub fn source(functions: &[(String, u64)], shift: u32, placement: Placement) -> String {
    let mut out = String::from("#![allow(clippy::all)]\n");
    for (name, k) in functions {
        match placement {
            Placement::InPlace => out.push_str(&targets::source(name, *k, shift, None)),
            Placement::Redirect => {
                let section = format!(".text.{name}_with_pad");
                out.push_str(&targets::source(name, *k, shift, Some(&section)));
                out.push_str(&format!(
                    "#[unsafe(no_mangle)]\n#[unsafe(link_section = \"{section}\")]\n\
                     pub extern \"C\" fn {name}_pad(x: u64) -> u64 {{ x.rotate_left(3) }}\n"
                ));
            }
        }
    }
    out
}

/// A patch changing targets `range` of [`targets::TARGETS`] (same size, other shift).
pub fn changed_targets(range: std::ops::Range<usize>, placement: Placement) -> String {
    let functions: Vec<(String, u64)> = range
        .map(|i| (targets::target_name(i), targets::k(i as u64)))
        .collect();
    source(&functions, CHANGED_SHIFT, placement)
}

/// A patch replacing `name` (constant `k`) with the very same code.
pub fn same_code(name: &str, k: u64, placement: Placement) -> String {
    source(&[(name.to_string(), k)], SHIFT, placement)
}

/// A patch replacing `name` (constant `k`) with the changed version.
pub fn changed(name: &str, k: u64, placement: Placement) -> String {
    source(&[(name.to_string(), k)], CHANGED_SHIFT, placement)
}

/// Compiles patch sources into one scratch directory.
#[derive(Debug, Clone)]
pub struct Compiler {
    dir: PathBuf,
    rustc: String,
}

impl Compiler {
    pub fn new(dir: &Path) -> std::io::Result<Compiler> {
        std::fs::create_dir_all(dir)?;
        Ok(Compiler {
            dir: dir.to_path_buf(),
            rustc: std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string()),
        })
    }

    /// Compiles `source` to `<dir>/<name>.o`; returns its path.
    pub fn object(&self, name: &str, source: &str) -> Result<PathBuf, String> {
        let src = self.dir.join(format!("{name}.rs"));
        let obj = self.dir.join(format!("{name}.o"));
        std::fs::write(&src, source).map_err(|e| format!("writing {}: {e}", src.display()))?;
        let out = Command::new(&self.rustc)
            .args(["--edition=2024", "--crate-type=lib", "--emit=obj", "-O"])
            .args(["--crate-name", name])
            .arg("-o")
            .arg(&obj)
            .arg(&src)
            .output()
            .map_err(|e| format!("running {}: {e}", self.rustc))?;
        if !out.status.success() {
            return Err(format!(
                "rustc failed on {}:\n{}",
                src.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(obj)
    }

    /// Compiles `source` and returns the object's bytes.
    pub fn bytes(&self, name: &str, source: &str) -> Result<Vec<u8>, String> {
        let obj = self.object(name, source)?;
        std::fs::read(&obj).map_err(|e| format!("reading {}: {e}", obj.display()))
    }
}
