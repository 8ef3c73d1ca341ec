-- wrk script of `make bench` (bench/tiles.py writes the URL list and parses the JSON line).
--
--   wrk -t T -c C -d Ds --latency -s bench/tiles.lua URL -- URLS_FILE MODE T
--
-- URLS_FILE: one request path per line (e.g. /storage/bench_files/17/3_4.jpeg), in the
--   order the tiles should be requested.
-- MODE "once": every path is requested at most once. Thread i (0-based, of T) takes the
--   i-th contiguous slice of the list and walks it in order (row-major, as a viewer would
--   request neighbouring tiles). A thread that runs out stops (wrk.thread:stop()); the
--   request it has to return then goes to /healthz and is counted as "exhausted", never as
--   a tile, so that no tile is requested twice in a cold run.
-- MODE "cycle": every thread cycles over the whole list, thread i starting at the start of
--   its slice (warm cache hits).
-- MODE "again": as "once", but a thread that reaches the end of its slice starts it again
--   (the overload flood: tiles refused with 503 are asked for again, the others are now
--   cache hits; no thread stops, so every connection stays open until wrk exits).
--
-- done() prints one line "BENCH_JSON {...}": requests, duration, wrk's error counters,
-- latency percentiles (microseconds), and per-thread counters gathered in response():
-- image responses and their body bytes, non-2xx statuses, X-Tile-Cache hit/miss counts.

local threads = {}
local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

-- per-thread state (each wrk thread has its own Lua state)
local reqs = {}
local n, lo, hi, pos = 0, 1, 0, 1
local mode = "once"
local spare = nil
issued, exhausted, tiles, bytes, non2xx, hits, misses = 0, 0, 0, 0, 0, 0, 0
formats = ""

function init(args)
   local file, nthreads = args[1], tonumber(args[3])
   mode = args[2]
   for line in io.lines(file) do
      if #line > 0 then
         n = n + 1
         reqs[n] = wrk.format("GET", line)
      end
   end
   lo = math.floor(n * id / nthreads) + 1
   hi = math.floor(n * (id + 1) / nthreads)
   pos = lo
   spare = wrk.format("GET", "/healthz")
end

function request()
   if mode == "once" then
      if pos > hi then
         exhausted = exhausted + 1
         wrk.thread:stop()
         return spare
      end
   elseif mode == "again" then
      if pos > hi then
         pos = lo
      end
   elseif pos > n then
      pos = 1
   end
   local r = reqs[pos]
   pos = pos + 1
   issued = issued + 1
   return r
end

local seen = {}

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
   local ctype = headers["Content-Type"] or headers["content-type"] or ""
   if string.sub(ctype, 1, 6) == "image/" then
      if status >= 200 and status <= 299 then
         tiles = tiles + 1
         bytes = bytes + #body
      end
      if not seen[ctype] then
         seen[ctype] = true
         formats = formats .. ctype .. " "
      end
   end
   local cache = headers["X-Tile-Cache"] or headers["x-tile-cache"]
   if cache == "hit" then
      hits = hits + 1
   elseif cache == "miss" then
      misses = misses + 1
   end
end

function done(summary, latency, requests)
   local names = {"issued", "exhausted", "tiles", "bytes", "non2xx", "hits", "misses"}
   local totals = {}
   local per_thread = {}
   local types = {}
   for _, name in ipairs(names) do totals[name] = 0 end
   for i, thread in ipairs(threads) do
      local row = {}
      for _, name in ipairs(names) do
         local v = thread:get(name) or 0
         totals[name] = totals[name] + v
         table.insert(row, string.format('"%s": %d', name, v))
      end
      for t in string.gmatch(thread:get("formats") or "", "%S+") do types[t] = true end
      table.insert(per_thread, "{" .. table.concat(row, ", ") .. "}")
   end
   local tlist = {}
   for t, _ in pairs(types) do table.insert(tlist, '"' .. t .. '"') end
   local e = summary.errors
   local out = {
      string.format('"requests": %d', summary.requests),
      string.format('"duration_us": %d', summary.duration),
      string.format('"bytes_total": %d', summary.bytes),
      string.format('"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, '
                    .. '"timeout": %d}', e.connect, e.read, e.write, e.status, e.timeout),
      string.format('"latency_us": {"min": %d, "mean": %.1f, "stdev": %.1f, "max": %d, '
                    .. '"p50": %d, "p90": %d, "p99": %d, "p999": %d}',
                    latency.min, latency.mean, latency.stdev, latency.max,
                    latency:percentile(50), latency:percentile(90),
                    latency:percentile(99), latency:percentile(99.9)),
      '"content_types": [' .. table.concat(tlist, ", ") .. ']',
      '"threads": [' .. table.concat(per_thread, ", ") .. ']',
   }
   for _, name in ipairs(names) do
      table.insert(out, string.format('"%s": %d', name, totals[name]))
   end
   io.write("BENCH_JSON {" .. table.concat(out, ", ") .. "}\n")
end
