//! Placement: in place when the new code fits, new space and an entry jump when it does not,
//! direct call sites rewritten, function pointers still reaching the new code, unwinding and
//! naming of new code, and all of it in a process that forbids gaining execute permission.
//! Real processes (`examples/placement_target.rs`), real patches, the real `dsu`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::Fixture;

fn start(name: &str, env: &[(&str, &Path)]) -> (Fixture, PathBuf) {
    let dir = support::scratch(name);
    let fx = Fixture::start(&dir, &support::cargo_bin("placement_target"), &[], env);
    (fx, dir)
}

/// `dsu apply`, which must succeed; returns the agent's `result.json`.
fn apply(fx: &Fixture, patch: &Path) -> Value {
    let out = Command::new(support::cargo_bin("dsu"))
        .args(["apply", "-p", &fx.pid.to_string(), "--timeout", "10"])
        .arg(patch)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dsu apply failed: {}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        fx.log()
    );
    result(fx)
}

fn result(fx: &Fixture) -> Value {
    serde_json::from_slice(&std::fs::read(fx.control.join("result.json")).unwrap()).unwrap()
}

fn revert(fx: &Fixture) {
    let out = Command::new(support::cargo_bin("dsu"))
        .args(["revert", "-p", &fx.pid.to_string(), "--timeout", "10"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dsu revert failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn hex(v: &Value) -> usize {
    usize::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

fn rust_patch(dir: &Path, name: &str, source: &str) -> PathBuf {
    support::rustc_object(dir, name, source)
}

/// Size of a function of the fixture binary, from its symbol table.
fn symbol_size(name: &str) -> u64 {
    use object::{Object, ObjectSymbol};
    let data = std::fs::read(support::cargo_bin("placement_target")).unwrap();
    let file = object::File::parse(&*data).unwrap();
    file.symbols()
        .find(|s| s.name() == Ok(name))
        .map(|s| s.size())
        .unwrap_or_else(|| panic!("{name} not in the fixture's symbol table"))
}

/// Direct `call rel32` instructions in `code` (read at `at`) and their targets.
fn call_targets(code: &[u8], at: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for i in 0..code.len().saturating_sub(4) {
        if code[i] == 0xe8 {
            let rel = i32::from_le_bytes(code[i + 1..i + 5].try_into().unwrap());
            out.push((at + i + 5).wrapping_add_signed(rel as isize));
        }
    }
    out
}

const SHORT_BIG: &str = r#"
#[unsafe(no_mangle)]
pub extern "C" fn dsu_place_big(x: u64) -> u64 { x * 10 }
"#;

const LONG_SMALL: &str = r#"
#[unsafe(no_mangle)]
pub extern "C" fn dsu_place_small(x: u64) -> u64 {
    let mut v = x;
    for i in 0..std::hint::black_box(3u64) {
        v = v.wrapping_mul(3).wrapping_add(i);
    }
    std::hint::black_box(v) * 0 + x * 100
}
"#;

#[test]
fn a_shorter_replacement_is_written_in_place() {
    let (mut fx, dir) = start("in-place", &[]);
    fx.expect("big", "big 8");
    let before = fx.code("big");
    let r = apply(&fx, &rust_patch(&dir, "short_big", SHORT_BIG));
    let f = &r["functions"][0];
    assert_eq!(f["name"], "dsu_place_big");
    assert_eq!(f["strategy"], "in-place");
    // No debugger here: only the running threads were stopped.
    assert_eq!(r["threads_stopped"], "running", "{r}");
    assert_eq!(
        hex(&f["new_address"]),
        fx.address("big"),
        "in place: same address"
    );
    fx.expect("big", "big 70");
    assert_ne!(
        fx.code("big"),
        before,
        "the old function's bytes were overwritten"
    );

    revert(&fx);
    fx.expect("big", "big 8");
    assert_eq!(fx.code("big"), before, "revert restores the original bytes");
}

#[test]
fn a_longer_replacement_is_redirected_and_direct_callers_are_rewritten() {
    let (mut fx, dir) = start("redirect", &[]);
    fx.expect("small", "small 1008");
    fx.expect("pointer", "pointer 8");
    let caller = fx.address("caller");
    let caller_len = symbol_size("dsu_place_caller") as usize;
    let caller_before = fx.read_memory(caller, caller_len);
    assert!(
        call_targets(&caller_before, caller).contains(&fx.address("small")),
        "the fixture's caller calls dsu_place_small directly"
    );

    let r = apply(&fx, &rust_patch(&dir, "long_small", LONG_SMALL));
    let f = &r["functions"][0];
    assert_eq!(f["strategy"], "redirect");
    let new = hex(&f["new_address"]);
    assert_ne!(new, fx.address("small"));
    assert!(f["call_sites"].as_u64().unwrap() >= 1, "{f}");

    // Direct callers go straight to the new code...
    let caller_after = fx.read_memory(caller, caller_len);
    assert!(
        call_targets(&caller_after, caller).contains(&new),
        "call site rewritten"
    );
    fx.expect("small", "small 1700");
    // ...and a pointer taken before the update reaches it through the entry jump.
    fx.expect("pointer", "pointer 700");

    revert(&fx);
    fx.expect("small", "small 1008");
    fx.expect("pointer", "pointer 8");
    assert_eq!(
        fx.read_memory(caller, caller_len),
        caller_before,
        "revert restores the call sites"
    );
}

#[test]
fn a_panic_in_patched_code_is_caught_by_the_caller() {
    let (mut fx, dir) = start("panic", &[]);
    fx.expect("checked 13", "checked 13");
    apply(
        &fx,
        &rust_patch(
            &dir,
            "checked",
            r#"
#[unsafe(no_mangle)]
pub fn dsu_place_checked(n: u64) -> u64 {
    if n == 13 {
        panic!("unlucky {n}");
    }
    n * 2
}
"#,
        ),
    );
    fx.expect("checked 4", "checked 8");
    fx.expect("checked 13", "caught unlucky 13");
    // The process is fine afterwards.
    fx.expect("checked 5", "checked 10");
}

#[test]
fn unwinding_goes_through_new_code_and_profilers_can_name_it() {
    let (mut fx, dir) = start("trace", &[]);
    let patch = rust_patch(
        &dir,
        "traced",
        r#"
unsafe extern "C" {
    fn dsu_place_capture(out: &mut [usize; 32]) -> usize;
}

#[unsafe(no_mangle)]
pub extern "C" fn dsu_place_traced(out: &mut [usize; 32]) -> usize {
    // Work before and after the call, so the frame is a real one.
    let n = unsafe { dsu_place_capture(out) };
    std::hint::black_box(n) + std::hint::black_box(0)
}
"#,
    );
    let r = apply(&fx, &patch);
    let f = &r["functions"][0];
    let (new, strategy) = (hex(&f["new_address"]), f["strategy"].as_str().unwrap());
    let size = symbol_size_in_object(&patch, "dsu_place_traced");

    let reply = fx.send("trace");
    let ips: Vec<usize> = reply
        .strip_prefix("trace ")
        .unwrap()
        .split_whitespace()
        .map(|w| usize::from_str_radix(w.trim_start_matches("0x"), 16).unwrap())
        .collect();
    let in_new = ips
        .iter()
        .position(|&ip| ip > new && ip <= new + size)
        .unwrap_or_else(|| panic!("no frame in the new code ({strategy}) at {new:#x}: {reply}"));
    // The unwinder went on through the new code to its caller.
    let caller = fx.address("trace_caller");
    let caller_end = caller + symbol_size("dsu_place_trace_caller") as usize;
    let next = ips.get(in_new + 1).copied().unwrap_or(0);
    assert!(
        next > caller && next <= caller_end,
        "frame after the new code is not dsu_place_trace_caller: {reply}"
    );
    // And the perf map names the new code: the agent appends to it once it has answered.
    let ip = ips[in_new];
    let names_ip = |map: &str| {
        // Whole lines only: the file may be read while a line is being appended.
        map.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .any(|line| {
                let mut w = line.trim_end().splitn(3, ' ');
                let start = usize::from_str_radix(w.next().unwrap(), 16).unwrap();
                let len = usize::from_str_radix(w.next().unwrap(), 16).unwrap();
                let name = w.next().unwrap_or("");
                ip > start && ip <= start + len && name.starts_with("dsu_place_traced [dsu patch")
            })
    };
    let deadline = std::time::Instant::now() + support::WAIT;
    loop {
        let map = std::fs::read_to_string(format!("/tmp/perf-{}.map", fx.pid)).unwrap_or_default();
        if names_ip(&map) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "perf map does not name {ip:#x}:\n{map}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", fx.pid));
}

fn symbol_size_in_object(path: &Path, name: &str) -> usize {
    use object::{Object, ObjectSymbol};
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    file.symbols()
        .find(|s| s.name() == Ok(name))
        .map(|s| s.size() as usize)
        .unwrap()
}

#[test]
fn a_process_that_forbids_gaining_execute_permission_is_patched() {
    let (mut fx, dir) = start("mdwe", &[("DSU_FIXTURE_MDWE", Path::new("1"))]);
    fx.expect("mdwe", "mdwe 1");
    let r = apply(&fx, &rust_patch(&dir, "short_big", SHORT_BIG));
    assert_eq!(r["functions"][0]["strategy"], "in-place");
    fx.expect("big", "big 70");
    let r = apply(&fx, &rust_patch(&dir, "long_small", LONG_SMALL));
    assert_eq!(r["functions"][0]["strategy"], "redirect");
    fx.expect("small", "small 1700");
    fx.expect("pointer", "pointer 700");
    // The new code runs from a mapping that is executable and not writable: under MDWE the
    // image was mapped executable from the start (the kernel would refuse to add execute
    // permission later, and to map it writable and executable at once).
    let new_code = hex(&r["functions"][0]["new_address"]);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", fx.pid)).unwrap();
    let perms = maps
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let (range, perms) = (w.next()?, w.next()?);
            let (lo, hi) = range.split_once('-')?;
            let lo = usize::from_str_radix(lo, 16).ok()?;
            let hi = usize::from_str_radix(hi, 16).ok()?;
            (lo <= new_code && new_code < hi).then(|| perms.to_string())
        })
        .unwrap_or_else(|| panic!("no mapping holds the new code at {new_code:#x}:\n{maps}"));
    assert_eq!(&perms[..3], "r-x", "the new code's mapping: {perms}");
}
