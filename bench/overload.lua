-- wrk script of the overload scenario (bench/overload.py): bench/tiles.lua, plus each
-- connection honours a 503's Retry-After as a client would (a viewer, a proxy), instead of
-- asking again at once.
--
--   wrk -t T -c C -d Ds --latency -s bench/overload.lua URL -- URLS_FILE again T
--
-- wrk calls response() when a response is complete and delay() later, when that connection
-- can write its next request; other connections' responses may come in between, and the
-- script is not told which connection it is. So each response queues its wait (Retry-After
-- of a 503, else 0) and each delay() takes the oldest: every wait received is applied once,
-- to the connections in the order they become writable.

local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "tiles.lua")

local tiles_response = response
local waits, first, last = {}, 1, 0
retried = 0

function response(status, headers, body)
   local ms = 0
   if status == 503 then
      local after = headers["Retry-After"] or headers["retry-after"]
      ms = 1000 * (tonumber(after) or 1)
      retried = retried + 1
   end
   last = last + 1
   waits[last] = ms
   tiles_response(status, headers, body)
end

function delay()
   if first > last then
      return 0
   end
   local ms = waits[first]
   waits[first] = nil
   first = first + 1
   return ms
end
