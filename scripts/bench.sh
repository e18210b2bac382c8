#!/usr/bin/env bash
# Side-by-side benchmark: syncluster rr / shared against a plain C prefork
# server (shared / reuseport: the speed limit), Node's cluster rr / none and
# the syncluster command running plain Node workers (no cluster module),
# serving the same hello world, with wrk.
#   scripts/bench.sh                      full run (about 12 minutes)
#   scripts/bench.sh --quick              about 2 minutes
#   scripts/bench.sh --workers 1,2,4,8    worker counts (default 1,2,4)
#   scripts/bench.sh --mixed              only the mixed-load table (slow requests)
# Writes target/bench/report.md and target/bench/throughput.svg (--mixed:
# target/bench/mixed.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null; then
    apt-get update && apt-get install -y wrk
fi
cargo build --release --example hello --example request_counter --bin syncluster
mkdir -p target/bench
cc -O2 -Wall -Wextra -Werror -o target/bench/prefork scripts/prefork.c
cc -O2 -Wall -Wextra -Werror -o target/bench/handoff_floor scripts/handoff_floor.c
exec python3 scripts/bench.py "$@"
