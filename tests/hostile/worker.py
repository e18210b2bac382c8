#!/usr/bin/env python3
"""A hostile syncluster worker, in plain Python 3 (standard library only).

The primary execs it as a worker (in the probe: `set exec /usr/bin/env`,
`set args python3 <this file> MODE [ARGS...]`). It takes the channel from
SYNCLUSTER_CHANNEL_FD, sends a proper Online frame, then misbehaves as MODE
says. Most modes end in `hold()`: the primary is expected to kill it.

Frames (src/ipc/wire.rs): a 16-byte little-endian header (magic 0x5343 u16,
kind u8, flags u8, nfds u16, reserved u16 = 0, seq u32, len u32), then `len`
payload bytes. fds ride on the first byte of their frame (SCM_RIGHTS).
Payload formats: src/protocol.rs.

To add a mode: write `def mode_name(chan, args)` with the helpers below and
add it to MODES. Diagnostics go to stderr, prefixed `hostile[<pid>]:`.
"""

import os
import signal
import socket
import struct
import sys
import time

MAGIC = 0x5343
HEADER = struct.Struct("<HBBHHII")
ONLINE = 1
QUERY_SERVER = 2
QUERY_REPLY = 3
LISTENING = 4
NEW_CONN = 5
CONN_REPLY = 6
CLOSE = 7
DISCONNECT = 8
EXITED_AFTER_DISCONNECT = 9
ACK = 10
USER = 16

MAX_PAYLOAD = 16 * 1024 * 1024  # the primary's default receive cap
MAX_FDS = 253  # SCM_MAX_FD: fds in one sendmsg


def log(msg):
    print(f"hostile[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def header(kind, length, nfds=0, seq=0, flags=0):
    return HEADER.pack(MAGIC, kind, flags, nfds, 0, seq, length)


def frame(kind, payload=b"", nfds=0, seq=0, flags=0):
    return header(kind, len(payload), nfds, seq, flags) + payload


def send(chan, data, fds=()):
    """Writes all of `data`; `fds` ride on its first byte."""
    if fds:
        n = socket.send_fds(chan, [data], list(fds))
        data = data[n:]
    if data:
        chan.sendall(data)


def query(host, port, index=0, backlog=0):
    """A QueryServer payload for an IP address (protocol.rs, Query::encode)."""
    return struct.pack("<BIIH", 0, index, backlog, port) + host.encode()


def big_message(n):
    """A user message the probe prints as `big:<n>` (and echoes if asked)."""
    return (b"big " + b"x" * n)[:n]


def hold():
    """Waits to be killed; exits if the primary is gone for long."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(1)
    sys.exit(0)


def sends_until_closed(fn):
    """Runs `fn` until the primary closes the channel, then holds."""
    try:
        fn()
    except (BrokenPipeError, ConnectionResetError) as e:
        log(f"channel closed by the primary: {e}")
    hold()


# ---------------------------------------------------------------- modes


def mode_never_read_flood(chan, args):
    """Makes the primary reply, and never reads. ARGS: `user` (default):
    1 MiB user messages, which a probe with `set echo on` sends back;
    `query HOST PORT [N]`: N (default 5000) QueryServer frames for
    HOST:PORT index 0; in shared mode each reply carries a listening fd."""
    kind = args[0] if args else "user"
    if kind == "user":
        msg = frame(USER, big_message(1024 * 1024))

        def flood():
            for _ in range(200):
                send(chan, msg)

    elif kind == "query":
        host, port = args[1], int(args[2])
        n = int(args[3]) if len(args) > 3 else 5000
        blob = b"".join(
            frame(QUERY_SERVER, query(host, port), seq=i + 1) for i in range(n)
        )

        def flood():
            send(chan, blob)

    else:
        raise SystemExit(f"never-read-flood: unknown kind {kind!r}")
    sends_until_closed(flood)


def mode_fd_flood(chan, args):
    """A header announcing 16 MiB and no fds, then 1 byte per sendmsg
    carrying 253 fds each (ARGS: how many, default 100000)."""
    n = int(args[0]) if args else 100000
    fd = os.open("/dev/null", os.O_RDONLY)
    fds = [fd] * MAX_FDS

    def flood():
        send(chan, header(USER, MAX_PAYLOAD))
        for _ in range(n):
            socket.send_fds(chan, [b"x"], fds)

    sends_until_closed(flood)


def mode_header_only(chan, args):
    """A header announcing 16 MiB, then nothing. On SIGUSR1 it shuts its
    side of the channel mid-frame (the primary then sees a truncated frame)."""
    send(chan, header(USER, MAX_PAYLOAD))
    if signal.sigtimedwait({signal.SIGUSR1}, 60) is None:
        sys.exit(0)
    log("SIGUSR1: shutting the channel mid-frame")
    chan.shutdown(socket.SHUT_WR)
    hold()


def mode_fds_mid_frame(chan, args):
    """A frame announcing 1 fd: its header and first bytes come with 1 fd
    (fine), the next bytes with 2 more fds (not on a frame's first byte).
    The frame is never finished."""
    fd = os.open("/dev/null", os.O_RDONLY)
    hdr = header(USER, 4096, nfds=1)

    def misbehave():
        send(chan, hdr + b"a" * 100, [fd])
        send(chan, b"b" * 100, [fd, fd])

    sends_until_closed(misbehave)


def mode_oversize_send(chan, args):
    """A whole 17 MiB user frame, header and payload, as a worker that skips
    the send-side cap would write it."""
    payload = big_message(17 * 1024 * 1024)
    sends_until_closed(lambda: send(chan, frame(USER, payload)))


def mode_garbage(chan, args):
    """64 pseudo-random bytes (xorshift64 from a fixed seed: the same bytes
    every run), which do not start with the frame magic."""
    x = 0x9E3779B97F4A7C15
    out = bytearray()
    for _ in range(64):
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        out.append((x >> 24) & 0xFF)
    assert out[:2] != struct.pack("<H", MAGIC)
    sends_until_closed(lambda: send(chan, bytes(out)))


def mode_oversize(chan, args):
    """A user header announcing 100 MiB, over the primary's receive cap."""
    sends_until_closed(lambda: send(chan, header(USER, 100 << 20)))


def mode_badfds(chan, args):
    """A user frame announcing 2 fds, sent with 1 (a pipe's read end)."""
    r, w = os.pipe()
    os.write(w, b"x")
    os.close(w)
    sends_until_closed(lambda: send(chan, frame(USER, b"fds!", nfds=2), [r]))


def mode_badkind(chan, args):
    """A well-formed NewConn frame, which only the primary may send."""
    sends_until_closed(lambda: send(chan, frame(NEW_CONN)))


def mode_late_listening(chan, args):
    """QueryServer for 127.0.0.1:0 (seq 1), then waits (60 s at most) for
    the file ARGS[0] to exist before it sends Listening for seq 1: a test
    closes the handle in between."""
    flag = args[0]
    send(chan, frame(QUERY_SERVER, query("127.0.0.1", 0), seq=1))
    deadline = time.monotonic() + 60
    while not os.path.exists(flag):
        if time.monotonic() > deadline:
            raise SystemExit(f"late-listening: {flag} never appeared")
        time.sleep(0.01)
    sends_until_closed(lambda: send(chan, frame(LISTENING, seq=1)))


MODES = {
    "never-read-flood": mode_never_read_flood,
    "fd-flood": mode_fd_flood,
    "header-only": mode_header_only,
    "fds-mid-frame": mode_fds_mid_frame,
    "oversize-send": mode_oversize_send,
    "garbage": mode_garbage,
    "oversize": mode_oversize,
    "badfds": mode_badfds,
    "badkind": mode_badkind,
    "late-listening": mode_late_listening,
}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in MODES:
        raise SystemExit(f"usage: worker.py {{{'|'.join(MODES)}}} [ARGS...]")
    mode, args = sys.argv[1], sys.argv[2:]
    try:
        # Die with the primary, as a real worker does (PR_SET_PDEATHSIG).
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    # Blocked before Online, so a test's SIGUSR1 cannot come too early.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    fd = int(os.environ["SYNCLUSTER_CHANNEL_FD"])
    chan = socket.socket(fileno=fd)
    chan.setblocking(True)
    send(chan, frame(ONLINE))
    log(f"online, mode {mode} {' '.join(args)}")
    MODES[mode](chan, args)


if __name__ == "__main__":
    main()
