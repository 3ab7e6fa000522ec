"""Shared state in Redis for many workers and replicas: every operation is one Lua script, so it is
atomic across all the keys it touches. Keys share the hash tag `{sp}` (one cluster slot).

Time comes from the gateway's injected clock (the `now` argument), not from Redis, so the same
code runs in virtual time; replicas are expected to have NTP-synchronised clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from setpoint.errors import StateBackendError
from setpoint.state.base import BucketCharge, LedgerLine, ReserveResult, TakeResult
from setpoint.state.resp import RespClient, RespError

__all__ = ["RedisStateStore"]

_PREFIX = "{sp}:"

_TAKE = """
local now = tonumber(ARGV[1])
local n = #KEYS
local levels = {}
local wait = 0
for i = 1, n do
  local cap, rate, amt = tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i]), tonumber(ARGV[3*i+1])
  local st = redis.call('HMGET', KEYS[i], 'l', 't')
  local lvl, ts = tonumber(st[1]), tonumber(st[2])
  if lvl == nil then lvl = cap; ts = now end
  if now > ts then lvl = math.min(cap, lvl + (now - ts) * rate) end
  levels[i] = lvl
  if lvl < amt then
    local w = 1e9
    if rate > 0 then w = (amt - lvl) / rate end
    if w > wait then wait = w end
  end
end
local out = {}
if wait > 0 then
  for i = 1, n do out[i] = tostring(levels[i]) end
  return {0, tostring(wait), out}
end
for i = 1, n do
  local cap, rate, amt = tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i]), tonumber(ARGV[3*i+1])
  local lvl = levels[i] - amt
  local ts = tonumber(redis.call('HGET', KEYS[i], 't') or '')
  if ts == nil or now > ts then ts = now end  -- never move a bucket's clock backwards
  redis.call('HSET', KEYS[i], 'l', tostring(lvl), 't', tostring(ts))
  local ttl = 60
  if rate > 0 then ttl = math.ceil(cap / rate) * 2 + 60 end
  redis.call('EXPIRE', KEYS[i], ttl)
  out[i] = tostring(lvl)
end
return {1, '0', out}
"""

_ADJUST = """
local now = tonumber(ARGV[1])
for i = 1, #KEYS do
  local cap, rate, amt = tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i]), tonumber(ARGV[3*i+1])
  local st = redis.call('HMGET', KEYS[i], 'l', 't')
  local lvl, ts = tonumber(st[1]), tonumber(st[2])
  if lvl == nil then lvl = cap; ts = now end
  if now > ts then lvl = math.min(cap, lvl + (now - ts) * rate); ts = now end
  lvl = math.min(cap, lvl + amt)
  redis.call('HSET', KEYS[i], 'l', tostring(lvl), 't', tostring(ts))
  local ttl = 60
  if rate > 0 then ttl = math.ceil(cap / rate) * 2 + 60 end
  redis.call('EXPIRE', KEYS[i], ttl)
end
return 1
"""

# Ledger lines: KEYS come in threes per line: the line hash (field s = spent), its holds hash
# (hold id -> amount) and its holds' expiry zset (hold id -> expires_at).
# ARGV: now, hold id, amount, hold ttl, mode ('reserve' | 'extend' | 'check'), then per line: limit ('' = none), ttl.
_RESERVE = """
local now, hid, amt, httl, mode = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local n = #KEYS / 3
local rem = {}
local refused = ''
for i = 1, n do
  local L, H, X = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  local lim = ARGV[4 + 2*i]
  local le = tonumber(redis.call('HGET', L, 'e') or '')
  if le ~= nil and le <= now then redis.call('DEL', L, H, X) end
  local ex = redis.call('ZRANGEBYSCORE', X, '-inf', now)
  if #ex > 0 then
    redis.call('HDEL', H, unpack(ex))
    redis.call('ZREM', X, unpack(ex))
  end
  if lim == '' then
    rem[i] = ''
  else
    local held = 0
    for _, v in ipairs(redis.call('HVALS', H)) do held = held + tonumber(v) end
    local left = tonumber(lim) - tonumber(redis.call('HGET', L, 's') or '0') - held
    rem[i] = left
    if refused == '' and amt > left then refused = L end
  end
end
if refused ~= '' or mode == 'check' then
  for i = 1, n do rem[i] = tostring(rem[i]) end
  return {refused == '' and 1 or 0, refused, rem}
end
for i = 1, n do
  local L, H, X = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  local ttl = math.ceil(tonumber(ARGV[5 + 2*i]))
  if mode == 'extend' then redis.call('HINCRBY', H, hid, amt) else redis.call('HSET', H, hid, amt) end
  redis.call('ZADD', X, now + httl, hid)
  redis.call('HSETNX', L, 's', 0)
  redis.call('HSET', L, 'e', tostring(now + tonumber(ARGV[5 + 2*i])))
  redis.call('EXPIRE', L, ttl); redis.call('EXPIRE', H, ttl); redis.call('EXPIRE', X, ttl)
  if rem[i] ~= '' then rem[i] = rem[i] - amt end
  rem[i] = tostring(rem[i])
end
return {1, '', rem}
"""

_SETTLE = """
local hid, actual, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i = 1, #KEYS / 3 do
  local L, H, X = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  local ttl = math.ceil(tonumber(ARGV[3 + i]))
  local le = tonumber(redis.call('HGET', L, 'e') or '')
  if le ~= nil and le <= now then redis.call('DEL', L, H, X) end
  redis.call('HSET', L, 'e', tostring(now + tonumber(ARGV[3 + i])))
  redis.call('HDEL', H, hid)
  redis.call('ZREM', X, hid)
  out[i] = redis.call('HINCRBY', L, 's', actual)
  redis.call('EXPIRE', L, ttl); redis.call('EXPIRE', H, ttl); redis.call('EXPIRE', X, ttl)
end
return out
"""

_SPENT = """
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local st = redis.call('HMGET', KEYS[i], 's', 'e')
  local e = tonumber(st[2])
  if e ~= nil and e <= now then out[i] = 0 else out[i] = tonumber(st[1] or '0') end
end
return out
"""


def _bucket_args(charges: Sequence[BucketCharge], now: float) -> tuple[list[str], list[Any]]:
    keys = [_PREFIX + "b:" + c.key for c in charges]
    args: list[Any] = [repr(now)]
    for c in charges:
        args += [repr(c.capacity), repr(c.rate_per_s), repr(c.amount)]
    return keys, args


def _line_keys(lines: Sequence[LedgerLine]) -> list[str]:
    keys = []
    for ln in lines:
        base = _PREFIX + "l:" + ln.key
        keys += [base, base + ":h", base + ":x"]
    return keys


def _remaining(raw: Sequence[bytes | str]) -> list[int | None]:
    out: list[int | None] = []
    for v in raw:
        s = v.decode() if isinstance(v, bytes) else str(v)
        out.append(None if s == "" else int(float(s)))
    return out


class RedisStateStore:
    name = "redis"

    def __init__(self, url: str, *, timeout_s: float = 0.5, max_connections: int = 256) -> None:
        self.url = url
        # Past `max_connections` operations wait for a connection (within timeout_s) instead of failing.
        self._client = RespClient(url, timeout_s=timeout_s, max_connections=max_connections)

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._client.eval_script(script, keys, args)
        except RespError as exc:
            raise StateBackendError(f"redis state store unavailable: {exc}") from exc

    async def take(self, charges: Sequence[BucketCharge], now: float) -> TakeResult:
        keys, args = _bucket_args(charges, now)
        ok, wait, levels = await self._call(_TAKE, keys, args)
        return TakeResult(ok=bool(ok), retry_after_s=float(wait), levels=[float(x) for x in levels])

    async def adjust(self, charges: Sequence[BucketCharge], now: float) -> None:
        keys, args = _bucket_args(charges, now)
        await self._call(_ADJUST, keys, args)

    async def _ledger(
        self, mode: str, lines: Sequence[LedgerLine], hold_id: str, amount: int, now: float, hold_ttl_s: float
    ) -> ReserveResult:
        args: list[Any] = [repr(now), hold_id, int(amount), repr(hold_ttl_s), mode]
        for ln in lines:
            args += ["" if ln.limit is None else int(ln.limit), repr(ln.ttl_s)]
        ok, refused, rem = await self._call(_RESERVE, _line_keys(lines), args)
        refused_s = refused.decode() if isinstance(refused, bytes) else refused
        return ReserveResult(
            ok=bool(ok),
            refused_key=refused_s[len(_PREFIX) + 2 :] if refused_s else None,
            remaining=_remaining(rem),
        )

    async def reserve(
        self, lines: Sequence[LedgerLine], hold_id: str, amount: int, now: float, hold_ttl_s: float
    ) -> ReserveResult:
        return await self._ledger("reserve", lines, hold_id, amount, now, hold_ttl_s)

    async def extend(
        self, lines: Sequence[LedgerLine], hold_id: str, amount: int, now: float, hold_ttl_s: float
    ) -> ReserveResult:
        return await self._ledger("extend", lines, hold_id, amount, now, hold_ttl_s)

    async def settle(self, lines: Sequence[LedgerLine], hold_id: str, actual: int, now: float) -> None:
        args: list[Any] = [hold_id, int(actual), repr(now)] + [repr(ln.ttl_s) for ln in lines]
        await self._call(_SETTLE, _line_keys(lines), args)

    async def remaining(self, lines: Sequence[LedgerLine], now: float) -> list[int | None]:
        return (await self._ledger("check", lines, "", 0, now, 0.0)).remaining

    async def spent(self, lines: Sequence[LedgerLine], now: float) -> list[int]:
        keys = [_PREFIX + "l:" + ln.key for ln in lines]
        return [int(x) for x in await self._call(_SPENT, keys, [repr(now)])]

    async def cache_get(self, key: str, now: float) -> bytes | None:
        try:
            value = await self._client.execute("GET", _PREFIX + "c:" + key)
        except RespError as exc:
            raise StateBackendError(f"redis state store unavailable: {exc}") from exc
        if not isinstance(value, bytes):
            return None
        expires, _, payload = value.partition(b"\n")
        return payload if float(expires) > now else None

    async def cache_put(self, key: str, value: bytes, ttl_s: float, now: float) -> None:
        # The expiry travels with the value and is checked against the injected clock (virtual time
        # works); Redis's own TTL only collects the garbage.
        try:
            await self._client.execute(
                "SET", _PREFIX + "c:" + key, repr(now + ttl_s).encode() + b"\n" + value, "PX", max(1, int(ttl_s * 1000))
            )
        except RespError as exc:
            raise StateBackendError(f"redis state store unavailable: {exc}") from exc
