#!/usr/bin/env python3
"""Checks the plain workers of examples/workers/ (hello.c, hello.py,
hello.js) under systemd-socket-activate, as examples/workers/README.md
shows them run:

    python3 scripts/workers.py

For each one: the first request is answered (it names the worker),
READY=1 arrives on NOTIFY_SOCKET (an abstract name, then a path; not for
Node, which cannot send it), and a SIGTERM that lands while a request is
half-sent lets that request finish with a 200, then the process exits 0
and the port refuses. Exits non-zero if a check fails."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from harness import HOST, ROOT, Server, free_port, now

OUT = os.path.join(ROOT, "target/workers")
SRC = os.path.join(ROOT, "examples/workers")


def request(port, head=b"GET / HTTP/1.1\r\nHost: check\r\nConnection: close\r\n\r\n", timeout=5):
    """(status, body) of one request on a new connection."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(head)
        return read_response(s)


def read_response(s):
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ")
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), body


def notify_socket(kind, tmp):
    """A datagram socket to receive READY=1, and the NOTIFY_SOCKET naming it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "abstract":
        name = f"syncluster-workers-check-{os.getpid()}-{time.monotonic_ns()}"
        s.bind("\0" + name)
        addr = "@" + name
    else:
        addr = os.path.join(tmp, f"notify-{time.monotonic_ns()}")
        s.bind(addr)
    s.settimeout(0.1)
    return s, addr


def check(name, cmd, ready, kind, worker_id, tmp):
    """Runs one worker under systemd-socket-activate; a list of failures."""
    bad = []
    port = free_port()
    ns, addr = notify_socket(kind, tmp)
    env_args = ["-E", f"NOTIFY_SOCKET={addr}"] + (["-E", f"SYNCLUSTER_WORKER_ID={worker_id}"] if worker_id else [])
    srv = Server(["systemd-socket-activate", "-l", f"{HOST}:{port}", "--fdname=http", *env_args, *cmd],
                 wait_listening=False, name=name)
    try:
        if not srv.wait_err(r"^Listening on", 1, timeout=5):
            return [f"systemd-socket-activate did not listen: {srv.stderr()!r}"]
        # The first connection makes systemd-socket-activate exec the worker.
        t0 = now()
        status, body = request(port, timeout=10)
        first = now() - t0
        want = f"hello from worker {worker_id}\n" if worker_id else f"hello from pid {srv.pid}\n"
        if status != 200 or body.decode() != want:
            bad.append(f"first request: {status} {body!r}, wanted 200 {want!r}")
        got = []
        deadline = now() + (2 if ready else 0.5)
        while now() < deadline and not got:
            try:
                got.append(ns.recv(4096))
            except socket.timeout:
                pass
        if ready and got != [b"READY=1"]:
            bad.append(f"READY=1 not received on {kind} NOTIFY_SOCKET (got {got})")
        if not ready and got:
            bad.append(f"unexpected notification {got}")
        # SIGTERM while a request is half-sent: it must still be answered.
        s = socket.create_connection((HOST, port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: check\r\n")
        time.sleep(0.3)
        srv.signal(signal.SIGTERM)
        time.sleep(0.3)
        s.sendall(b"\r\n")
        status2, body2 = read_response(s)
        s.close()
        if status2 != 200 or body2.decode() != want:
            bad.append(f"request in flight at SIGTERM: {status2} {body2!r}")
        code = srv.wait_exit(5)
        if code != 0:
            bad.append(f"exit status after SIGTERM: {code} (stderr {srv.stderr()!r})")
        try:
            request(port, timeout=1)
            bad.append("the port still answers after the exit")
        except ConnectionRefusedError:
            pass
        print(f"{'ok  ' if not bad else 'FAIL'}  {name}: first answer {body.decode().strip()!r} in "
              f"{first * 1000:.0f} ms (exec included); READY via {kind}: {got or 'none'}; "
              f"in flight at SIGTERM: {status2}; exit {code}", flush=True)
        return bad
    finally:
        ns.close()
        srv.kill()


def main():
    if not shutil.which("systemd-socket-activate"):
        sys.exit("systemd-socket-activate not found (Debian: apt-get install systemd)")
    os.makedirs(OUT, exist_ok=True)
    hello_c = os.path.join(OUT, "hello")
    subprocess.run(["cc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-o", hello_c,
                    os.path.join(SRC, "hello.c")], check=True)
    workers = [("hello.c", [hello_c], True),
               ("hello.py", [sys.executable, os.path.join(SRC, "hello.py")], True)]
    if shutil.which("node"):
        workers.append(("hello.js", [shutil.which("node"), os.path.join(SRC, "hello.js")], False))
    else:
        print("node not found: hello.js skipped", file=sys.stderr)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd, ready in workers:
            for kind, worker_id in (("abstract", "7"), ("path", None)):
                bad = check(name, cmd, ready, kind, worker_id, tmp)
                for b in bad:
                    print(f"      {name}: {b}", flush=True)
                failed += bool(bad)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
