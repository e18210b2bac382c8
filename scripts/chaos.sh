#!/usr/bin/env bash
# Fault suite of examples/hello.rs (syncluster's hello-world cluster) under
# load: worker kills (beside Node's cluster), rolling reloads, graceful stop,
# fd exhaustion, a 200,000-connection soak, slowloris, a rogue and a hung
# worker, the primary's death, and hostile workers (floods, lies) beside an
# honest one. Loopback only; every process it starts is
# signalled by exact pid.
#   scripts/chaos.sh           full run (about 1 minute here, at most ~10)
#   scripts/chaos.sh --quick   about 40 seconds (at most ~2 minutes)
#   scripts/chaos.sh --only kills,reload   some scenarios (see --help)
# Prints one line per scenario and a table; writes target/chaos/report.md.
# Exits non-zero if a scenario fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null; then
    apt-get update && apt-get install -y wrk
fi
command -v node >/dev/null || echo "node not found: Node's cluster will be skipped" >&2
cargo build --release --example hello --example cluster_probe
exec python3 scripts/chaos.py "$@"
