#!/usr/bin/env python3
"""Scale figures of syncluster on this machine (issue 13, section 4), side
by side with Node's cluster where the issue names it:

  1. 10,000 concurrent keep-alive connections held open over 4 workers
     (rr and shared), then a wrk keep-alive load on top: worker RSS per
     connection, and the primary's fds and RSS before, with the 10,000
     open, and after the load (they must stay flat: the primary holds no
     connection once a worker took it).
  2. --workers 8, 16, 32, 64 on this machine: exec to every worker
     listening, and the primary's RSS.
  3. c = 1,000 with `Connection: close`: wrk -c1000 against hello rr and
     Node's cluster rr, 4 workers; requests/s and errors.

    python3 scripts/scale.py [--quick] [--only 1,2,3]

Builds nothing: run `cargo build --release --example hello` first (or
scripts/bench.sh). Prints a Markdown report and writes target/bench/scale.md."""
import argparse
import os
import resource
import shutil
import socket
import sys
import time

from harness import ROOT, Server, children, fd_count, free_port, rss_kb, run_wrk

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--quick", action="store_true", help="shorter wrk runs")
ap.add_argument("--only", default="1,2,3", help="which parts, comma-separated (default 1,2,3)")
ap.add_argument("--conns", type=int, default=10_000, help="idle keep-alive connections in part 1")
ARGS = ap.parse_args()
PARTS = set(ARGS.only.split(","))
DURATION = 3 if ARGS.quick else 5
HELLO = os.path.join(ROOT, "target/release/examples/hello")
NODE = shutil.which("node")
OUT = os.path.join(ROOT, "target/bench")
GET = b"GET / HTTP/1.1\r\nHost: scale\r\n\r\n"


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, need))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def worker_rss_kb(srv):
    return sum(rss_kb(p) or 0 for p in children(srv.pid))


def read_response(s):
    data = b""
    while b"hello world\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the answer")
        data += chunk
    return data


def hold_connections(port, n):
    """n keep-alive connections, each answered once; the list of sockets."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(GET)
        socks.append(s)
        if len(socks) % 200 == 0:  # read the answers in batches: bounded backlog
            for t in socks[-200:]:
                read_response(t)
    for t in socks[len(socks) - len(socks) % 200:]:
        read_response(t)
    return socks


def part_connections():
    lines = [f"## {ARGS.conns:,} idle keep-alive connections, 4 workers, then wrk on top", "",
             f"Held open by one Python client (each answered once), then `wrk -t1 -c32 -d{DURATION}s` "
             "keep-alive on top; at the end 100 of the held connections are asked again.", "",
             "| policy | worker RSS per held connection | primary fds: before / held / after wrk "
             "| primary RSS: before / held / after wrk | wrk req/s on top | wrk errors | held ones answering after |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    raise_nofile(ARGS.conns + 2000)
    env = dict(os.environ, HELLO_READ_TIMEOUT_MS="600000")
    for policy in ("rr", "shared"):
        srv = Server([HELLO, "--workers", "4", "--port", "0", "--policy", policy], env=env, name=f"hello {policy}")
        try:
            time.sleep(0.3)
            fds0, rss0, w0 = fd_count(srv.pid), rss_kb(srv.pid), worker_rss_kb(srv)
            socks = hold_connections(srv.port, ARGS.conns)
            time.sleep(0.5)
            fds1, rss1, w1 = fd_count(srv.pid), rss_kb(srv.pid), worker_rss_kb(srv)
            w, _ = run_wrk(["-t1", "-c32", f"-d{DURATION}s", f"http://127.0.0.1:{srv.port}/"], DURATION + 30)
            fds2, rss2 = fd_count(srv.pid), rss_kb(srv.pid)
            ok = 0
            for s in socks[:: max(1, len(socks) // 100)][:100]:
                try:
                    s.sendall(GET)
                    read_response(s)
                    ok += 1
                except OSError:
                    pass
            per_conn = (w1 - w0) * 1024 / len(socks)
            lines.append(f"| {policy} | {per_conn / 1024:.1f} KiB | {fds0} / {fds1} / {fds2} "
                         f"| {rss0 / 1024:.1f} / {rss1 / 1024:.1f} / {rss2 / 1024:.1f} MiB "
                         f"| {w['rps'] or 0:,.0f} | {w['errors']} | {ok} of 100 |")
            for s in socks:
                s.close()
        finally:
            srv.stop(timeout=20)
    return lines


def part_workers():
    lines = ["## Many workers on 2 cores: exec to every worker listening, and the primary's RSS", "",
             "| workers | hello rr: ready | primary RSS | per worker |", "|---:|---:|---:|---:|"]
    for n in (8, 16, 32, 64):
        srv = Server([HELLO, "--workers", str(n), "--port", "0", "--policy", "rr"], timeout=60, name=f"hello x{n}")
        try:
            time.sleep(0.3)
            kb = rss_kb(srv.pid)
            lines.append(f"| {n} | {srv.startup * 1000:.0f} ms | {kb / 1024:.1f} MiB | {kb / n:.0f} KiB |")
        finally:
            srv.stop(timeout=30)
    return lines


def part_c1000():
    lines = ["## c = 1,000 with `Connection: close`, 4 workers", "",
             f"`wrk -t1 -c1000 -d{DURATION}s -H 'Connection: close'`.", "",
             "| server | req/s | p99 ms | errors | socket errors |", "|---|---:|---:|---:|---|"]
    raise_nofile(4096)
    servers = [("syncluster rr", [HELLO, "--workers", "4", "--port", "0", "--policy", "rr"], None)]
    if NODE:
        env = dict(os.environ, NODE_CLUSTER_SCHED_POLICY="rr")
        servers.append(("node rr", [NODE, os.path.join(ROOT, "scripts/node_hello.js"), "4", str(free_port())], env))
    for name, cmd, env in servers:
        srv = Server(cmd, env=env, name=name)
        try:
            time.sleep(0.3)
            w, _ = run_wrk(["-t1", "-c1000", f"-d{DURATION}s", "--latency", "-H", "Connection: close",
                            f"http://127.0.0.1:{srv.port}/"], DURATION + 60)
            p99 = f"{w['p99']:.1f}" if w["p99"] is not None else "-"
            lines.append(f"| {name} | {w['rps'] or 0:,.0f} | {p99} | {w['errors']} | {w['socket_errors'] or '-'} |")
        finally:
            srv.stop(timeout=20)
        time.sleep(2)  # let TIME_WAIT ports of this run thin out
    return lines


def main():
    if not os.path.exists(HELLO):
        sys.exit(f"{HELLO} missing: cargo build --release --example hello")
    os.makedirs(OUT, exist_ok=True)
    lines = [f"# syncluster scale figures\n\nProduced by `python3 scripts/scale.py{' --quick' if ARGS.quick else ''}` "
             f"on {os.cpu_count()} CPUs.", ""]
    for part, fn in (("1", part_connections), ("2", part_workers), ("3", part_c1000)):
        if part in PARTS:
            lines += fn() + [""]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(OUT, "scale.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
