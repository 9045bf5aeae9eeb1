-- wrk script for make bench: POST /v1/reports, every report with a report_id of its own.
-- wrk ... -s reports.lua URL -- PREFIX BATCH KEY
--   PREFIX: unique per run; BATCH: 0 = one report per request, N = {"reports": [N reports]}
local counter = 0
local threads = {}
local prefix, batch, key

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  prefix = args[1] or "w"
  batch = tonumber(args[2] or "0")
  key = args[3] or ""
  tid = tid or 0  -- set per thread by setup()
end

local function report()
  counter = counter + 1
  local n = counter
  return string.format(
    '{"kind":"drive","municipality":"746","report_id":"%s-%d-%d","version":1,' ..
    '"employee":{"cpr":"0101901234","employment_id":"%08d"},"drive_date":"2026-03-%02d",' ..
    '"distance_km":"%d.%02d","wage_code":"0201","approved_by_cpr":"0202802345",' ..
    '"license_plate":"AB12345"}',
    prefix, tid, n, 10000 + (n * 7 + tid) % 10000, 1 + n % 28, 1 + n % 400, n % 100)
end

function request()
  local body
  if batch > 0 then
    local parts = {}
    for i = 1, batch do parts[i] = report() end
    body = '{"reports":[' .. table.concat(parts, ",") .. ']}'
  else
    body = report()
  end
  return wrk.format("POST", nil,
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}, body)
end


function done(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"timeouts":%d,"non2xx":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, summary.errors.status,
    latency:percentile(50), latency:percentile(99)))
end
