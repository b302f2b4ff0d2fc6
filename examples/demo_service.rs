//! The live-update demo: a small TCP pricing service on localhost.
//!
//! `demo_service [PORT]` listens on 127.0.0.1 (port 0, the default, picks a free one), prints
//! `listening <addr> pid <pid>`, and answers each line `quote <qty>` with `total <cents>`.
//! Its pricing function has a bug: the bulk discount is applied the wrong way round. The fix
//! in `examples/patches/price_fix.rs` is applied with `dsu apply` while it keeps serving
//! (see `examples/demo.sh`).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};

/// Unit price in cents.
const UNIT_CENTS: u32 = 250;

/// Price of `qty` units in cents: 10 or more units get 10% off.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn demo_price_cents(qty: u32) -> u32 {
    let gross = qty * UNIT_CENTS;
    // Bug: charges 10% extra instead of giving 10% off.
    if qty >= 10 { gross + gross / 10 } else { gross }
}

fn serve(stream: TcpStream) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let reply = match line.trim().strip_prefix("quote ").map(str::parse::<u32>) {
            Some(Ok(qty)) if qty <= 1_000_000 => format!("total {}", demo_price_cents(qty)),
            _ => "error: expected `quote <qty>`".to_string(),
        };
        writeln!(out, "{reply}")?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    dsu_agent::install()?;
    let port: u16 = std::env::args().nth(1).map_or(Ok(0), |p| p.parse())?;
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    println!(
        "listening {} pid {}",
        listener.local_addr()?,
        std::process::id()
    );
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let stream = stream?;
        std::thread::spawn(move || {
            let _ = serve(stream);
        });
    }
    Ok(())
}
