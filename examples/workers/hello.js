// A plain hello-world worker for Node (no cluster module) that takes its
// listening socket from systemd's socket activation: fd 3.
//
//   systemd-socket-activate -l 127.0.0.1:8080 node examples/workers/hello.js
//
// Readiness: Node's core has no Unix datagram sockets, so this worker cannot
// send READY=1 to $NOTIFY_SOCKET itself (and `systemd-notify --ready` would
// speak for the wrong pid). Under `syncluster -- node hello.js`, use
// `--ready-after MS`; under systemd, Type=simple or Type=exec.
//
// On SIGTERM or SIGINT it stops accepting, finishes the requests in flight,
// closes idle keep-alive connections and exits 0. Its answer names it:
// $SYNCLUSTER_WORKER_ID if set, else its pid.
'use strict';
const http = require('http');

const LISTEN_FDS_START = 3;

// sd_listen_fds(): [{fd, name}] for the fds, from 3, that the service manager
// passed to this very process. The three variables are removed, so no child
// of ours mistakes them for its own. (Node cannot set FD_CLOEXEC on them: a
// child spawned by this process inherits fd 3 open.)
function listenFds() {
  const env = process.env;
  const digits = (s) => /^[0-9]+$/.test(s || '');
  let n = 0;
  if (digits(env.LISTEN_PID) && Number(env.LISTEN_PID) === process.pid && digits(env.LISTEN_FDS)) {
    n = Number(env.LISTEN_FDS);
  }
  const names = (env.LISTEN_FDNAMES || '').split(':');
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  const fds = [];
  for (let i = 0; i < n; i++) fds.push({ fd: LISTEN_FDS_START + i, name: names[i] || 'unknown' });
  return fds;
}

const fds = listenFds();
if (fds.length === 0) {
  console.error('hello.js: no socket passed (LISTEN_FDS, LISTEN_PID); run it under ' +
    'systemd-socket-activate -l 127.0.0.1:8080, a .socket unit or syncluster');
  process.exit(2);
}
const me = process.env.SYNCLUSTER_WORKER_ID;
const body = me ? `hello from worker ${me}\n` : `hello from pid ${process.pid}\n`;

let stopping = false;
const server = http.createServer((req, res) => {
  const head = { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) };
  if (stopping) head.Connection = 'close'; // Node then closes after the answer
  res.writeHead(200, head);
  res.end(req.method === 'HEAD' ? undefined : body);
});
// A client that stalls costs only its own connection.
server.headersTimeout = 10000;
server.requestTimeout = 10000;
server.listen({ fd: fds[0].fd }, () => {
  console.error(`hello.js: pid ${process.pid} serving on fd ${fds[0].fd} (${fds[0].name})`);
});

function stop() {
  if (stopping) return;
  stopping = true;
  // No new connections; the callback runs once every connection has ended.
  server.close(() => process.exit(0));
  server.closeIdleConnections();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
