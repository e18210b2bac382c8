"""What scripts/bench.py and scripts/chaos.py share: reading /proc, starting
a server and waiting for its `listening on http://HOST:PORT` line, stopping
it and reading its `served {...}` line, and running wrk and reading its
output.

Every process started here is signalled by its exact pid only (workers
found in /proc, each checked against its start time), and killed at exit
if still running."""
import atexit
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
now = time.monotonic
LISTENING = re.compile(r"listening on http://\S+:(\d+)")


# ---------------------------------------------------------------------------
# /proc, by exact pid.

def stat_fields(pid):
    """Fields of /proc/PID/stat after the command name (index 0 = state,
    field 3 of the man page), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def start_time(pid):
    f = stat_fields(pid)
    return int(f[19]) if f else None


def alive(pid, started=None):
    """Exists, is not a zombie, and (if given) is the same process (start time)."""
    f = stat_fields(pid)
    if not f or f[0] in ("Z", "X"):
        return False
    return started is None or int(f[19]) == started


def cpu_ticks(pid):
    """utime + stime of PID (fields 14 and 15) in clock ticks, or None."""
    f = stat_fields(pid)
    return int(f[11]) + int(f[12]) if f else None


def cpu_ms(pid):
    """utime + stime of PID in ms, or None."""
    t = cpu_ticks(pid)
    return t * 1000 // CLK_TCK if t is not None else None


def children(pid):
    """Children of PID (every thread's), zombies excluded."""
    kids = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return [k for k in dict.fromkeys(kids) if alive(k)]


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def send(pid, sig, started=None):
    """Signals one exact pid (checked against its start time if given)."""
    if started is not None and not alive(pid, started):
        return False
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_until(cond, timeout, step=0.01):
    deadline = now() + timeout
    while True:
        v = cond()
        if v:
            return v
        if now() >= deadline:
            return v
        time.sleep(step)


# ---------------------------------------------------------------------------
# A server under test.

class Server:
    """A running server (hello, Node's cluster, the C prefork): stdout and
    stderr lines collected by threads, with the time each arrived; every
    worker pid seen is remembered for the cleanup. Waits for the listening
    line unless told not to; `port` is the one it names, `startup` the
    seconds from the start to that line."""

    live = []

    def __init__(self, cmd, env=None, wait_listening=True, timeout=15, name=None):
        self.cmd = cmd
        self.name = name or os.path.basename(cmd[0])
        self.started = now()
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env, text=True,
                                  start_new_session=True)
        Server.live.append(self)
        self.pid = self.p.pid
        self.seen = {}  # worker pid -> start time
        self.out_lines, self.err_lines = [], []
        self.lock = threading.Lock()
        self.listening = threading.Event()
        self.port = None
        self.startup = None
        self.readers = [threading.Thread(target=self._read, args=(pipe, lines), daemon=True)
                        for pipe, lines in ((self.p.stdout, self.out_lines), (self.p.stderr, self.err_lines))]
        for t in self.readers:
            t.start()
        if wait_listening:
            deadline = now() + timeout
            while not self.listening.wait(0.02) and now() < deadline and self.p.poll() is None:
                pass
            if not self.listening.is_set():
                self.wait_exit(0.5)  # let the stderr reader catch up
                time.sleep(0.05)
                code = self.p.poll()
                self.kill()
                why = f"exited with {code}" if code is not None else f"no listening line in {timeout} s"
                raise RuntimeError(f"{self.name}: {why}; stderr: {self.stderr()!r}")

    def _read(self, pipe, lines):
        for line in pipe:
            line = line.rstrip("\n")
            t = now()
            with self.lock:
                lines.append((t, line))
            m = LISTENING.search(line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self.startup = t - self.started
                self.listening.set()

    def stderr(self):
        with self.lock:
            return "\n".join(l for _, l in self.err_lines)

    def stdout(self):
        with self.lock:
            return [l for _, l in self.out_lines]

    def served(self):
        """The `served {"1":N1,...}` line as a dict, or {}."""
        for line in self.stdout():
            if line.startswith("served "):
                try:
                    return json.loads(line[len("served "):])
                except ValueError:
                    return {}
        return {}

    def err_count(self, pattern):
        with self.lock:
            return sum(1 for _, l in self.err_lines if re.search(pattern, l))

    def wait_err(self, pattern, count=1, timeout=15):
        return wait_until(lambda: self.err_count(pattern) >= count, timeout)

    def workers(self):
        kids = children(self.pid)
        for k in kids:
            if k not in self.seen:
                st = start_time(k)
                if st is not None:
                    self.seen[k] = st
        return kids

    def signal(self, sig):
        if self.p.poll() is None:
            os.kill(self.pid, sig)

    def wait_exit(self, timeout):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout=20):
        """SIGTERM; the exit status (None: had to be killed). Its output is
        read to the end (or for 2 s more) before this returns."""
        self.workers()
        self.signal(signal.SIGTERM)
        code = self.wait_exit(timeout)
        self.kill()
        for t in self.readers:
            t.join(2)
        return code

    def kill(self):
        """SIGKILL workers (exact pids, start time checked), then the primary."""
        self.workers()
        for pid, st in self.seen.items():
            send(pid, signal.SIGKILL, st)
        if self.p.poll() is None:
            self.p.kill()
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        # Workers orphaned by a primary that died first.
        for pid, st in self.seen.items():
            send(pid, signal.SIGKILL, st)
        if self in Server.live:
            Server.live.remove(self)


def cleanup_all():
    for s in list(Server.live):
        try:
            s.kill()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(cleanup_all)


# ---------------------------------------------------------------------------
# wrk.

def ms(text):
    """wrk's duration (`812.00us`, `1.20ms`, `2.00s`) in ms."""
    v = float(re.match(r"([\d.]+)", text).group(1))
    if text.endswith("us"):
        return v / 1000
    if text.endswith("ms"):
        return v
    if text.endswith("s"):
        return v * 1000
    return v


def parse_wrk(out):
    """wrk's output as a dict: requests (completed), rps, p50 and p99 in ms
    (None without --latency or when nothing completed), errors (socket
    errors plus non-2xx/3xx responses) and socket_errors (the line, or None)."""
    def num(pattern, conv=float):
        m = re.search(pattern, out)
        return conv(m.group(1)) if m else None

    # Anchored: the stdev column ("97.50%") must not pass for the 50% line.
    p50 = re.search(r"^\s*50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s*99%\s+(\S+)", out, re.M)
    try:
        p50, p99 = (ms(p50.group(1)) if p50 else None), (ms(p99.group(1)) if p99 else None)
    except (AttributeError, ValueError):
        p50 = p99 = None
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += num(r"Non-2xx or 3xx responses: (\d+)", int) or 0
    sock = re.search(r"Socket errors:.*", out)
    return dict(requests=num(r"(\d+) requests in", int) or 0, rps=num(r"Requests/sec:\s+([\d.]+)"),
                p50=p50, p99=p99, errors=errors, socket_errors=sock.group(0) if sock else None)


def run_wrk(args, timeout):
    """Runs `wrk ARGS`; (parsed output, raw stdout)."""
    out = subprocess.run(["wrk", *args], capture_output=True, text=True, timeout=timeout).stdout
    return parse_wrk(out), out
