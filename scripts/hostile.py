"""The "hostile worker" group of scripts/chaos.py.

Each scenario runs examples/cluster_probe (release) as the primary, one
honest probe worker listening on 127.0.0.1:0 under client load, and one
hostile worker beside it: tests/hostile/worker.py (channel floods) or
tests/hostile/claims.py (lies), exec'd by the primary as any worker is. It
reports the primary's peak RSS and fds (sampled every 2 ms), whether the
hostile worker was reported and killed, and the honest worker's requests,
failures and worst latency. Every wait has a deadline; the probe, and with
it every worker, is killed on every path.
"""
import os
import queue
import socket
import subprocess
import threading
import time

from harness import ROOT, fd_count, now, rss_kb

PROBE = os.path.join(ROOT, "target/release/examples/cluster_probe")
WORKER_PY = os.path.join(ROOT, "tests/hostile/worker.py")
CLAIMS_PY = os.path.join(ROOT, "tests/hostile/claims.py")
DEADLINE = 10.0


class Probe:
    """The scriptable primary: commands on stdin, one line per event."""

    def __init__(self):
        self.p = subprocess.Popen([PROBE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.lines = queue.Queue()
        self.log = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))

    def cmd(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def expect(self, prefix, timeout=DEADLINE):
        """The first line (kept or new) starting with `prefix`, or None."""
        for i, l in enumerate(self.log):
            if l.startswith(prefix):
                return self.log.pop(i)
        end = now() + timeout
        while now() < end:
            try:
                l = self.lines.get(timeout=max(0.0, end - now()))
            except queue.Empty:
                break
            if l.startswith(prefix):
                return l
            self.log.append(l)
        return None

    def ask(self, line, prefix):
        self.cmd(line)
        got = self.expect(prefix)
        if got is None:
            raise RuntimeError(f"{line!r}: no {prefix!r} (log {self.log[-5:]})")
        return got

    def fork_hostile(self, script, mode):
        self.ask("set exec /usr/bin/env", "ok set")
        self.ask(f"set args python3 {script} {mode}", "ok set")
        wid = int(self.ask("fork", "forked ").split()[1])
        self.ask(f"set exec {PROBE}", "ok set")
        self.ask("set args", "ok set")
        if self.expect(f"online {wid}") is None:
            raise RuntimeError(f"hostile worker {wid} never came online")
        return wid

    def honest(self):
        wid = int(self.ask("fork PROBE_MODE=listen PROBE_ADDR=127.0.0.1:0", "forked ").split()[1])
        line = self.expect(f"listening {wid} ")
        if line is None:
            raise RuntimeError("the honest worker did not listen")
        host, port = line.rsplit(" ", 1)[1].rsplit(":", 1)
        return wid, (host, int(port))

    def kill(self):
        try:
            self.p.stdin.close()  # EOF: the probe SIGKILLs its workers, reaps them, exits
            self.p.wait(timeout=5)
        except Exception:  # noqa: BLE001 - then by force
            self.p.kill()
            self.p.wait()


class Sampler(threading.Thread):
    """Peak RSS (kB) and fd count of one pid, every 2 ms."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.rss, self.fds, self.stop = pid, 0, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.rss = max(self.rss, rss_kb(self.pid) or 0)
            self.fds = max(self.fds, fd_count(self.pid) or 0)
            time.sleep(0.002)


class Clients(threading.Thread):
    """4 client threads, one connection each at a time, for `seconds`."""

    def __init__(self, addr, seconds):
        super().__init__(daemon=True)
        self.addr, self.seconds = addr, seconds
        self.ok = self.failed = 0
        self.worst = 0.0
        self.mu = threading.Lock()

    def one(self, end):
        while now() < end:
            t0 = now()
            try:
                with socket.create_connection(self.addr, timeout=5) as s:
                    s.settimeout(5)
                    good = s.recv(64).startswith(b"worker ")
            except OSError:
                good = False
            with self.mu:
                self.worst = max(self.worst, now() - t0)
                if good:
                    self.ok += 1
                else:
                    self.failed += 1

    def run(self):
        end = now() + self.seconds
        ts = [threading.Thread(target=self.one, args=(end,), daemon=True) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(self.seconds + 10)


# (title, key, script, mode, probe setup, killed: must the hostile worker be killed?)
CASES = [
    ("never reads (1 MiB echoes)", "never-read", WORKER_PY, "never-read-flood user",
     ["set echo on"], True),
    ("never reads (shared-mode query replies with fds)", "never-read-fds", WORKER_PY,
     "never-read-flood query 127.0.0.1 0 5000", ["set policy shared"], True),
    ("fd flood (253 fds per byte)", "fd-flood", WORKER_PY, "fd-flood", [], True),
    ("fds in the middle of a frame", "fds-mid-frame", WORKER_PY, "fds-mid-frame", [], True),
    ("16 MiB header, no payload", "header-only", WORKER_PY, "header-only", [], False),
    ("64-byte message flood (loop budget)", "flood", CLAIMS_PY, "flood 2", [], False),
    ("query flood (handle cap)", "query-flood", CLAIMS_PY, "query-flood 5000", [], False),
    ("closes a handle never given", "close-foreign", CLAIMS_PY, "close-foreign 1", [], True),
    ("claims Listening for a handle not queried", "listening-foreign", CLAIMS_PY,
     "listening-foreign 1", [], True),
]


def run_case(script, mode, setup, must_die, seconds):
    p = Probe()
    try:
        for line in setup:
            p.ask(line, "ok set")
        _, addr = p.honest()
        base_rss, base_fds = rss_kb(p.p.pid) or 0, fd_count(p.p.pid) or 0
        sampler = Sampler(p.p.pid)
        sampler.start()
        clients = Clients(addr, seconds)
        clients.start()
        hid = p.fork_hostile(script, mode)
        reported = p.expect(f"error {hid} ", timeout=seconds + 2) if must_die else None
        died = p.expect(f"exit {hid} signal=9", timeout=3) if must_die else None
        clients.join(seconds + 15)
        sampler.stop.set()
        sampler.join(1)
        return dict(base_rss=base_rss, base_fds=base_fds, rss=sampler.rss, fds=sampler.fds,
                    reported=reported, died=died, ok=clients.ok, failed=clients.failed,
                    worst=clients.worst)
    finally:
        p.kill()


def scenarios(quick):
    """(title, key, fn) rows for chaos.py's SCENARIOS; fn(args, rng) gives
    (figure, ok, details)."""
    seconds = 2.0 if quick else 4.0
    out = []
    for title, key, script, mode, setup, must_die in CASES:
        def fn(args, rng, script=script, mode=mode, setup=setup, must_die=must_die):
            if not os.path.exists(PROBE):
                raise RuntimeError(f"{PROBE} is missing: cargo build --release --example cluster_probe")
            r = run_case(script, mode, setup, must_die, seconds)
            killed = bool(r["reported"] and r["died"])
            ok = r["failed"] == 0 and r["ok"] > 0 and (killed or not must_die) \
                and r["rss"] - r["base_rss"] < 64 * 1024 and r["fds"] - r["base_fds"] < 600
            fig = (f"primary peak RSS {r['rss'] / 1024:.1f} MiB (from {r['base_rss'] / 1024:.1f}), "
                   f"peak fds {r['fds']} (from {r['base_fds']}); hostile worker "
                   f"{'reported and killed' if killed else 'not killed' if must_die else 'bounded, kept'}; "
                   f"honest worker: {r['ok']} requests, {r['failed']} failed, "
                   f"worst {r['worst'] * 1000:.0f} ms")
            details = [f"report: {r['reported']}"] if r["reported"] else []
            return fig, ok, details
        out.append((f"hostile worker: {title}", f"hostile-{key}", fn))
    return out
