"""The lease rules (`bgpool/leases.py`, pure) and the lease operations on a real
Redis (`bgpool/coordinator/store.py`): take, renew, ready, release, the
fencing token, the quarantine after a Redis restart."""

from __future__ import annotations

import pytest
from helpers import wait_for
from redis_helpers import RedisServer

from bgpool import leases
from bgpool.coordinator.store import Store, Taken
from bgpool.leases import Keys

TTLS = [0.5, 1.0, 2.5, 10.0, 60.0, 3600.0]


@pytest.mark.parametrize("ttl", TTLS)
def test_a_lease_is_renewed_and_drained_before_it_can_expire(ttl: float) -> None:
    """Renewal, then retries, then the drain, then the kill, all before the
    earliest moment the key can expire in Redis (`sent + ttl`)."""
    sent = 1000.0
    until = leases.safe_deadline(sent, ttl)
    drain = leases.drain_at(until, ttl)
    renew = sent + leases.renew_period(ttl)
    assert sent < renew < drain < until < sent + ttl
    assert (drain - renew) / leases.retry_period(ttl) >= 3  # three retries before the drain
    assert sent + ttl - until == pytest.approx(ttl * leases.MARGIN)  # the margin
    assert leases.renew_period(ttl) + ttl <= ttl * 1.34  # takeover bound: ttl plus a period


def test_keys_share_a_hash_tag_and_quote_the_pool_name() -> None:
    keys = Keys.of("my{pool}:x", leases.key_of("api", "cron:a"))
    tag = "bgpool:{my%7Bpool%7D%3Ax}"
    assert keys == Keys(f"{tag}:lease:api:cron:a", f"{tag}:holder:api:cron:a",
                        f"{tag}:fence:api:cron:a", f"{tag}:epoch")  # fmt: skip
    assert Keys.of("p", leases.key_of("", "a")).lease == "bgpool:{p}:lease::a"


def _store(redis_server: RedisServer, pid: int) -> Store:
    return Store(redis_server.url, 2.0, f"host-{pid}", pid)


def test_take_renew_ready_release(redis_server: RedisServer) -> None:
    """One holder at a time; renew, ready and release only with its token;
    the holder's record says who it is and whether its worker is ready."""
    a, b = _store(redis_server, 1), _store(redis_server, 2)
    keys = Keys.of("p", ":cron")
    try:
        taken = a.take(keys, "token-a", 10.0)
        assert isinstance(taken, Taken)
        held = b.take(keys, "token-b", 10.0)
        assert isinstance(held, dict)
        assert held["host"] == "host-1" and held["pid"] == 1 and not held["ready"]
        assert held["lease_token"] == taken.fence
        assert not b.renew(keys, "token-b", 10.0) and a.renew(keys, "token-a", 10.0)
        b.mark_ready(keys, "token-b")
        assert b.take(keys, "token-b", 10.0) == held  # still not ready: b is not the holder
        a.mark_ready(keys, "token-a")
        ready = b.take(keys, "token-b", 10.0)
        assert isinstance(ready, dict) and ready["ready"]
        b.release(keys, "token-b")  # not its lease: nothing happens
        assert isinstance(b.take(keys, "token-b", 10.0), dict)
        a.release(keys, "token-a")
        # The fence of a first take is Redis's clock in us; its waits are in ms:
        # let Redis's clock pass the next millisecond, so a quarantine that began
        # again would show.
        with redis_server.client() as client:

            def redis_us() -> int:
                seconds, micros = client.time()
                return int(seconds) * 1_000_000 + int(micros)

            wait_for(lambda: redis_us() >= taken.fence + 2000, what="Redis's clock to move on")
        again = b.take(keys, "token-b", 10.0)
        assert isinstance(again, Taken) and again.fence > taken.fence
        assert again.wait < taken.wait  # the quarantine began with the first take
    finally:
        a.close()
        b.close()


def test_the_fencing_token_grows_even_when_redis_loses_its_data(
    redis_server: RedisServer,
) -> None:
    """A restart without persistence empties Redis; the next token is still
    larger than every one before (a plain counter would start from 1 again),
    and the first take on the new Redis process waits out a quarantine of
    one ttl (a holder from before may still run)."""
    keys = Keys.of("p", ":cron")
    store = _store(redis_server, 1)
    try:
        first = store.take(keys, "t1", 2.0)
        assert isinstance(first, Taken) and first.wait > 1.9  # a fresh Redis: quarantine
        store.release(keys, "t1")
        second = store.take(keys, "t2", 2.0)
        assert isinstance(second, Taken) and second.fence > first.fence
        assert second.wait <= first.wait  # the same quarantine, not a new one
        store.release(keys, "t2")
        redis_server.kill()
        redis_server.start()
        store.reset()
        third = store.take(keys, "t3", 2.0)
        assert isinstance(third, Taken) and third.fence > second.fence
        assert third.wait > 1.9  # a new Redis process: a new quarantine
    finally:
        store.close()
