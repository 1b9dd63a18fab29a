"""The restart policy's pure functions, exhaustively."""

from __future__ import annotations

import pytest

from bgpool.supervisor import policy


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(0, 0.0), (1, 0.0), (2, 0.1), (3, 0.4), (4, 0.9), (5, 1.0), (6, 1.0), (100, 1.0)],
)
def test_backoff_is_quadratic_capped_at_one_second(failures: int, delay: float) -> None:
    assert policy.backoff_delay(failures) == pytest.approx(delay)


def test_backoff_never_decreases_and_never_exceeds_the_cap() -> None:
    delays = [policy.backoff_delay(k) for k in range(1, 50)]
    assert delays == sorted(delays)
    assert max(delays) == policy.MAX_BACKOFF


@pytest.mark.parametrize(
    ("failures", "ever_ready", "cap", "abort"),
    [
        (5, False, 6, False),
        (6, False, 6, True),
        (7, False, 6, True),
        (6, True, 6, False),  # a worker that was ever ready is never aborted
        (1000, False, -1, False),  # -1 never gives up
        (1, False, 1, True),
    ],
)
def test_should_abort(failures: int, ever_ready: bool, cap: int, abort: bool) -> None:
    assert policy.should_abort(failures, ever_ready, cap) is abort


def test_count_failures_increments_on_failure_and_keeps_on_clean_exit() -> None:
    assert policy.count_failures(2, failed=True, run_seconds=0.5) == 3
    assert policy.count_failures(2, failed=False, run_seconds=0.5) == 2


def test_a_long_run_resets_the_failure_count() -> None:
    assert policy.count_failures(5, failed=True, run_seconds=policy.STABLE_RUN) == 1
    assert policy.count_failures(5, failed=False, run_seconds=policy.STABLE_RUN + 1) == 0


def test_failed_exit_backs_off_by_failure_count() -> None:
    assert policy.restart_delay(failed=True, failures=1, since_last_start=0.0) == 0.0
    assert policy.restart_delay(failed=True, failures=3, since_last_start=0.0) == pytest.approx(0.4)


def test_clean_exits_are_paced_to_ten_starts_a_second() -> None:
    assert policy.restart_delay(failed=False, failures=0, since_last_start=0.02) == pytest.approx(
        0.08
    )
    assert policy.restart_delay(failed=False, failures=0, since_last_start=5.0) == 0.0
