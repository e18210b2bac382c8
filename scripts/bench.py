#!/usr/bin/env python3
"""Driver of scripts/bench.sh: runs every configuration in interleaved
rounds, takes medians, prints and writes the table and an SVG chart."""
import json, os, re, shutil, signal, socket, statistics, subprocess, sys, time

QUICK = "--quick" in sys.argv
ROUNDS = 1 if QUICK else 3
DURATION = 2 if QUICK else 5
WORKERS = [1, 2, 4]
MODES = ["keep-alive", "close"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELLO = os.path.join(ROOT, "target/release/examples/hello")
NODE = shutil.which("node")
OUT = os.path.join(ROOT, "target/bench")

IMPLS = ["syncluster rr", "syncluster shared"]
if NODE:
    IMPLS += ["node rr", "node none"]
else:
    print("node not found: skipping Node's cluster (install nodejs to compare)", file=sys.stderr)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(impl, workers):
    """Starts a server; returns (process, port, seconds from exec to the listening line)."""
    t0 = time.monotonic()
    if impl.startswith("syncluster"):
        policy = impl.split()[1]
        cmd = [HELLO, "--workers", str(workers), "--port", "0", "--policy", policy]
        env = dict(os.environ)
    else:
        port = free_port()
        cmd = [NODE, os.path.join(ROOT, "scripts/node_hello.js"), str(workers), str(port)]
        env = dict(os.environ, NODE_CLUSTER_SCHED_POLICY=impl.split()[1])
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    line = p.stdout.readline()
    m = re.search(r"listening on http://[^:]+:(\d+)", line)
    if not m:
        p.kill()
        raise RuntimeError(f"{impl}: no listening line, got {line!r}")
    return p, int(m.group(1)), time.monotonic() - t0


def stop(p):
    """SIGTERM, then the served line as a dict (or {})."""
    p.send_signal(signal.SIGTERM)
    served = {}
    try:
        out, _ = p.communicate(timeout=15)
        for line in out.splitlines():
            if line.startswith("served "):
                served = json.loads(line[len("served "):])
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
    return served


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def ms(text):
    v = float(re.match(r"([\d.]+)", text).group(1))
    if text.endswith("us"):
        return v / 1000
    if text.endswith("ms"):
        return v
    if text.endswith("s"):
        return v * 1000
    return v


def run_wrk(port, mode):
    cmd = ["wrk", "-t1", "-c32", f"-d{DURATION}s", "--latency", f"http://127.0.0.1:{port}/"]
    if mode == "close":
        cmd[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=DURATION + 30).stdout
    try:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        p50 = ms(re.search(r"50%\s+(\S+)", out).group(1))
        p99 = ms(re.search(r"99%\s+(\S+)", out).group(1))
    except (AttributeError, ValueError):
        # No latency figures: wrk completed nothing. Keep its words.
        with open(os.path.join(OUT, "wrk-failure.txt"), "a") as f:
            f.write(f"port {port} {mode}:\n{out}\n")
        return 0.0, float("nan"), float("nan"), 1
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(m.group(1)) if m else 0
    return rps, p50, p99, errors


def main():
    os.makedirs(OUT, exist_ok=True)
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
            p, port, startup = start(impl, workers)
            starts.setdefault((impl, workers), []).append(startup)
            time.sleep(0.2)
            sampler = None
            rps, p50, p99, errors = run_wrk(port, mode)
            kb = rss_kb(p.pid)
            if kb:
                rss.setdefault(impl, []).append(kb)
            time.sleep(0.3)
            served = stop(p)
            counts = [v for v in served.values() if v > 0] if served else []
            fair = (max(counts) / min(counts)) if len(counts) == workers and min(counts) > 0 else None
            results.setdefault((impl, workers, mode), []).append((rps, p50, p99, errors, fair, served))
    # 8 workers: exec to the listening line.
    for impl in IMPLS:
        for _ in range(3 if not QUICK else 1):
            p, _, startup = start(impl, 8)
            starts.setdefault((impl, 8), []).append(startup)
            stop(p)

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    lines = []
    lines.append(f"wrk -t1 -c32 -d{DURATION}s, median of {ROUNDS} interleaved round(s); "
                 f"{os.cpu_count()} CPUs, {platform_line()}")
    lines.append("")
    lines.append("| workers | mode | server | req/s | p50 ms | p99 ms | errors | busiest/idlest | × node rr |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
    chart = []
    for workers in WORKERS:
        for mode in MODES:
            base = results.get(("node rr", workers, mode))
            base_rps = med([x[0] for x in base]) if base else None
            for impl in IMPLS:
                rs = results[(impl, workers, mode)]
                rps = med([x[0] for x in rs])
                p50 = med([x[1] for x in rs])
                p99 = med([x[2] for x in rs])
                err = max(x[3] for x in rs)
                fair = med([x[4] for x in rs])
                ratio = f"{rps / base_rps:.2f}" if base_rps else "-"
                fair_s = f"{fair:.3f}" if fair else "-"
                lines.append(f"| {workers} | {mode} | {impl} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {err} | {fair_s} | {ratio} |")
                chart.append((f"{workers}w {mode}", impl, rps))
    lines.append("")
    lines.append("| server | exec → all 8 workers listening (median) | primary RSS under load (median) |")
    lines.append("|---|---:|---:|")
    for impl in IMPLS:
        st = med(starts.get((impl, 8), []))
        kb = med(rss.get(impl, []))
        lines.append(f"| {impl} | {st * 1000:.0f} ms | {kb / 1024:.1f} MiB |" if kb else f"| {impl} | {st * 1000:.0f} ms | - |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(OUT, "report.md"), "w") as f:
        f.write("# syncluster benchmark\n\nProduced by `scripts/bench.sh" + (" --quick" if QUICK else "") + "`.\n\n" + text + "\n")
    write_svg(chart)
    print(f"\nwrote {OUT}/report.md and {OUT}/throughput.svg", file=sys.stderr)


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
              "node rr": "#c05621", "node none": "#f6ad55"}
    groups = []
    for label, impl, rps in chart:
        if not groups or groups[-1][0] != label:
            groups.append((label, []))
        groups[-1][1].append((impl, rps))
    top = max(r for _, _, r in chart) or 1
    bar, gap, h, left = 16, 14, 300, 60
    width = left + len(groups) * (len(IMPLS) * bar + gap) + 20
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
