#!/usr/bin/env python3
"""A hostile syncluster worker: speaks the channel protocol by hand (as an
audit would, with hand-made frames), then makes claims an honest worker
never makes. tests/hostile_worker/primary.rs execs it through the probe:

    set exec /usr/bin/python3
    set args <this script> <mode> [arguments...]

(argv[0] is the probe's own, then the settings' args.) It reads its end of
the channel from SYNCLUSTER_CHANNEL_FD, says Online, and then, per mode:

    close-foreign HID       Close for a handle it was never given
    listening-foreign HID   Listening for a handle it did not query
    listening-twice         queries 127.0.0.1:0 (index 1000, a handle of its
                            own), then Listening twice
    fd-on-control           the same query, then Listening with an fd
    query-flood N           N queries of 127.0.0.1:0 with index 1..N, then
                            reports "flood ok=<n> err=<n> errno=<e> text=<t>"
    query-after-disconnect  waits for Disconnect, then queries 127.0.0.1:0
                            and reports "after-disconnect ok" or
                            "after-disconnect err=<errno>"
    flood SECONDS           64-byte user messages as fast as it can for
                            SECONDS, then reports "flood-done <count>"
    query ADDR              one query (host:port or /path), reports
                            "query ok <hid> <addr>" or "query err <errno> <text>"
    swap DIR VICTIM         listens on DIR/sub/x.sock, moves DIR/sub to
                            DIR/sub2, puts a symlink DIR/sub -> VICTIM, closes
                            the handle, reports "swapped"
    replace PATH            listens on PATH, replaces the socket file with a
                            plain file, closes the handle, reports "replaced"
    pipe-abuse              joins 127.0.0.1:0 (round robin), writes into
                            its pipe, tears a record, reports, exits
    count F:N:L ...         one Count frame (kind 11) per argument, with
                            flags F, seq N and an L-byte payload, then
                            reports "counted" (tests/recycle.rs)

Every message it sends is a user message (kind 16). After its act it keeps
reading the channel until the primary closes it (or it is killed).
"""

import os
import socket
import struct
import sys
import time

MAGIC = 0x5343
ONLINE, QUERY, REPLY, LISTENING, NEWCONN, CONNREPLY, CLOSE = 1, 2, 3, 4, 5, 6, 7
DISCONNECT, EAD, ACK, COUNT, USER = 8, 9, 10, 11, 16
ERROR_FLAG = 1

ch = socket.socket(fileno=int(os.environ["SYNCLUSTER_CHANNEL_FD"]))
buf = b""


def frame(kind, seq=0, payload=b"", nfds=0, flags=0):
    return struct.pack("<HBBHHII", MAGIC, kind, flags, nfds, 0, seq, len(payload)) + payload


def send(kind, seq=0, payload=b"", fds=()):
    data = frame(kind, seq, payload, len(fds))
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))]
        n = ch.sendmsg([data], anc)
        data = data[n:]
    if data:
        ch.sendall(data)


def say(text):
    send(USER, 0, text.encode())


def recv_frame(keep=None):
    """The next frame as (kind, flags, seq, payload), or None at EOF. fds
    that come with it are closed at once, or appended to `keep`."""
    global buf
    while True:
        if len(buf) >= 16:
            _, kind, flags, nfds, _, seq, length = struct.unpack("<HBBHHII", buf[:16])
            if len(buf) >= 16 + length:
                payload = buf[16 : 16 + length]
                buf = buf[16 + length :]
                return kind, flags, seq, payload
        data, anc, _, _ = ch.recvmsg(65536, socket.CMSG_SPACE(253 * 4))
        for level, typ, raw in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                for fd in struct.unpack("%di" % (len(raw) // 4), raw[: len(raw) // 4 * 4]):
                    if keep is None:
                        os.close(fd)
                    else:
                        keep.append(fd)
        if not data:
            return None
        buf += data


def query_payload(addr, index=0, backlog=0):
    if addr.startswith("/"):
        return struct.pack("<BIIH", 2, index, backlog, 0) + addr.encode()
    host, port = addr.rsplit(":", 1)
    return struct.pack("<BIIH", 0, index, backlog, int(port)) + host.encode()


def await_reply(seq, keep=None):
    """(True, hid, addr) or (False, errno, text) for query `seq`."""
    while True:
        f = recv_frame(keep)
        if f is None:
            sys.exit(0)
        kind, flags, fseq, payload = f
        if kind == REPLY and fseq == seq:
            if flags & ERROR_FLAG:
                (errno,) = struct.unpack("<i", payload[:4])
                return False, errno, payload[4:].decode(errors="replace")
            (hid,) = struct.unpack("<I", payload[:4])
            return True, hid, payload[5:].decode(errors="replace")


def query(addr, seq, index=0, keep=None):
    send(QUERY, seq, query_payload(addr, index))
    return await_reply(seq, keep)


def pipe_abuse():
    """Joins 127.0.0.1:0 index 0 (round robin: the reply brings its pipe),
    writes a record with an fd into the pipe, waits for two records, reads
    3 bytes of the first (its fd comes along), closes that connection,
    reports "pipe-abuse write:<errno name or accepted> torn:<fds>" and
    exits, leaving a torn record and whole ones in the pipe."""
    import errno
    import fcntl
    import termios

    fds = []
    ok, hid, _ = query("127.0.0.1:0", 1, keep=fds)
    assert ok and len(fds) == 1, (ok, hid, fds)
    pipe = socket.socket(fileno=fds[0])
    send(LISTENING, hid)
    try:
        pipe.sendmsg([b"\0" * 8], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", pipe.fileno()))])
        wrote = "accepted"
    except OSError as e:
        wrote = errno.errorcode.get(e.errno, str(e.errno))
    deadline = time.monotonic() + 20
    n = bytearray(4)
    while True:
        fcntl.ioctl(pipe.fileno(), termios.FIONREAD, n)
        if struct.unpack("<i", n)[0] >= 16:
            break
        if time.monotonic() > deadline:
            say("pipe-abuse: no two records in 20 s")
            sys.exit(1)
        time.sleep(0.01)
    _, anc, _, _ = pipe.recvmsg(3, socket.CMSG_SPACE(4))
    taken = 0
    for level, typ, raw in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            for fd in struct.unpack("%di" % (len(raw) // 4), raw[: len(raw) // 4 * 4]):
                os.close(fd)
                taken += 1
    say("pipe-abuse write:%s torn:%d" % (wrote, taken))
    time.sleep(0.2)
    sys.exit(0)


def drain_forever():
    while recv_frame() is not None:
        pass
    sys.exit(0)


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    send(ONLINE)
    if mode == "close-foreign":
        send(CLOSE, int(args[0]))
    elif mode == "listening-foreign":
        send(LISTENING, int(args[0]))
    elif mode == "listening-twice":
        ok, hid, _ = query("127.0.0.1:0", 1, index=1000)
        assert ok
        send(LISTENING, hid)
        send(LISTENING, hid)
    elif mode == "fd-on-control":
        ok, hid, _ = query("127.0.0.1:0", 1, index=1000)
        assert ok
        r, w = os.pipe()
        send(LISTENING, hid, fds=[r])
        os.close(r)
        os.close(w)
    elif mode == "query-flood":
        n = int(args[0])
        for i in range(n):
            send(QUERY, i + 1, query_payload("127.0.0.1:0", index=i + 1))
        ok = err = 0
        errno, text = 0, ""
        for i in range(n):
            good, a, b = await_reply(i + 1)
            if good:
                ok += 1
            else:
                err += 1
                errno, text = a, b
        say("flood ok=%d err=%d errno=%d text=%s" % (ok, err, errno, text))
    elif mode == "query-after-disconnect":
        say("waiting")
        while True:
            f = recv_frame()
            if f is None:
                sys.exit(0)
            if f[0] == DISCONNECT:
                break
        good, a, _ = query("127.0.0.1:0", 7)
        say("after-disconnect ok" if good else "after-disconnect err=%d" % a)
    elif mode == "flood":
        end = time.monotonic() + float(args[0])
        batch = frame(USER, 0, b"f" * 48) * 512
        count = 0
        while time.monotonic() < end:
            ch.sendall(batch)
            count += 512
        say("flood-done %d" % count)
    elif mode == "query":
        good, a, b = query(args[0], 1)
        say("query ok %d %s" % (a, b) if good else "query err %d %s" % (a, b))
    elif mode == "swap":
        d, victim = args
        good, hid, _ = query(d + "/sub/x.sock", 1)
        if not good:
            say("swap-failed %d %s" % (hid, _))
            drain_forever()
        send(LISTENING, hid)
        os.rename(d + "/sub", d + "/sub2")
        os.symlink(victim, d + "/sub")
        send(CLOSE, hid)
        say("swapped")
    elif mode == "replace":
        path = args[0]
        good, hid, _ = query(path, 1)
        if not good:
            say("replace-failed %d %s" % (hid, _))
            drain_forever()
        send(LISTENING, hid)
        os.unlink(path)
        with open(path, "w") as f:
            f.write("not the primary's")
        send(CLOSE, hid)
        say("replaced")
    elif mode == "pipe-abuse":
        pipe_abuse()
    elif mode == "count":
        for spec in args:
            flags, n, length = (int(x) for x in spec.split(":"))
            ch.sendall(frame(COUNT, n, b"c" * length, 0, flags))
        say("counted")
    else:
        say("unknown mode " + mode)
    drain_forever()


main()
