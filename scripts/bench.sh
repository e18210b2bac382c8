#!/usr/bin/env bash
# Side-by-side benchmark: syncluster rr / shared against Node's cluster
# rr / none, serving the same hello world, with wrk.
#   scripts/bench.sh           full run (about 8 minutes)
#   scripts/bench.sh --quick   about 1 minute
# Writes target/bench/report.md and target/bench/throughput.svg.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null; then
    apt-get update && apt-get install -y wrk
fi
cargo build --release --example hello --example request_counter
exec python3 scripts/bench.py "$@"
