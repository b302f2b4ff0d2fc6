#!/usr/bin/env bash
# The test command: builds what the end-to-end tests need (the agent's static and shared
# libraries, the dsu binary, the example programs), then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --all-targets -q
cargo test --workspace -- --test-threads=2
