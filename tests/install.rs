//! The documented install (`scripts/install.sh`) into a fresh prefix, and a C program built
//! against it through pkg-config, shared and static, that a patch then reaches.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use support::{cargo_bin, cc_object, run, scratch};

fn pkg_config(prefix: &Path, args: &[&str]) -> Vec<String> {
    let out = run(Command::new("pkg-config")
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .args(args)
        .arg("dsu-agent"));
    out.split_whitespace().map(str::to_owned).collect()
}

const PROG: &str = r#"
#include <stdio.h>
#include <unistd.h>
#include "dsu.h"
__attribute__((noinline)) long dsu_installed_value(void) { return 8; }
int main(void) {
    int rc = dsu_install();
    printf("installed %d pid %d\n", rc, (int)getpid());
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        printf("value %ld\n", dsu_installed_value());
        fflush(stdout);
    }
    return 0;
}
"#;

#[test]
fn installs_into_a_prefix_and_links_through_pkg_config() {
    if Command::new("pkg-config")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: pkg-config is not installed");
        return;
    }
    let dir = scratch("install");
    let prefix = dir.join("prefix");
    let built = cargo_bin("dsu");
    let from = built.parent().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install.sh");
    run(Command::new(&script).arg("--from").arg(from).arg(&prefix));
    for file in [
        "bin/dsu",
        "lib/libdsu_agent.a",
        "lib/libdsu_agent.so",
        "include/dsu.h",
        "lib/pkgconfig/dsu-agent.pc",
    ] {
        assert!(prefix.join(file).exists(), "{file} not installed");
    }
    let src = dir.join("prog.c");
    std::fs::write(&src, PROG).unwrap();
    let cflags = pkg_config(&prefix, &["--cflags"]);
    let shared = dir.join("prog_shared");
    run(Command::new("cc")
        .arg(&src)
        .args(&cflags)
        .args(pkg_config(&prefix, &["--libs"]))
        .arg("-o")
        .arg(&shared));
    let static_prog = dir.join("prog_static");
    run(Command::new("cc")
        .arg(&src)
        .args(&cflags)
        .args(pkg_config(&prefix, &["--variable=staticlib"]))
        .args(pkg_config(&prefix, &["--variable=static_libs"]))
        .arg("-o")
        .arg(&static_prog));
    let patch = cc_object(
        &dir,
        "fix",
        "long dsu_installed_value(void) { return 70; }\n",
        &[],
    );
    for prog in [shared, static_prog] {
        let mut child = Command::new(&prog)
            .env(
                "DSU_CONTROL_DIR",
                dir.join(format!("ctl-{}", prog.display().to_string().len())),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::{BufRead, Write};
        let mut stdin = child.stdin.take().unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let pid = first
            .strip_prefix("installed 0 pid ")
            .unwrap_or_else(|| panic!("{}: {first}", prog.display()));
        run(Command::new(prefix.join("bin/dsu"))
            .args(["apply", "-p", pid])
            .arg(&patch));
        writeln!(stdin, "value").unwrap();
        assert_eq!(
            lines.next().unwrap().unwrap(),
            "value 70",
            "{}",
            prog.display()
        );
        drop(stdin);
        let _ = child.wait();
    }
    assert!(cargo_bin("libdsu_agent.so").exists());
}
