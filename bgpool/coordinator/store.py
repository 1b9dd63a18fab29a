"""The lease operations on Redis, each one Lua script (atomic in Redis): take,
renew, mark ready, release. Runs in the coordinator process; the only module
that imports redis-py.

- take: `SET lease token NX PX ttl`, and in the same step the fencing token and
  the holder's record. The fencing token is the last one plus one (`INCR`'s
  rule), but never less than Redis's clock in microseconds, so that it still
  increases after Redis restarted without its data (a plain counter would
  start again from 1 and hand a new holder a token a stale one already had).
- after a restart of Redis: a holder from before may still be running while
  the keys are gone (no persistence) or old (a snapshot). The epoch key records
  which Redis process (`run_id`) the pool's leases are taken on; the first take
  on a new one starts a quarantine of one `ttl`, and every take until it ends
  waits it out before its worker starts: by then every holder from before has
  passed its safe deadline (each renewed at the latest just before the old
  Redis went away).
- renew, ready, release: only if the lease still holds our token (compare and
  pexpire, compare and hset, compare and del).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..leases import Keys

_TAKE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGETALL', KEYS[2])}
end
local ttl = tonumber(ARGV[2])
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ends = nil
local epoch = redis.call('GET', KEYS[4])
if epoch then
  local sep = string.find(epoch, ':', 1, true)
  if sep and string.sub(epoch, 1, sep - 1) == run_id then
    ends = tonumber(string.sub(epoch, sep + 1))
  end
end
if not ends then
  ends = now_ms + ttl
  redis.call('SET', KEYS[4], run_id .. ':' .. string.format('%d', ends))
end
local fence = math.max(tonumber(redis.call('GET', KEYS[3]) or '0') + 1, now_us)
redis.call('SET', KEYS[3], string.format('%d', fence))
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'host', ARGV[3], 'pid', ARGV[4], 'fence', string.format('%d', fence),
           'since', string.format('%d.%06d', t[1], t[2]), 'ready', '0')
redis.call('PEXPIRE', KEYS[2], ttl)
return {1, fence, math.max(0, ends - now_ms)}
"""

_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

_READY = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'ready', '1')
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

Errors = (redis.RedisError, OSError)
"""What a lease operation raises when Redis cannot be reached or answer."""


@dataclass(frozen=True)
class Taken:
    """A lease just taken: its fencing token, and the seconds its worker must
    wait before it starts (a quarantine after Redis restarted; else 0)."""

    fence: int
    wait: float


def holder_record(flat: list[Any]) -> dict[str, Any] | None:
    """The holder's hash (HGETALL's flat list) as the supervisor reports it."""
    record = {
        (k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes)
                                                           else str(v))
        for k, v in zip(flat[0::2], flat[1::2], strict=True)
    }  # fmt: skip
    try:
        return {
            "host": record["host"],
            "pid": int(record["pid"]),
            "since": float(record["since"]),
            "lease_token": int(record["fence"]),
            "ready": record["ready"] == "1",
        }
    except (KeyError, ValueError):
        return None  # gone between the two reads, or not ours


class Store:
    """One connection to the coordinator, used by one thread: every command of
    a take goes to the same Redis process, and nothing is retried behind our
    back (a retried command could reach another Redis process)."""

    def __init__(self, url: str, timeout: float, host: str, pid: int) -> None:
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            single_connection_client=True,
            retry=Retry(NoBackoff(), 0),
        )
        self._host = host
        self._pid = pid
        self._take = self._redis.register_script(_TAKE)
        self._renew = self._redis.register_script(_RENEW)
        self._ready = self._redis.register_script(_READY)
        self._release = self._redis.register_script(_RELEASE)

    def take(self, keys: Keys, token: str, ttl: float) -> Taken | dict[str, Any] | None:
        """Take the lease: `Taken`, or the holder's record if another holds it
        (None if it holds it and its record cannot be read)."""
        found = self._take(
            keys=[keys.lease, keys.holder, keys.fence, keys.epoch],
            args=[token, int(ttl * 1000), self._host, self._pid],
        )
        if found[0] == 1:
            return Taken(int(found[1]), int(found[2]) / 1000)
        return holder_record(found[1])

    def renew(self, keys: Keys, token: str, ttl: float) -> bool:
        """Extend the lease if it still holds `token`; whether it did."""
        return bool(self._renew(keys=[keys.lease, keys.holder], args=[token, int(ttl * 1000)]))

    def mark_ready(self, keys: Keys, token: str) -> None:
        """Record that the holder's worker is ready (for `ensure()` elsewhere)."""
        self._ready(keys=[keys.lease, keys.holder], args=[token])

    def release(self, keys: Keys, token: str) -> None:
        """Give the lease up (its worker has exited), if it still holds `token`."""
        self._release(keys=[keys.lease, keys.holder], args=[token])

    def close(self) -> None:
        """Close the connection."""
        self._redis.close()

    def reset(self) -> None:
        """Drop the connection after an error: the next command connects anew."""
        self._redis.connection_pool.disconnect()
