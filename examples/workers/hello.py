#!/usr/bin/env python3
"""A plain hello-world worker (Python 3, stdlib only) that speaks systemd's
two protocols itself: socket activation (it serves on the socket passed as
fd 3) and readiness (READY=1 to $NOTIFY_SOCKET).

    systemd-socket-activate -l 127.0.0.1:8080 python3 examples/workers/hello.py

One connection at a time, one request per connection (HTTP/1.0 semantics):
run several processes for concurrency. On SIGTERM or SIGINT it finishes the
request it holds and exits 0. Its answer names it: $SYNCLUSTER_WORKER_ID if
set, else its pid.
"""
import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

LISTEN_FDS_START = 3


def listen_fds():
    """sd_listen_fds(): [(fd, name)] for the fds, from 3, that the service
    manager passed to this very process. Unsets the three variables, so no
    child of ours mistakes them for its own; the fds become close-on-exec."""
    env = os.environ
    n = 0
    if env.get("LISTEN_PID", "").isdigit() and int(env["LISTEN_PID"]) == os.getpid():
        n = int(env["LISTEN_FDS"]) if env.get("LISTEN_FDS", "").isdigit() else 0
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)  # os.environ.pop calls unsetenv
    fds = []
    for i in range(n):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        fds.append((fd, names[i] if i < len(names) and names[i] else "unknown"))
    return fds


def notify(state):
    """sd_notify(): one datagram to $NOTIFY_SOCKET, a path or, with a leading
    '@', an abstract name. False when nobody asked."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), addr)
    return True


class InheritedHTTPServer(HTTPServer):
    """An HTTPServer on a socket it was given, listening already: no bind."""

    def __init__(self, sock, handler):
        self.address_family = sock.family
        super().__init__(sock.getsockname(), handler, bind_and_activate=False)
        self.socket.close()  # the unbound one socketserver made
        self.socket = sock


class Hello(BaseHTTPRequestHandler):
    timeout = 10  # a slow client costs only its own connection
    body = b"hello\n"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.body)

    do_HEAD = do_GET

    def address_string(self):
        # A Unix socket's peer address is a string, often empty.
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"


def main():
    fds = listen_fds()
    if not fds:
        sys.exit("hello.py: no socket passed (LISTEN_FDS, LISTEN_PID); run it under "
                 "systemd-socket-activate -l 127.0.0.1:8080, a .socket unit or syncluster")
    fd, name = fds[0]
    me = os.environ.get("SYNCLUSTER_WORKER_ID")
    Hello.body = (f"hello from worker {me}\n" if me else f"hello from pid {os.getpid()}\n").encode()
    sock = socket.socket(fileno=fd)
    # Non-blocking: with several workers on one socket, the one that loses
    # the race for a connection gets EAGAIN (socketserver skips it) instead
    # of blocking in accept(), where a SIGTERM would be retried past (PEP
    # 475) and the worker would not stop until the next connection.
    sock.setblocking(False)
    server = InheritedHTTPServer(sock, Hello)

    def stop(signum, frame):
        # shutdown() waits for serve_forever to return, which happens
        # between two requests: not from this thread, which runs it.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    notify("READY=1")
    print(f"hello.py: pid {os.getpid()} serving on fd {fd} ({name})", file=sys.stderr, flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
