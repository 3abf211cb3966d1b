#!/usr/bin/env bash
# Measures `rudolph serve` from outside (examples/bench_serve.rs): throughput one client at a
# time against 8 concurrent clients on the 350M configuration with random weights, then a soak of
# mixed and malformed requests from 32 clients on the built-in model. Extra arguments go to the
# benchmark (`--help` lists them). Figures: docs/serve.md#benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin rudolph --example bench_serve
exec target/release/examples/bench_serve --sequential-requests 6 --requests 32 --clients 8 \
  --soak 2000 "$@"
