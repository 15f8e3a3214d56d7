-- wrk client script for scripts/load.sh. This Lua runs inside wrk (the load generator), never
-- in the gateway. The request comes from the environment:
--   LOAD_METHOD  GET or POST (default GET)
--   LOAD_BODY    request body (optional)
--   LOAD_CTYPE   Content-Type (optional)
--   LOAD_KEY     API key sent as `Authorization: Bearer <key>` (optional)
-- At the end it prints one machine-readable line that load.sh parses:
--   LOAD requests=… duration_us=… p50_us=… p99_us=… non2xx=… socket_errors=…

wrk.method = os.getenv("LOAD_METHOD") or "GET"

local body = os.getenv("LOAD_BODY")
if body ~= nil and body ~= "" then
  wrk.body = body
end

local ctype = os.getenv("LOAD_CTYPE")
if ctype ~= nil and ctype ~= "" then
  wrk.headers["Content-Type"] = ctype
end

local key = os.getenv("LOAD_KEY")
if key ~= nil and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "LOAD requests=%d duration_us=%d p50_us=%.0f p99_us=%.0f non2xx=%d socket_errors=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
