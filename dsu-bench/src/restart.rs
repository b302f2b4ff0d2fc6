//! Against a restart: `examples/demo_service` under a steady load from a client on loopback,
//! once updated with `dsu apply` (the fix of `examples/patches/price_fix.rs`) and once
//! restarted (killed, started again on the same port, ready when it prints `listening`).
//!
//! The client sends `quote 10` on a new connection every millisecond (never more than one at
//! a time; a slow request delays the next) for a bounded time; the event happens at 40% of it.
//! A request fails when it cannot connect (200 ms), gets no full answer (500 ms), or an answer
//! that is not `total N`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::report::{Table, num};
use crate::run::Ctx;
use crate::stats::{Summary, round3, us};

/// The fix the demo applies, compiled at run time like any patch.
const PRICE_FIX: &str = include_str!("../../examples/patches/price_fix.rs");
const INTERVAL: Duration = Duration::from_millis(1);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
const READ_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Since the client started, ms.
    at_ms: f64,
    latency_us: f64,
    /// The total the service answered, `None` for a failed request.
    total: Option<u64>,
}

fn request(addr: SocketAddr) -> Option<u64> {
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).ok()?;
    s.set_read_timeout(Some(READ_TIMEOUT)).ok()?;
    s.set_nodelay(true).ok()?;
    s.write_all(b"quote 10\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    line.trim().strip_prefix("total ")?.parse().ok()
}

/// Sends requests every [`INTERVAL`] for `length`; returns every outcome.
fn client(addr: SocketAddr, start: Instant, length: Duration) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut next = start;
    while next < start + length {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        let total = request(addr);
        out.push(Sample {
            at_ms: (t - start).as_secs_f64() * 1e3,
            latency_us: us(t.elapsed()),
            total,
        });
        next += INTERVAL;
        // Behind schedule (a slow request): go on from now, do not burst.
        next = next.max(Instant::now());
    }
    out
}

/// A running demo service.
struct Service {
    child: Child,
    port: u16,
    pid: u32,
}

impl Service {
    fn start(ctx: &Ctx, port: u16, control: &Path) -> Result<Service, String> {
        let mut child = Command::new(ctx.example("demo_service"))
            .arg(port.to_string())
            .env("DSU_CONTROL_DIR", control)
            .env("DSU_LOG", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting demo_service: {e}"))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        // `listening 127.0.0.1:PORT pid PID`
        let mut words = line.split_whitespace();
        let addr = words
            .nth(1)
            .ok_or_else(|| format!("demo_service said {line:?}"))?;
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("demo_service said {line:?}"))?;
        Ok(Service {
            pid: child.id(),
            child,
            port,
        })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        crate::run::forget_perf_map(self.pid);
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Update,
    Restart,
}

/// Runs the load once with `event` at 40% of `length`.
fn scenario(ctx: &Ctx, event: Event, fix: &Path, length: Duration) -> Result<Value, String> {
    let name = match event {
        Event::Update => "update",
        Event::Restart => "restart",
    };
    let control = ctx.control_dir(&format!("restart-{name}-0"));
    let mut service = Service::start(ctx, 0, &control)?;
    let addr: SocketAddr = ([127, 0, 0, 1], service.port).into();
    let start = Instant::now() + Duration::from_millis(50);
    let load = std::thread::spawn(move || client(addr, start, length));
    std::thread::sleep((start + length.mul_f64(0.4)).saturating_duration_since(Instant::now()));
    let event_at = Instant::now();
    let event_result: Result<(), String> = match event {
        Event::Update => {
            let out = Command::new(ctx.dsu())
                .args(["apply", "-p", &service.pid.to_string()])
                .arg(fix)
                .env("DSU_CONTROL_DIR", &control)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("dsu: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
            }
        }
        Event::Restart => {
            let port = service.port;
            service.kill();
            let control = ctx.control_dir(&format!("restart-{name}-1"));
            service = Service::start(ctx, port, &control)?;
            Ok(())
        }
    };
    let event_ms = event_at.elapsed().as_secs_f64() * 1e3;
    let event_start_ms = (event_at - start).as_secs_f64() * 1e3;
    let samples = load.join().map_err(|_| "client thread panicked")?;
    drop(service);
    event_result.map_err(|e| format!("{name}: {e}"))?;
    Ok(analyse(name, &samples, event_start_ms, event_ms))
}

fn analyse(name: &str, samples: &[Sample], event_start_ms: f64, event_ms: f64) -> Value {
    let failed = samples.iter().filter(|s| s.total.is_none()).count();
    // Unavailable: from each failed request's send time to the next successful one's.
    let mut unavailable_ms = 0.0;
    let mut down_since: Option<f64> = None;
    for s in samples {
        match (s.total.is_some(), down_since) {
            (false, None) => down_since = Some(s.at_ms),
            (true, Some(since)) => {
                unavailable_ms += s.at_ms - since;
                down_since = None;
            }
            _ => {}
        }
    }
    if let (Some(since), Some(last)) = (down_since, samples.last()) {
        unavailable_ms += last.at_ms - since;
    }
    let ok_latency = |from: f64, to: f64| -> Vec<f64> {
        samples
            .iter()
            .filter(|s| s.total.is_some() && s.at_ms >= from && s.at_ms < to)
            .map(|s| s.latency_us)
            .collect()
    };
    let all = Summary::of(&ok_latency(f64::MIN, f64::MAX));
    let before = Summary::of(&ok_latency(f64::MIN, event_start_ms - 100.0));
    let around = Summary::of(&ok_latency(event_start_ms - 100.0, event_start_ms + 500.0));
    let totals = |v: u64| samples.iter().filter(|s| s.total == Some(v)).count();
    json!({
        "scenario": name,
        "requests": samples.len(),
        "failed": failed,
        "unavailable_ms": round3(unavailable_ms),
        "event_ms": round3(event_ms),
        "event_at_ms": round3(event_start_ms),
        "latency_us": all.json(),
        "latency_before_us": before.json(),
        "latency_around_event_us": around.json(),
        "answers": {"2750 (bug)": totals(2750), "2250 (fixed)": totals(2250)},
    })
}

pub fn run(ctx: &Ctx) -> Result<Value, String> {
    let fix = ctx.patch("price_fix", PRICE_FIX)?;
    let length = Duration::from_millis(if ctx.quick { 1500 } else { 4000 });
    let update = scenario(ctx, Event::Update, &fix, length)?;
    let restart = scenario(ctx, Event::Restart, &fix, length)?;
    let mut table = Table::new(
        "Against a restart: demo_service under ~1000 requests/s on loopback",
        &["figure", "dsu apply", "restart"],
    );
    let f = |v: &Value, k: &[&str]| k.iter().fold(v, |v, k| &v[*k]).as_f64().unwrap_or(f64::NAN);
    for (label, key, digits) in [
        ("requests", &["requests"][..], 0),
        ("failed requests", &["failed"][..], 0),
        ("time unavailable, ms", &["unavailable_ms"][..], 1),
        (
            "the event itself (apply / kill+start+ready), ms",
            &["event_ms"][..],
            1,
        ),
        ("latency p50, us", &["latency_us", "p50"][..], 0),
        (
            "latency p99 before the event, us",
            &["latency_before_us", "p99"][..],
            0,
        ),
        (
            "latency p99 around it (-100..+500 ms), us",
            &["latency_around_event_us", "p99"][..],
            0,
        ),
        (
            "latency max around it, us",
            &["latency_around_event_us", "max"][..],
            0,
        ),
    ] {
        table.row(vec![
            label.into(),
            num(f(&update, key), digits),
            num(f(&restart, key), digits),
        ]);
    }
    table.row(vec![
        "answers: buggy 2750 / fixed 2250".into(),
        format!(
            "{} / {}",
            update["answers"]["2750 (bug)"], update["answers"]["2250 (fixed)"]
        ),
        format!(
            "{} / {}",
            restart["answers"]["2750 (bug)"], restart["answers"]["2250 (fixed)"]
        ),
    ]);
    table.print();
    Ok(json!({ "update": update, "restart": restart, "length_ms": length.as_millis() as u64 }))
}
