#!/usr/bin/env python3
"""Driver of scripts/bench.sh: runs every configuration in interleaved
rounds, takes medians, prints and writes the table and an SVG chart.

    python3 scripts/bench.py [--quick] [--workers 1,2,4] [--mixed]

Servers: syncluster's hello (rr, shared, least-loaded, reuseport), the plain
C prefork server of scripts/prefork.c (shared, reuseport: the speed limit, no
primary in the data path), examples/c/hello.c on syncluster's C API (rr,
shared; built by scripts/build_c.sh), Node's cluster (rr, none) when node
is installed, and the syncluster command running plain Node
(examples/workers/hello.js, no cluster module) in shared mode.

The mixed-load table (also in the full run; `--mixed` runs it alone): wrk
with scripts/mixed.lua, `Connection: close`, 1 request in 200 blocking its
worker 50 ms, at 2 and 4 workers; p50, p99, max and requests/s of every
syncluster policy and Node's cluster, side by side."""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from harness import CLK_TCK, ROOT, Server, cpu_ticks, free_port, ms, now, rss_kb, run_wrk, wait_until

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--quick", action="store_true", help="one round of 2 s runs (about 2 minutes)")
ap.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (default 1,2,4)")
ap.add_argument("--mixed", action="store_true", help="only the mixed-load table (slow requests among fast ones)")
ap.add_argument("--modes", default="keep-alive,close", help="comma-separated: keep-alive, close (default both)")
ap.add_argument("--no-mixed", action="store_true", help="skip the mixed-load table")
ap.add_argument("--mixed-connections", type=int, default=32,
                help="wrk's connections in the mixed load (default 32; fewer keeps the workers "
                "from being blocked most of the time)")
ap.add_argument("--only", default="", help="comma-separated words: run only the servers whose name has one "
                "(e.g. node: Node's cluster and the command running Node)")
ARGS = ap.parse_args()
QUICK = ARGS.quick
ROUNDS = 1 if QUICK else 3
DURATION = 2 if QUICK else 5
try:
    WORKERS = [int(w) for w in ARGS.workers.split(",")]
    assert WORKERS and all(w > 0 for w in WORKERS)
except (ValueError, AssertionError):
    sys.exit(f"--workers: expected positive numbers separated by commas, got {ARGS.workers!r}")
MODES = [m for m in ARGS.modes.split(",") if m]
if not MODES or any(m not in ("keep-alive", "close") for m in MODES):
    sys.exit(f"--modes: expected keep-alive and/or close, got {ARGS.modes!r}")
HELLO = os.path.join(ROOT, "target/release/examples/hello")
PREFORK = os.path.join(ROOT, "target/bench/prefork")
FLOOR = os.path.join(ROOT, "target/bench/handoff_floor")
C_HELLO = os.path.join(ROOT, "target/c/hello")
NODE = shutil.which("node")
COMMAND = os.path.join(ROOT, "target/release/syncluster")
# The command with plain Node workers, shared mode.
CMD_NODE = "syncluster cmd node"
OUT = os.path.join(ROOT, "target/bench")
LIMIT = "c prefork shared"

IMPLS = ["syncluster rr", "syncluster shared", "syncluster least-loaded", "syncluster reuseport"]
if os.path.exists(PREFORK):
    IMPLS += [LIMIT, "c prefork reuseport"]
else:
    print(f"{PREFORK} missing: skipping the C prefork server (scripts/bench.sh builds it)", file=sys.stderr)
if os.path.exists(C_HELLO):
    IMPLS += ["c syncluster rr", "c syncluster shared"]
else:
    print(f"{C_HELLO} missing: skipping the C hello (scripts/build_c.sh builds it)", file=sys.stderr)
if NODE:
    IMPLS += ["node rr", "node none"]
    if os.path.exists(COMMAND):
        IMPLS += [CMD_NODE]
    else:
        print(f"{COMMAND} missing: skipping the command (scripts/bench.sh builds it)", file=sys.stderr)
else:
    print("node not found: skipping Node's cluster (install nodejs to compare)", file=sys.stderr)
if ARGS.only:
    IMPLS = [i for i in IMPLS if any(w and w in i for w in ARGS.only.split(","))]
    if not IMPLS:
        sys.exit(f"--only {ARGS.only!r}: no server matches")


def start_command(workers, env):
    """`syncluster --workers N -- node examples/workers/hello.js`: waits until
    every worker said it serves (its startup is exec to that, as Node's
    cluster's `listening` events)."""
    cmd = [COMMAND, "--workers", str(workers), "--listen", "127.0.0.1:0", "--ready-after", "200",
           "--", NODE, os.path.join(ROOT, "examples/workers/hello.js")]
    srv = Server(cmd, env=env, wait_listening=False, name=CMD_NODE)
    if not wait_until(lambda: srv.err_count(r"hello\.js: pid \d+ serving") >= workers, 15):
        srv.kill()
        raise RuntimeError(f"{CMD_NODE}: {workers} workers not serving in 15 s; stderr: {srv.stderr()!r}")
    srv.startup = now() - srv.started
    m = re.search(r"listening on [\d.]+:(\d+)", srv.stderr())
    srv.port = int(m.group(1))
    wait_until(lambda: srv.err_count(r"syncluster: ready") >= 1, 5)
    return srv


def start(impl, workers):
    """Starts a server and waits for its listening line."""
    env = dict(os.environ)
    if impl == CMD_NODE:
        return start_command(workers, env)
    kind, mode = impl.rsplit(" ", 1)
    # Every server but Node's (which has no such option) listens with
    # TCP_DEFER_ACCEPT, nginx's `deferred`: a connection is accepted once its
    # request arrived, the same for the limit and for syncluster.
    if kind == "syncluster":
        cmd = [HELLO, "--workers", str(workers), "--port", "0", "--policy", mode, "--deferred"]
    elif kind == "c prefork":
        cmd = [PREFORK, str(workers), "0", mode, "deferred"]
    elif kind == "c syncluster":
        cmd = [C_HELLO, "--workers", str(workers), "--port", "0", "--policy", mode, "--deferred"]
    else:
        cmd = [NODE, os.path.join(ROOT, "scripts/node_hello.js"), str(workers), str(free_port())]
        env["NODE_CLUSTER_SCHED_POLICY"] = mode
    return Server(cmd, env=env, name=impl)


def run_wrk_mode(port, mode):
    """(req/s, p50 ms, p99 ms, errors, requests completed)."""
    args = ["-t1", "-c32", f"-d{DURATION}s", "--latency", f"http://127.0.0.1:{port}/"]
    if mode == "close":
        args[0:0] = ["-H", "Connection: close"]
    w, out = run_wrk(args, timeout=DURATION + 30)
    if w["rps"] is None or w["p50"] is None or w["p99"] is None:
        # No latency figures: wrk completed nothing. Keep its words.
        with open(os.path.join(OUT, "wrk-failure.txt"), "a") as f:
            f.write(f"port {port} {mode}:\n{out}\n")
        return 0.0, float("nan"), float("nan"), 1, 0
    return w["rps"], w["p50"], w["p99"], w["errors"], w["requests"]


def main():
    os.makedirs(OUT, exist_ok=True)
    if ARGS.mixed:
        text = "\n".join(mixed_table())
        print(text)
        with open(os.path.join(OUT, "mixed.md"), "w") as f:
            f.write("# syncluster mixed-load benchmark\n\nProduced by `scripts/bench.sh --mixed"
                    + (" --quick" if QUICK else "") + "`.\n\n" + text + "\n")
        print(f"\nwrote {OUT}/mixed.md", file=sys.stderr)
        return
    results = {}
    starts = {}
    rss = {}
    configs = [(i, w, m) for w in WORKERS for m in MODES for i in IMPLS]
    total = ROUNDS * len(configs)
    n = 0
    for r in range(ROUNDS):
        for impl, workers, mode in configs:
            n += 1
            print(f"[{n}/{total}] round {r + 1}: {impl}, {workers} workers, {mode}", file=sys.stderr)
            srv = start(impl, workers)
            starts.setdefault((impl, workers), []).append(srv.startup)
            time.sleep(0.2)
            t0 = cpu_ticks(srv.pid)
            rps, p50, p99, errors, done = run_wrk_mode(srv.port, mode)
            t1 = cpu_ticks(srv.pid)
            # Connection: close makes every request its own connection.
            per_conn = ((t1 - t0) / CLK_TCK * 1e6 / done
                        if mode == "close" and done and t0 is not None and t1 is not None else None)
            kb = rss_kb(srv.pid)
            if kb:
                rss.setdefault(impl, []).append(kb)
            time.sleep(0.3)
            srv.stop(timeout=15)
            served = srv.served()
            counts = [v for v in served.values() if v > 0] if served else []
            fair = (max(counts) / min(counts)) if len(counts) == workers and min(counts) > 0 else None
            results.setdefault((impl, workers, mode), []).append((rps, p50, p99, errors, fair, per_conn))
    # 8 workers: exec to the listening line.
    for impl in IMPLS:
        for _ in range(3 if not QUICK else 1):
            srv = start(impl, 8)
            starts.setdefault((impl, 8), []).append(srv.startup)
            srv.stop(timeout=15)

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    lines = []
    lines.append(f"wrk -t1 -c32 -d{DURATION}s, median of {ROUNDS} interleaved round(s); "
                 f"{os.cpu_count()} CPUs, {platform_line()}. Every server but Node's listens with "
                 "TCP_DEFER_ACCEPT (hello --deferred, the C hello --deferred, prefork deferred).")
    lines.append("")
    lines.append("| workers | mode | server | req/s | p50 ms | p99 ms | errors | busiest/idlest "
                 "| primary CPU µs/conn | × limit | × node rr |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    chart = []
    for workers in WORKERS:
        for mode in MODES:
            base = results.get(("node rr", workers, mode))
            base_rps = med([x[0] for x in base]) if base else None
            limit = results.get((LIMIT, workers, mode))
            limit_rps = med([x[0] for x in limit]) if limit else None
            for impl in IMPLS:
                rs = results[(impl, workers, mode)]
                rps = med([x[0] for x in rs])
                p50 = med([x[1] for x in rs])
                p99 = med([x[2] for x in rs])
                err = max(x[3] for x in rs)
                fair = med([x[4] for x in rs])
                cpu = med([x[5] for x in rs])
                ratio = f"{rps / base_rps:.2f}" if base_rps else "-"
                to_limit = f"{rps / limit_rps:.2f}" if limit_rps else "-"
                fair_s = f"{fair:.3f}" if fair else "-"
                cpu_s = f"{cpu:.1f}" if cpu is not None else "-"
                lines.append(f"| {workers} | {mode} | {impl} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {err} | {fair_s} "
                             f"| {cpu_s} | {to_limit} | {ratio} |")
                chart.append((f"{workers}w {mode}", impl, rps))
    lines.append("")
    lines.append(f"primary CPU µs/conn: utime+stime of the primary process (/proc/PID/stat, {CLK_TCK} ticks/s) "
                 "over the Connection: close run, divided by the requests wrk completed (one connection each). "
                 f"× limit: req/s over {LIMIT}'s, same workers and mode. The C prefork workers block on one "
                 "connection at a time: in keep-alive mode only as many of wrk's 32 connections as there are "
                 "workers are served; the others wait in the accept queue, never answered, and appear in "
                 "none of wrk's figures (its timeout count included).")
    lines.append("")
    lines.append("| server | exec → all 8 workers listening (median) | primary RSS under load (median) |")
    lines.append("|---|---:|---:|")
    for impl in IMPLS:
        st = med(starts.get((impl, 8), []))
        kb = med(rss.get(impl, []))
        lines.append(f"| {impl} | {st * 1000:.0f} ms | {kb / 1024:.1f} MiB |" if kb else f"| {impl} | {st * 1000:.0f} ms | - |")
    lines += reuseport_summary(results, med)
    if "close" in MODES:
        lines += floor_lines()
    lines.append("")
    if not ARGS.no_mixed:
        lines += mixed_table()
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(OUT, "report.md"), "w") as f:
        f.write("# syncluster benchmark\n\nProduced by `scripts/bench.sh" + (" --quick" if QUICK else "")
                + (f" --workers {ARGS.workers}" if ARGS.workers != "1,2,4" else "")
                + (f" --modes {ARGS.modes}" if ARGS.modes != "keep-alive,close" else "")
                + (" --no-mixed" if ARGS.no_mixed else "")
                + (f" --only {ARGS.only}" if ARGS.only else "") + "`.\n\n" + text + "\n")
    write_svg(chart)
    print(f"\nwrote {OUT}/report.md and {OUT}/throughput.svg", file=sys.stderr)


def floor_lines():
    """The kernel's floor for a round-robin primary's per-connection work on
    this machine (scripts/handoff_floor.c), in this same run: median of
    ROUNDS runs of each mode."""
    if not os.path.exists(FLOOR):
        print(f"{FLOOR} missing: skipping the handoff floor (scripts/bench.sh builds it)", file=sys.stderr)
        return []
    figures = {}
    for _ in range(ROUNDS):
        for mode in ("handoff", "ack"):
            out = subprocess.run([FLOOR, "20000", mode], capture_output=True, text=True, timeout=120).stdout
            m = re.search(r"([\d.]+) us/conn \(([\d.]+) conn/s, ([\d.]+) wakes", out)
            if m:
                figures.setdefault(mode, []).append(tuple(float(x) for x in m.groups()))
    if not figures:
        return []
    lines = ["", "Kernel floor of a primary's per-connection work (scripts/handoff_floor.c, same run, "
             "no cluster library): epoll_wait, accept4, sendmsg(SCM_RIGHTS), close.", "",
             "| floor | primary CPU µs/conn | conn/s | wakes/conn |", "|---|---:|---:|---:|"]
    names = {"handoff": "handoff, copy closed at once (syncluster's rr: requeues from the pipe)",
             "ack": "copy kept until the worker acknowledges (syncluster's rr before the pipe)"}
    for mode, xs in figures.items():
        us, rate, wakes = (statistics.median(x[i] for x in xs) for i in range(3))
        lines.append(f"| {names[mode]} | {us:.1f} | {rate:,.0f} | {wakes:.2f} |")
    return lines


def reuseport_summary(results, med):
    """syncluster reuseport against the C prefork reuseport server, with
    Connection: close: the ratio and the primary's CPU per connection."""
    if "c prefork reuseport" not in IMPLS:
        return []
    lines = ["", "| workers | syncluster reuseport req/s | c prefork reuseport req/s | ratio "
             "| primary CPU µs/conn |", "|---|---:|---:|---:|---:|"]
    for workers in WORKERS:
        ours = results.get(("syncluster reuseport", workers, "close"))
        c = results.get(("c prefork reuseport", workers, "close"))
        if not ours or not c:
            continue
        a, b = med([x[0] for x in ours]), med([x[0] for x in c])
        cpu = med([x[5] for x in ours])
        cpu_s = f"{cpu:.1f}" if cpu is not None else "-"
        lines.append(f"| {workers} | {a:,.0f} | {b:,.0f} | {a / b:.2f} | {cpu_s} |")
    return lines


# ---------------------------------------------------------------------------
# Mixed load: 1 request in 200 blocks its worker 50 ms (scripts/mixed.lua).

MIXED_LUA = os.path.join(ROOT, "scripts/mixed.lua")
MIXED_WORKERS = [2, 4]


def mixed_impls():
    impls = ["syncluster rr", "syncluster least-loaded", "syncluster shared", "syncluster reuseport"]
    impls += ["node rr", "node none"] if NODE else []
    if ARGS.only:
        impls = [i for i in impls if any(w and w in i for w in ARGS.only.split(","))]
    return impls


def run_mixed(port):
    """(req/s, p50, p99, max, p99.9 in ms, errors) of one wrk run with mixed.lua."""
    args = ["-t1", f"-c{ARGS.mixed_connections}", f"-d{DURATION}s", "--latency", "-s", MIXED_LUA,
            f"http://127.0.0.1:{port}/"]
    w, out = run_wrk(args, timeout=DURATION + 30)
    top = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)
    p999 = re.search(r"mixed: .* p99\.9 ([\d.]+) ms", out)  # mixed.lua's done()
    if w["rps"] is None or w["p99"] is None or not top:
        with open(os.path.join(OUT, "wrk-failure.txt"), "a") as f:
            f.write(f"port {port} mixed:\n{out}\n")
        return 0.0, float("nan"), float("nan"), float("nan"), float("nan"), 1
    p999 = float(p999.group(1)) if p999 else float("nan")
    return w["rps"], w["p50"], w["p99"], ms(top.group(1)), p999, w["errors"]


def mixed_table():
    """Runs the mixed load over every server in interleaved rounds; the
    table's lines (medians)."""
    impls = mixed_impls()
    if "syncluster rr" not in impls or "syncluster shared" not in impls:
        return ["Mixed load: skipped (--only left out syncluster rr or shared, its yardsticks)."]
    configs = [(i, w) for w in MIXED_WORKERS for i in impls]
    results = {}
    total, n = ROUNDS * len(configs), 0
    for r in range(ROUNDS):
        for impl, workers in configs:
            n += 1
            print(f"[mixed {n}/{total}] round {r + 1}: {impl}, {workers} workers", file=sys.stderr)
            srv = start(impl, workers)
            time.sleep(0.2)
            results.setdefault((impl, workers), []).append(run_mixed(srv.port))
            srv.stop(timeout=15)

    def med(xs):
        xs = [x for x in xs if x == x]  # NaN: a failed run
        return statistics.median(xs) if xs else float("nan")

    lines = [f"Mixed load: wrk -t1 -c{ARGS.mixed_connections} -d{DURATION}s -s scripts/mixed.lua (Connection: close, 1 request "
             "in 200 is GET /work?ms=50, which blocks its worker 50 ms), median of "
             f"{ROUNDS} interleaved round(s).", "",
             "| workers | server | req/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | p99 × rr | p99 × shared |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for workers in MIXED_WORKERS:
        p99 = {i: med([x[2] for x in results[(i, workers)]]) for i in impls}
        for impl in impls:
            rs = results[(impl, workers)]
            rps, p50, mx = med([x[0] for x in rs]), med([x[1] for x in rs]), med([x[3] for x in rs])
            p999, err = med([x[4] for x in rs]), max(x[5] for x in rs)
            lines.append(f"| {workers} | {impl} | {rps:,.0f} | {p50:.2f} | {p99[impl]:.2f} | {p999:.1f} | {mx:.1f} | {err} "
                         f"| {p99[impl] / p99['syncluster rr']:.2f} | {p99[impl] / p99['syncluster shared']:.2f} |")
    lines.append("")
    lines.append("Goal: least-loaded p99 ≤ 0.5 × rr's and ≤ 1.2 × shared's. The slow share stays under 1 % so "
                 "that p99 measures how long fast requests wait behind a blocked worker.")
    return lines


def platform_line():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def write_svg(chart):
    colors = {"syncluster rr": "#2b6cb0", "syncluster shared": "#63b3ed",
              "syncluster least-loaded": "#553c9a", "syncluster reuseport": "#b794f4",
              "c prefork shared": "#2f855a", "c prefork reuseport": "#9ae6b4",
              "c syncluster rr": "#6b46c1", "c syncluster shared": "#d6bcfa",
              "node rr": "#c05621", "node none": "#f6ad55", CMD_NODE: "#805ad5"}
    groups = []
    for label, impl, rps in chart:
        if not groups or groups[-1][0] != label:
            groups.append((label, []))
        groups[-1][1].append((impl, rps))
    top = max(r for _, _, r in chart) or 1
    bar, gap, h, left = 16, 14, 300, 60
    width = max(left + len(groups) * (len(IMPLS) * bar + gap) + 20, left + len(IMPLS) * 150)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h + 140}" font-family="sans-serif" font-size="11">',
             f'<text x="{left}" y="16" font-size="14">requests/s, wrk -t1 -c32 (higher is better)</text>']
    for i in range(5):
        v = top * i / 4
        y = 30 + h - h * i / 4
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y}" y2="{y}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 5}" y="{y + 4}" text-anchor="end">{v / 1000:.0f}k</text>')
    x = left + gap / 2
    for label, bars in groups:
        for impl, rps in bars:
            bh = h * rps / top
            parts.append(f'<rect x="{x}" y="{30 + h - bh}" width="{bar - 2}" height="{bh}" fill="{colors[impl]}"><title>{impl}: {rps:,.0f}</title></rect>')
            x += bar
        parts.append(f'<text x="{x - len(bars) * bar / 2}" y="{h + 45}" text-anchor="middle">{label}</text>')
        x += gap
    ly = h + 70
    for j, impl in enumerate(IMPLS):
        parts.append(f'<rect x="{left + j * 150}" y="{ly}" width="12" height="12" fill="{colors[impl]}"/>')
        parts.append(f'<text x="{left + j * 150 + 16}" y="{ly + 10}">{impl}</text>')
    parts.append("</svg>")
    with open(os.path.join(OUT, "throughput.svg"), "w") as f:
        f.write("\n".join(parts))


if __name__ == "__main__":
    main()
