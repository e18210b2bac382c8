// Node's cluster serving the same hello world as examples/hello.rs, for
// side-by-side benchmarks. Policy from NODE_CLUSTER_SCHED_POLICY (rr|none).
// GET /work?ms=N blocks the worker N ms, as hello's does (scripts/mixed.lua).
// Usage: node scripts/node_hello.js WORKERS PORT
'use strict';
const cluster = require('cluster');
const http = require('http');

const workers = parseInt(process.argv[2] || '2', 10);
const port = parseInt(process.argv[3] || '8000', 10);

if (cluster.isPrimary) {
  const served = {};
  let listening = 0;
  for (let i = 0; i < workers; i++) cluster.fork();
  cluster.on('listening', () => {
    if (++listening === workers) console.log(`listening on http://127.0.0.1:${port} (${workers} workers, node)`);
  });
  cluster.on('message', (w, msg) => { if (msg && msg.served !== undefined) served[w.id] = msg.served; });
  let stopping = false;
  // Respawn like syncluster's supervisor does, so kill tests compare alike.
  cluster.on('exit', () => { if (!stopping) cluster.fork(); });
  const stop = () => {
    stopping = true;
    cluster.disconnect(() => { console.log('served ' + JSON.stringify(served)); process.exit(0); });
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  let served = 0;
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  const server = http.createServer((req, res) => {
    // GET /work?ms=N blocks the worker N ms (at most 10000), as hello does.
    const work = /^\/work\?ms=(\d{1,5})$/.exec(req.url);
    if (work && +work[1] <= 10000) Atomics.wait(sleeper, 0, 0, +work[1]);
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': 12 });
    res.end('hello world\n');
  });
  server.on('connection', () => { served++; });
  server.listen(port, '127.0.0.1');
  // Report often; the bench stops the load before it stops the cluster.
  setInterval(() => process.send({ served }), 100).unref();
}
