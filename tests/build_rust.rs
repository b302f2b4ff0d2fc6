//! `dsu build` for Rust: a crate built by cargo, an ordinary function fixed (mangled,
//! inlinable, no attribute anywhere in the program), two builds of the crate, and the patch
//! applied to the running program and reverted. The commands are the ones `docs/guide.md`
//! gives. Needs the workspace built first (`cargo build --workspace --all-targets`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{Fixture, cargo_bin, dsu, run, scratch};

const CARGO_TOML: &str = r#"[package]
name = "shop"
version = "0.1.0"
edition = "2024"

[dependencies]

# The program's own release profile: one codegen unit, so the crate is one object file.
[profile.release]
codegen-units = 1

# Not a member of the workspace the tests run in.
[workspace]
"#;

/// The program. `@discount@` is the function the fix changes; it is inlined into `price`,
/// which is inlined into `handle_price`, and `total` is generic: the diff finds all of that.
const MAIN_RS: &str = r#"//! A tiny shop: one request per line on stdin, one answer per line on stdout.
use std::io::{BufRead, Write};

struct Order {
    item: String,
    qty: u64,
}

fn unit_cents(item: &str) -> u64 {
    match item {
        "apple" => 30,
        "pear" => 45,
        _ => 100,
    }
}

/// Adds up amounts of any unsigned type.
fn total<T: Copy + Into<u64>>(amounts: &[T]) -> u64 {
    amounts.iter().map(|&a| a.into()).sum()
}

@discount@

fn price(order: &Order) -> u64 {
    let gross = unit_cents(&order.item) * order.qty;
    let shipping: u32 = if order.qty > 100 { 0 } else { 5 };
    total(&[gross, u64::from(shipping)]) - discount(gross, order.qty)
}

fn handle_price(line: &str) -> String {
    let mut words = line.split_whitespace().skip(1);
    let item = words.next().unwrap_or("").to_string();
    let qty = words.next().and_then(|w| w.parse().ok()).unwrap_or(1);
    let order = Order { item, qty };
    format!("price {} {}", order.item, price(&order))
}

/// Below the fix, with a panic location (division by zero) whose line the fix moves.
fn handle_share(line: &str) -> String {
    let parts: u64 = line.split_whitespace().nth(1).and_then(|w| w.parse().ok()).unwrap_or(0);
    format!("share {}", 1000 / parts)
}

fn main() {
    // Requests go through a table of handlers, as in a server's router: `main` never returns,
    // so it keeps its own code; the handlers are what a fix replaces.
    let handlers: [(&str, fn(&str) -> String); 2] =
        std::hint::black_box([("price", handle_price), ("share", handle_share)]);
    println!("ready {}", std::process::id());
    println!("addresses handle_price={:p}", handlers[0].1 as *const ());
    let mut out = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let command = line.split_whitespace().next().unwrap_or("");
        let answer = match handlers.iter().find(|(name, _)| *name == command) {
            Some((_, handler)) => handler(&line),
            None => format!("unknown {command}"),
        };
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
    }
}
"#;

const DISCOUNT: &str = "fn discount(gross: u64, qty: u64) -> u64 {
    if qty >= 10 { gross / 10 } else { 0 }
}";

/// The fix: 5 or more get 20% off. Longer, so every line below it moves.
const DISCOUNT_FIXED: &str = "fn discount(gross: u64, qty: u64) -> u64 {
    // Fixed: 5 or more get 20% off.
    if qty >= 5 {
        gross / 5
    } else {
        0
    }
}";

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// `cargo rustc --release --bin shop -- --emit=obj,link` in `project`, offline, as the guide
/// says: the program and, from the same compilation, the crate's object file. Returns the
/// object.
fn build_crate(project: &Path) -> PathBuf {
    run(Command::new(cargo())
        .current_dir(project)
        .env("CARGO_TARGET_DIR", project.join("target"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args([
            "rustc",
            "--release",
            "--bin",
            "shop",
            "--offline",
            "--quiet",
            "--",
        ])
        .arg("--emit=obj,link"));
    let deps = project.join("target/release/deps");
    let objects: Vec<PathBuf> = std::fs::read_dir(&deps)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "o")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("shop-"))
        })
        .collect();
    assert_eq!(
        objects.len(),
        1,
        "one object in {}: {objects:?}",
        deps.display()
    );
    objects[0].clone()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Lines of the summary between `title N:` and the next title.
fn listed(summary: &str, title: &str) -> Vec<String> {
    summary
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{title} ")))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn an_ordinary_function_fixed_in_a_cargo_crate_is_patched_from_two_builds() {
    let dir = scratch("build-rust");
    let project = dir.join("shop");
    std::fs::create_dir_all(project.join("src")).unwrap();
    std::fs::write(project.join("Cargo.toml"), CARGO_TOML).unwrap();
    let source = project.join("src/main.rs");
    let program = |discount: &str| MAIN_RS.replace("@discount@", discount);
    assert!(!MAIN_RS.contains("#["), "no attribute in the program");

    // ORIGINAL: the program as shipped and its object, kept aside before the fix is built.
    std::fs::write(&source, program(DISCOUNT)).unwrap();
    let object = build_crate(&project);
    let original = dir.join("ORIGINAL.o");
    std::fs::copy(&object, &original).unwrap();
    let exe = dir.join("shop-running");
    std::fs::copy(project.join("target/release/shop"), &exe).unwrap();
    let library = cargo_bin("libdsu_agent.so");
    let mut fx = Fixture::start(&dir, &exe, &[], &[("LD_PRELOAD", &library)]);
    // 12 apples: 360 + 5 shipping, 10% off 360.
    fx.expect("price apple 12", "price apple 329");
    fx.expect("price pear 6", "price pear 275");
    fx.expect("share 7", "share 142");

    // FIXED: the same crate, rebuilt in place with the fix.
    std::fs::write(&source, program(DISCOUNT_FIXED)).unwrap();
    let fixed = build_crate(&project);

    let patch = dir.join("fix.o");
    let out = dsu(&[
        "build",
        original.to_str().unwrap(),
        fixed.to_str().unwrap(),
        "-o",
        patch.to_str().unwrap(),
        "--against",
        &fx.pid.to_string(),
    ]);
    let summary = text(&out.stdout);
    assert!(
        out.status.success(),
        "dsu build failed ({}): {summary}{}",
        out.status,
        text(&out.stderr)
    );
    // `discount` and `price` exist only inlined: the function that changed is their caller.
    // `handle_share` only moved down (its panic location's line changed): not in the patch.
    let changed = listed(&summary, "changed");
    assert_eq!(changed.len(), 1, "{summary}");
    assert!(
        changed[0].starts_with("_ZN4shop12handle_price17h"),
        "{summary}"
    );
    assert!(!summary.contains("handle_share"), "{summary}");
    assert!(summary.contains("matches "), "{summary}");

    let pid = fx.pid.to_string();
    let out = dsu(&["apply", "-p", &pid, patch.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "dsu apply failed: {}\nprocess log:\n{}",
        text(&out.stderr),
        fx.log()
    );
    // 12 apples: 360 + 5, 20% off 360; 6 pears: 270 + 5, 20% off 270.
    fx.expect("price apple 12", "price apple 293");
    fx.expect("price pear 6", "price pear 221");
    fx.expect("price plum 2", "price plum 205");
    fx.expect("share 7", "share 142");

    let out = dsu(&["revert", "-p", &pid]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    fx.expect("price apple 12", "price apple 329");
    fx.expect("price pear 6", "price pear 275");
}
