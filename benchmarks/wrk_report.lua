-- wrk script for the benchmark harness (benchmarks/loadgen.py).
--
-- Request shape from the environment:
--   WRK_METHOD      GET (default), POST, ...
--   WRK_BODY_BYTES  a body of this many bytes ("x" repeated), with Content-Type and length
-- At the end, done() prints one line: "WRK_JSON {...}" with the request count, duration,
-- the latency percentiles wrk's own report lacks (p99.9) in microseconds, and the errors
-- (connect/read/write/timeout: socket errors; status: answers that were not 2xx or 3xx).

local method = os.getenv("WRK_METHOD")
local body_bytes = tonumber(os.getenv("WRK_BODY_BYTES") or "0")

if method and method ~= "" then
   wrk.method = method
end
if body_bytes and body_bytes > 0 then
   wrk.body = string.rep("x", body_bytes)
   wrk.headers["Content-Type"] = "application/octet-stream"
end

local function num(x)
   if x == nil or x ~= x then
      return "null"
   end
   return string.format("%.1f", x)
end

function done(summary, latency, requests)
   local e = summary.errors
   local parts = {
      string.format('"requests": %d', summary.requests),
      string.format('"duration_s": %.3f', summary.duration / 1e6),
      string.format('"bytes": %d', summary.bytes),
      string.format('"latency_us": {"p50": %s, "p75": %s, "p90": %s, "p99": %s, '
                       .. '"p99.9": %s, "max": %s, "mean": %s}',
                    num(latency:percentile(50)), num(latency:percentile(75)),
                    num(latency:percentile(90)), num(latency:percentile(99)),
                    num(latency:percentile(99.9)), num(latency.max), num(latency.mean)),
      string.format('"errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d, '
                       .. '"status": %d}',
                    e.connect, e.read, e.write, e.timeout, e.status),
   }
   io.write("WRK_JSON {" .. table.concat(parts, ", ") .. "}\n")
end
