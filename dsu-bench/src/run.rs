//! Plumbing of the benchmark program: the context every section gets, child processes (each
//! figure that needs a process of its own runs in one: `dsu-bench child SECTION key=value..`,
//! which prints its result as one JSON line `result {..}`), and their arguments.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::patches::Compiler;

/// What every section of a run shares.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Short mode: fewer repetitions, same configurations.
    pub quick: bool,
    /// Where the JSON files go (`target/bench`).
    pub out: PathBuf,
    /// Scratch: patch sources and objects, control directories.
    pub work: PathBuf,
    /// This program.
    pub exe: PathBuf,
    /// The directory holding `dsu` and `examples/` (this program's own: `target/release`).
    pub bin_dir: PathBuf,
    pub compiler: Compiler,
}

/// Longest a child may run before it is killed and the section fails.
const CHILD_LIMIT: Duration = Duration::from_secs(600);

impl Ctx {
    pub fn new(quick: bool, out: PathBuf) -> Result<Ctx, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let bin_dir = exe.parent().ok_or("exe has no directory")?.to_path_buf();
        let work = out.join("work");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let compiler =
            Compiler::new(&work.join("patches")).map_err(|e| format!("patch dir: {e}"))?;
        Ok(Ctx {
            quick,
            out,
            work,
            exe,
            bin_dir,
            compiler,
        })
    }

    /// `full` repetitions, or `quick` in short mode.
    pub fn reps(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }

    /// The `dsu` command-line tool built beside this program.
    pub fn dsu(&self) -> PathBuf {
        self.bin_dir.join("dsu")
    }

    /// An example program built beside this program.
    pub fn example(&self, name: &str) -> PathBuf {
        self.bin_dir.join("examples").join(name)
    }

    /// A control directory path not used yet (the agent creates it, mode 0700).
    pub fn control_dir(&self, name: &str) -> PathBuf {
        let dir = self.work.join("ctl").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(self.work.join("ctl"));
        dir
    }

    /// Compiles a patch; its object's path.
    pub fn patch(&self, name: &str, source: &str) -> Result<PathBuf, String> {
        self.compiler.object(name, source)
    }

    /// Runs `dsu-bench child SECTION args..` with its own control directory and returns the
    /// JSON it printed.
    pub fn child(&self, section: &str, args: &[(&str, String)]) -> Result<Value, String> {
        static CHILDREN: AtomicUsize = AtomicUsize::new(0);
        let tag = format!("{section}-{}", CHILDREN.fetch_add(1, Ordering::Relaxed));
        let mut cmd = Command::new(&self.exe);
        cmd.arg("child").arg(section);
        for (k, v) in args {
            cmd.arg(format!("{k}={v}"));
        }
        cmd.env("DSU_CONTROL_DIR", self.control_dir(&tag))
            .env("DSU_LOG", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.exe.display()))?;
        let mut stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + CHILD_LIMIT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("child {tag} ran over {CHILD_LIMIT:?}; killed"));
                }
                Err(e) => return Err(format!("waiting for child {tag}: {e}")),
            }
        };
        forget_perf_map(child.id());
        let out = reader.join().unwrap_or_default();
        let line = out
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("result "))
            .ok_or_else(|| format!("child {tag} ({status}) printed no result:\n{out}"))?;
        let value: Value =
            serde_json::from_str(line).map_err(|e| format!("child {tag} result: {e}"))?;
        if let Some(err) = value.get("error").and_then(Value::as_str) {
            return Err(format!("child {tag}: {err}"));
        }
        Ok(value)
    }
}

/// Removes the profiler map (`/tmp/perf-<pid>.map`) the agent of an ended child wrote.
pub fn forget_perf_map(pid: u32) {
    let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
}

/// `key=value` arguments of a child.
#[derive(Debug, Clone, Default)]
pub struct Args(HashMap<String, String>);

impl Args {
    pub fn parse(args: &[String]) -> Args {
        Args(
            args.iter()
                .filter_map(|a| a.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    pub fn str(&self, key: &str) -> Result<&str, String> {
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| format!("missing argument {key}="))
    }

    pub fn num<T: std::str::FromStr>(&self, key: &str) -> Result<T, String> {
        let s = self.str(key)?;
        s.parse().map_err(|_| format!("bad {key}={s}"))
    }

    pub fn path(&self, key: &str) -> Result<&Path, String> {
        self.str(key).map(Path::new)
    }

    pub fn bytes(&self, key: &str) -> Result<Vec<u8>, String> {
        let p = self.path(key)?;
        std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))
    }
}

/// The JSON line a child ends with.
pub fn print_result(value: &Value) {
    println!("result {value}");
}
