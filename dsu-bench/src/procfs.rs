//! Memory figures of a process from `/proc`.

use std::io;

/// A field of `/proc/<pid>/status` in kB (`VmRSS`, `RssAnon`, ...).
pub fn status_kb(pid: &str, field: &str) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .ok_or_else(|| io::Error::other(format!("no {field} in /proc/{pid}/status")))
}

/// Resident set size of this process, kB.
pub fn rss_kb() -> u64 {
    status_kb("self", "VmRSS").unwrap_or(0)
}

/// Anonymous resident memory of this process, kB.
pub fn rss_anon_kb() -> u64 {
    status_kb("self", "RssAnon").unwrap_or(0)
}

/// Number of mappings and their total size in kB, from `/proc/self/maps`.
pub fn mappings() -> (usize, u64) {
    let Ok(maps) = dsu_sys::maps::read_self() else {
        return (0, 0);
    };
    let total: usize = maps.iter().map(|m| m.end - m.start).sum();
    (maps.len(), (total / 1024) as u64)
}
