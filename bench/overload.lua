-- wrk script of the overload scenario (bench/overload.py): bench/tiles.lua, plus each
-- connection honours a 503's Retry-After as a client would (a viewer, a proxy), instead of
-- asking again at once.
--
--   wrk -t T -c C -d Ds --latency -s bench/overload.lua URL -- URLS_FILE once T
--
-- wrk calls delay() after each response to time the connection's next request; response()
-- runs just before it for the same connection, so the wait it notes is that connection's.

local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "tiles.lua")

local tiles_response = response
local wait_ms = 0
retried = 0

function response(status, headers, body)
   if status == 503 then
      local after = headers["Retry-After"] or headers["retry-after"]
      wait_ms = 1000 * (tonumber(after) or 1)
      retried = retried + 1
   end
   tiles_response(status, headers, body)
end

function delay()
   local ms = wait_ms
   wait_ms = 0
   return ms
end
