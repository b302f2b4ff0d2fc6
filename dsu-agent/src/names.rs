//! Names for tools: new code appears in `/tmp/perf-<pid>.map`, the convention perf (and other
//! profilers) read for code generated at run time, so profiles and some debuggers name the
//! patched functions.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether this process has written its perf map (so that it removes it at exit).
static PUBLISHED: AtomicBool = AtomicBool::new(false);

/// One named range of code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeName {
    pub address: usize,
    pub size: u64,
    pub name: String,
}

/// Appends `names` to `/tmp/perf-<pid>.map` (one `START SIZE NAME` line each, hex). Errors are
/// returned for logging only: naming is best effort and never fails an update.
pub fn publish(names: &[CodeName]) -> std::io::Result<()> {
    let path = map_path();
    let mut text = String::new();
    for n in names.iter().filter(|n| n.size > 0) {
        text.push_str(&format!("{:x} {:x} {}\n", n.address, n.size, n.name));
    }
    // /tmp is shared: never follow a link planted there, create the file private, and
    // append only to a file this user owns.
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)?;
    let meta = file.metadata()?;
    let euid = dsu_sys::ids::effective_uid();
    if !meta.is_file() || meta.uid() != euid {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{path} is not a regular file owned by uid {euid}"),
        ));
    }
    PUBLISHED.store(true, Ordering::Release);
    file.write_all(text.as_bytes())
}

fn map_path() -> String {
    format!("/tmp/perf-{}.map", std::process::id())
}

/// Removes the perf map this process wrote, if it wrote one: called when the process exits
/// (`DSU_KEEP_PERF_MAP=1` keeps it for a profiler that reads it afterwards).
pub fn remove_map() {
    if PUBLISHED.load(Ordering::Acquire) {
        let _ = std::fs::remove_file(map_path());
    }
}
