"""The rules of a singleton's lease, shared by the supervisor and its coordinator
process: when it is renewed, how long it is safe to hold, when its worker must
be drained and killed, and what the Redis keys are called. Pure: no I/O.

Every deadline is an absolute time on CLOCK_BOOTTIME (`platform.boottime()`),
which every process of one host reads alike and which counts the time a
suspended machine slept, as the lease's expiry in Redis does. A deadline is
derived from the moment the command that took or renewed the lease was *sent*:
Redis starts the key's time to live when it runs the command, which is later,
so the lease in Redis lives at least until `sent + ttl` (by Redis's clock).

    sent ─── renew ──▶ (every ttl/3; retried every ttl/10 after a failure)
    │                  drain_at = until - ttl/5: the worker's stop pipe closes
    │                  until = sent + ttl - ttl/10: SIGKILL (supervisor, and the
    │                          worker's own kernel timer); never renewed past it
    └──────────────────────────────────────────▶ sent + ttl: the earliest the
                                                 key can expire in Redis

The tenth of the lease kept back (`MARGIN`) absorbs what separates the two
clocks: the rate difference of the host's clock and Redis's (NTP keeps it
under 0.05%), and the delay between the deadline and the kill taking effect.
It does not absorb a step of Redis's wall clock: Redis expires keys by its
wall clock, so a clock set forward on the Redis host shortens every lease
(README, "What a lease does and does not guarantee").
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

RENEW = 1 / 3
"""A held lease is renewed at this fraction of its time to live."""

RETRY = 1 / 10
"""After a failed renewal (Redis unreachable), retried at this fraction."""

MARGIN = 1 / 10
"""The fraction of the lease kept back from its safe deadline (see above)."""

DRAIN = 1 / 5
"""The fraction of the lease before the safe deadline at which an unrenewed
holder's worker is drained: its stop pipe closes, SIGTERM halfway, SIGKILL at
the deadline."""


def renew_period(ttl: float) -> float:
    """Seconds between two renewals of a held lease (and two tries to take one)."""
    return ttl * RENEW


def retry_period(ttl: float) -> float:
    """Seconds before a failed renewal is tried again."""
    return ttl * RETRY


def safe_deadline(sent: float, ttl: float) -> float:
    """Until when a lease taken or renewed by a command sent at `sent` is held
    for sure: the worker must be dead by then."""
    return sent + ttl * (1 - MARGIN)


def drain_at(until: float, ttl: float) -> float:
    """When the worker of a lease safe until `until` is drained if it was not
    renewed by then."""
    return until - ttl * DRAIN


@dataclass(frozen=True)
class Keys:
    """The Redis keys of one singleton of one pool. They share a hash tag (the
    pool's name in braces), so a Redis Cluster keeps them in one slot and the
    scripts may touch them together."""

    lease: str  # the random token of the holder, with the lease's time to live
    holder: str  # a hash: host, pid, since, fence, ready (the same time to live)
    fence: str  # the last fencing token handed out (no time to live)
    epoch: str  # which Redis process (run_id) the pool's leases were first taken on

    @classmethod
    def of(cls, pool: str, key: str) -> Keys:
        """The keys of singleton `key` (`label:name`) of pool `pool`."""
        base = f"bgpool:{{{quote(pool, safe='')}}}"
        return cls(f"{base}:lease:{key}", f"{base}:holder:{key}", f"{base}:fence:{key}",
                   f"{base}:epoch")  # fmt: skip


def key_of(scope_label: str, name: str) -> str:
    """How a singleton is named between the supervisor, its coordinator and
    Redis: `label:name` (a scope label has no `:`), the same on every host."""
    return f"{scope_label}:{name}"
