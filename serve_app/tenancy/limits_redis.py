"""Rate windows and concurrency slots in Redis, for ingress replicas on several nodes.

One Lua script checks every need and the concurrency slot, then takes them all: Redis runs a
script atomically, so this is check-and-increment with no gap. Windows come from Redis' own clock
(`TIME`), so replicas with skewed clocks still share one window. Concurrency is a sorted set of
leases scored by expiry (Redis' clock): the holder renews its leases while the request runs
(`renew`), so a slot held by a crashed replica frees itself about lease_ttl_s after its last renewal.
"""

from __future__ import annotations

import uuid

import redis

from serve_app.tenancy.limits import Grant, Need, Rejected

_ACQUIRE = """
local prefix, window, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec + tonumber(t[2]) / 1000000
local ws = sec - (sec % window)
local used = {}
for i = 1, n do
  local b = 3 + (i - 1) * 3
  local key = prefix .. ':' .. ARGV[b + 1] .. ':' .. ws
  local amt, lim = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local cur = tonumber(redis.call('GET', key) or '0')
  if cur + amt > lim then return {0, i, cur, ws, tostring(now)} end
  used[i] = cur + amt
end
local c = 3 + n * 3
local conc, lease, ttl = tonumber(ARGV[c + 1]), ARGV[c + 2], tonumber(ARGV[c + 3])
if conc >= 0 then
  local ck = prefix .. ':inflight'
  redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
  if redis.call('ZCARD', ck) >= conc then return {0, -1, conc, ws, tostring(now)} end
  redis.call('ZADD', ck, now + ttl, lease)
  redis.call('EXPIRE', ck, ttl * 2)
end
for i = 1, n do
  local b = 3 + (i - 1) * 3
  local key = prefix .. ':' .. ARGV[b + 1] .. ':' .. ws
  redis.call('INCRBY', key, ARGV[b + 2])
  redis.call('EXPIRE', key, window * 2)
end
local out = {1, 0, 0, ws, tostring(now)}
for i = 1, n do out[5 + i] = used[i] end
return out
"""

_RELEASE = """
local prefix, lease, ws, ttl, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
if lease ~= '' then redis.call('ZREM', prefix .. ':inflight', lease) end
for i = 1, n do
  local key = prefix .. ':' .. ARGV[5 + (i - 1) * 2 + 1] .. ':' .. ws
  local delta = tonumber(ARGV[5 + (i - 1) * 2 + 2])
  if delta > 0 or redis.call('EXISTS', key) == 1 then
    local v = redis.call('INCRBY', key, delta)
    if v < 0 then redis.call('SET', key, 0) end
    redis.call('EXPIRE', key, ttl)
  end
end
return 1
"""

_RENEW = """
local ck, ttl = ARGV[1] .. ':inflight', tonumber(ARGV[2])
local t = redis.call('TIME')
local expiry = tonumber(t[1]) + tonumber(t[2]) / 1000000 + ttl
for i = 3, #ARGV do redis.call('ZADD', ck, 'XX', expiry, ARGV[i]) end
if redis.call('EXISTS', ck) == 1 then redis.call('EXPIRE', ck, ttl * 2) end
return 1
"""


class RedisLimiter:
    def __init__(self, url: str, *, window_s: int, lease_ttl_s: int, namespace: str = "genserve:rl") -> None:
        self.client = redis.Redis.from_url(url)
        self.window_s, self.lease_ttl_s, self.namespace = window_s, lease_ttl_s, namespace
        self._acquire = self.client.register_script(_ACQUIRE)
        self._release = self.client.register_script(_RELEASE)
        self._renew = self.client.register_script(_RENEW)

    def _prefix(self, tenant_id: int) -> str:
        return f"{self.namespace}:{{{tenant_id}}}"  # {..}: a Redis Cluster hash tag per tenant

    def acquire(self, tenant_id: int, needs: list[Need], concurrency: int | None) -> Grant:
        for need in needs:
            if need.amount > need.limit:
                raise Rejected(need.kind, need.limit, 0, self.window_s, too_large=True)
        lease = uuid.uuid4().hex if concurrency is not None else ""
        args: list[str | int | float] = [self._prefix(tenant_id), self.window_s, len(needs)]
        for need in needs:
            args += [need.kind, need.amount, need.limit]
        args += [-1 if concurrency is None else concurrency, lease, self.lease_ttl_s]
        res = self._acquire(args=args)
        ok, which, used, ws, now = int(res[0]), int(res[1]), int(res[2]), int(res[3]), float(res[4])
        if not ok:
            if which == -1:
                raise Rejected("concurrency", int(concurrency or 0), used, 1.0)
            need = needs[which - 1]
            raise Rejected(need.kind, need.limit, used, ws + self.window_s - now)
        grant = Grant(window_start=ws, window_s=self.window_s, lease_id=lease or None)
        for need, after in zip(needs, res[5:], strict=True):
            grant.used[need.kind] = (need.limit, int(after))
            grant.taken[need.kind] = need.amount
        return grant

    def release(self, tenant_id: int, grant: Grant, adjust: dict[str, int]) -> None:
        pairs = [(k, d) for k, d in adjust.items() if d != 0]
        args: list[str | int | float] = [self._prefix(tenant_id), grant.lease_id or "", grant.window_start,
                              self.window_s * 2, len(pairs)]
        for kind, delta in pairs:
            args += [kind, delta]
        self._release(args=args)

    def renew(self, leases: dict[int, list[str]]) -> None:
        """Extend running requests' leases ({tenant id: lease ids}); XX: a released one stays gone."""
        for tenant_id, ids in leases.items():
            for i in range(0, len(ids), 500):
                self._renew(args=[self._prefix(tenant_id), self.lease_ttl_s, *ids[i:i + 500]])

    def refund(self, tenant_id: int, grant: Grant) -> None:
        """Undo an acquire whose request was refused later (by the budget)."""
        self.release(tenant_id, grant, {k: -n for k, n in grant.taken.items()})

    def close(self) -> None:
        self.client.close()
