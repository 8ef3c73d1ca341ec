"""The Redis coordination store: replicas on several machines share one Redis.

Keys (``{prefix}`` is ``Coordination.KeyPrefix``)::

    {prefix}:job:{id}          the job record (JSON)
    {prefix}:jobs              sorted set of job ids by creation time
    {prefix}:slide:{name}      the id of the active job that holds a slide
    {prefix}:generation        the invalidation generation (INCR)
    {prefix}:invalidations     list of the last invalidations, JSON [generation, slide or ""]

Every rule is one Lua script, which Redis runs atomically: the conflict check and the insert of a
job, a claim (with the lease measured by Redis's own clock, so replicas' clocks do not matter), an
update by the owner, cancellation, the release of slides. The scripts touch keys they compute
from the prefix, so this store is for a single Redis server (or a primary with replicas), not a
Redis Cluster. Talks to Redis with the ``redis`` package's asyncio client.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis

from app.coordination import (
    KEEP_FINISHED,
    KEEP_INVALIDATIONS,
    LEASE_SECONDS,
    MAX_ATTEMPTS,
    ConflictingJob,
    Coordination,
    abandoned,
)

_COMMON = """
local prefix = ARGV[1]
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function load(id)
  local raw = redis.call('GET', prefix .. ':job:' .. id)
  if not raw then return nil end
  return cjson.decode(raw)
end
local function store(job)
  job.version = job.version + 1
  local raw = cjson.encode(job)
  redis.call('SET', prefix .. ':job:' .. job.id, raw)
  return raw
end
local function release(job)
  for _, slide in ipairs(job.slides) do
    local key = prefix .. ':slide:' .. slide
    if redis.call('GET', key) == job.id then redis.call('DEL', key) end
  end
end
local function unowned(job)
  job.owner = cjson.null
  job.lease = cjson.null
end
"""

_SUBMIT = _COMMON + """
local job = cjson.decode(ARGV[2])
for _, slide in ipairs(job.slides) do
  local holder = redis.call('GET', prefix .. ':slide:' .. slide)
  if holder then
    local other = load(holder)
    if other and (other.state == 'queued' or other.state == 'running') then
      return cjson.encode({holder, slide})
    end
  end
end
for _, slide in ipairs(job.slides) do
  redis.call('SET', prefix .. ':slide:' .. slide, job.id)
end
redis.call('SET', prefix .. ':job:' .. job.id, ARGV[2])
redis.call('ZADD', prefix .. ':jobs', job.created_at, job.id)
return false
"""

_CLAIM = _COMMON + """
local owner, lease, max_attempts = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local t = now()
for _, id in ipairs(redis.call('ZRANGE', prefix .. ':jobs', 0, -1)) do
  local job = load(id)
  if job and (job.state == 'queued'
              or (job.state == 'running' and job.lease ~= cjson.null and job.lease < t)) then
    if job.cancel or job.attempts >= max_attempts then
      if job.cancel then
        job.state = 'cancelled'
      else
        local failed = cjson.decode(ARGV[5])
        job.state, job.error, job.error_code = failed.state, failed.error, failed.error_code
      end
      job.finished_at = t
      unowned(job)
      release(job)
      store(job)
      return false
    end
    job.state, job.owner, job.lease = 'running', owner, t + lease
    job.attempts = job.attempts + 1
    if job.started_at == cjson.null then job.started_at = t end
    return store(job)
  end
end
return false
"""

_UPDATE = _COMMON + """
local job = load(ARGV[2])
if not job or job.state ~= 'running' or job.owner ~= ARGV[3] then return false end
for key, value in pairs(cjson.decode(ARGV[4])) do job[key] = value end
job.lease = now() + tonumber(ARGV[5])
return store(job)
"""

_FINISH = _COMMON + """
local job = load(ARGV[2])
if not job then return false end
if ARGV[3] ~= '' and (job.state ~= 'running' or job.owner ~= ARGV[3]) then return false end
for key, value in pairs(cjson.decode(ARGV[4])) do job[key] = value end
unowned(job)
release(job)
store(job)
local kept = 0
local ids = redis.call('ZREVRANGE', prefix .. ':jobs', 0, -1)
for _, id in ipairs(ids) do
  local other = load(id)
  if not other then
    redis.call('ZREM', prefix .. ':jobs', id)
  elseif other.state ~= 'queued' and other.state ~= 'running' then
    kept = kept + 1
    if kept > tonumber(ARGV[5]) then
      redis.call('DEL', prefix .. ':job:' .. id)
      redis.call('ZREM', prefix .. ':jobs', id)
    end
  end
end
return false
"""

_RELEASE = _COMMON + """
local job = load(ARGV[2])
if job and job.state == 'running' and job.owner == ARGV[3] then
  job.state = 'queued'
  unowned(job)
  store(job)
end
return false
"""

_CANCEL = _COMMON + """
local job = load(ARGV[2])
if not job then return false end
if job.state == 'queued' then
  job.state, job.cancel, job.finished_at = 'cancelled', true, now()
  release(job)
  return store(job)
elseif job.state == 'running' then
  job.cancel = true
  return store(job)
end
return cjson.encode(job)
"""

_INVALIDATE = """
local generation = redis.call('INCR', ARGV[1] .. ':generation')
redis.call('RPUSH', ARGV[1] .. ':invalidations', cjson.encode({generation, ARGV[2]}))
redis.call('LTRIM', ARGV[1] .. ':invalidations', -tonumber(ARGV[3]), -1)
return generation
"""


class RedisCoordination(Coordination):
    """:class:`~app.coordination.Coordination` in Redis (see the module docstring).

    Args:
        url: ``redis://[:password@]host:port/db`` (``rediss://`` for TLS).
        prefix: ``Coordination.KeyPrefix``.
    """

    kind = "redis"

    def __init__(self, url: str, prefix: str):
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        self.where = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        self.url = url
        self.prefix = prefix
        self._client: aioredis.Redis | None = None

    @property
    def client(self) -> aioredis.Redis:
        """The connected client.

        Raises:
            ConnectionError: not open.
        """
        if self._client is None:
            raise ConnectionError("the coordination store is closed")
        return self._client

    async def open(self) -> None:
        """Connect and check the server answers (raises ``redis.RedisError``)."""
        self._client = aioredis.from_url(self.url, decode_responses=True,
                                         socket_timeout=5, socket_connect_timeout=5,
                                         health_check_interval=30)
        await self.ping()

    async def close(self) -> None:
        """Disconnect."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def ping(self) -> None:
        """PING (raises ``redis.RedisError`` when unreachable)."""
        await self.client.ping()

    async def _script(self, script: str, *args: Any) -> Any:
        # EVAL keeps the code in one place; Redis caches compiled scripts by their SHA-1
        return await self.client.eval(script, 0, self.prefix, *args)

    # ------------------------------------------------------------------ jobs

    async def submit(self, job: dict[str, Any]) -> None:
        """Store a queued job unless a slide is taken (:class:`ConflictingJob`)."""
        conflict = await self._script(_SUBMIT, json.dumps(job))
        if conflict:
            holder, slide = json.loads(conflict)
            raise ConflictingJob(holder, slide)

    async def get(self, job_id: str) -> dict[str, Any] | None:
        """The job record, or None."""
        return _decode(await self.client.get(f"{self.prefix}:job:{job_id}"))

    async def jobs(self) -> list[dict[str, Any]]:
        """Every kept job, newest first."""
        ids = await self.client.zrevrange(f"{self.prefix}:jobs", 0, -1)
        if not ids:
            return []
        raws = await self.client.mget([f"{self.prefix}:job:{i!s}" for i in ids])
        return [job for job in map(_decode, raws) if job is not None]

    async def claim(self, owner: str) -> dict[str, Any] | None:
        """Take the oldest queued job, or a running one whose lease ran out."""
        failed = {k: v for k, v in abandoned(MAX_ATTEMPTS).items()
                  if k in ("state", "error", "error_code")}
        return _decode(await self._script(_CLAIM, owner, LEASE_SECONDS, MAX_ATTEMPTS,
                                          json.dumps(failed)))

    async def update(self, job_id: str, owner: str,
                     changes: dict[str, Any]) -> dict[str, Any] | None:
        """Merge changes into a job ``owner`` holds; renew the lease."""
        return _decode(await self._script(_UPDATE, job_id, owner, json.dumps(changes),
                                          LEASE_SECONDS))

    async def finish(self, job_id: str, owner: str | None, changes: dict[str, Any]) -> None:
        """Finish a job, release its slides, drop old finished jobs."""
        await self._script(_FINISH, job_id, owner or "", json.dumps(changes), KEEP_FINISHED)

    async def release(self, job_id: str, owner: str) -> None:
        """Give a running job back to the queue."""
        await self._script(_RELEASE, job_id, owner)

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a queued job at once; flag a running one."""
        return _decode(await self._script(_CANCEL, job_id))

    # ------------------------------------------------------------------ invalidation

    async def invalidate(self, slide: str | None) -> int:
        """Append to the invalidation log; returns the new generation."""
        generation: int = await self._script(_INVALIDATE, slide or "", KEEP_INVALIDATIONS)
        return generation

    async def invalidations(self, since: int) -> tuple[int, list[str | None]]:
        """The current generation and what was invalidated after ``since``."""
        raw = await self.client.get(f"{self.prefix}:generation")
        generation = int(raw or 0)
        if generation <= since:
            return generation, []
        if since < generation - KEEP_INVALIDATIONS:
            return generation, [None]
        entries = await self.client.lrange(f"{self.prefix}:invalidations",
                                           -(generation - since), -1)
        slides: list[str | None] = []
        for entry in entries:
            number, slide = json.loads(entry)
            if number > since:
                slides.append(slide or None)
        return generation, slides


def _decode(raw: str | bytes | None) -> dict[str, Any] | None:
    """A record from the client's answer (text: ``decode_responses``)."""
    if not raw:
        return None
    job: dict[str, Any] = json.loads(raw)
    return job
