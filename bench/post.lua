-- wrk script: POST the body in $BENCH_BODY (a file) with extra headers from $BENCH_HEADERS
-- ("Name: value" lines), and print the result as one JSON line starting with "WRKJSON".
-- With $BENCH_MARK_AFTER = N (short runs only: a response callback costs wrk its fast path), it
-- prints "WRKMARK" once N responses have come, so the runner can stop it as soon as it has some.
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
for name, value in string.gmatch(os.getenv("BENCH_HEADERS") or "", "([%w-]+): ([^\n]*)") do
  wrk.headers[name] = value
end

local mark = tonumber(os.getenv("BENCH_MARK_AFTER") or "")
if mark then
  local seen = 0
  function response()
    seen = seen + 1
    if seen == mark then
      io.write("WRKMARK\n")
      io.flush()
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"mean_us":%.1f,"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,' ..
    '"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.mean, e.connect, e.read, e.write,
    e.status, e.timeout))
end
