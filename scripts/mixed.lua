-- wrk script for the mixed load of scripts/bench.py: every request is
-- `Connection: close`, and 1 in 200 is `GET /work?ms=50`, which blocks its
-- worker 50 ms (hello and scripts/node_hello.js serve it). The slow share
-- stays under 1 % on purpose: p99 then measures how long the fast requests
-- wait behind a blocked worker, not the slow requests themselves.
--   wrk -t1 -c32 -d5s --latency -s scripts/mixed.lua http://127.0.0.1:PORT/
-- MIXED_P (default 0.005) and MIXED_MS (default 50) change the mix.
local p = tonumber(os.getenv("MIXED_P") or "0.005")
local ms = os.getenv("MIXED_MS") or "50"
local fast, slow

function init(args)
  -- Each thread its own sequence: the address of a fresh table differs.
  local salt = tonumber(tostring({}):match("0x(%x+)") or "0", 16) or 0
  math.randomseed(os.time() + salt % 1000003)
  wrk.headers["Connection"] = "close"
  fast = wrk.format("GET", "/")
  slow = wrk.format("GET", "/work?ms=" .. ms)
end

function request()
  if math.random() < p then
    return slow
  end
  return fast
end

function done(summary, latency, requests)
  -- The tail in more detail than wrk's --latency gives (ms).
  io.write(string.format("mixed: p90 %.2f p95 %.2f p99 %.2f p99.9 %.2f ms\n",
    latency:percentile(90) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000, latency:percentile(99.9) / 1000))
end
