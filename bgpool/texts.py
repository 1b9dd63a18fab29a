"""The sentences bgpool says to its users: every error text of the public
contract, each produced here and nowhere else. Pure formatting.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SHUTTING_DOWN = "pool is shutting down"
"""`PoolClosed`'s message while the pool drains."""

CLOSED = "pool is closed"
"""`PoolClosed`'s message once the pool (or its supervisor) is gone."""


def clip(text: str, limit: int) -> str:
    """`text` cut to about `limit` characters, saying how much was left out, so
    no message, log line or diagnostic field can grow without bound."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters]"


def signal_name(status: int | None) -> str | None:
    """`"SIGKILL"` for an exit status of -9; None for a normal exit."""
    if status is None or status >= 0:
        return None
    try:
        return signal.Signals(-status).name
    except ValueError:
        return f"signal {-status}"


def exit_words(status: int | None) -> str:
    """`exit status 1`, or `killed by SIGKILL` for a death by signal."""
    if status is None:
        return "did not start"
    name = signal_name(status)
    return f"killed by {name}" if name else f"exit status {status}"


def _display_path(path: str) -> str:
    """A path relative to the current directory when it lies below it."""
    relative = os.path.relpath(path) if os.path.isabs(path) else path
    return path if relative.startswith("..") else relative


def error_words(error: dict[str, Any] | None) -> str:
    """`RuntimeError: boom (myapp/x.py, line 12)`, or "" without an error."""
    if not error:
        return ""
    text = f"{error['type']}: {error['message']}" if error["message"] else str(error["type"])
    if error.get("filename"):
        line = f", line {error['lineno']}" if error.get("lineno") is not None else ""
        text += f" ({_display_path(error['filename'])}{line})"
    return text


@dataclass(frozen=True)
class Failure:
    """One failed run of a worker: enough to explain it in one sentence."""

    attempt: int
    status: int | None
    target: str
    error: dict[str, Any] | None
    output: tuple[str, ...] = ()

    def cause(self) -> str:
        """`exit status 1, target myapp/x.py): RuntimeError: boom (...)`, the tail
        shared by every failure sentence."""
        words = error_words(self.error)
        return f"{exit_words(self.status)}, target {self.target})" + (f": {words}" if words else "")


def seconds(value: float) -> str:
    """`5s`, `0.5s`: a duration as users wrote it."""
    return f"{value:g}s"


def not_ready(name: str, timeout: float, failure: Failure | None, missing: str) -> str:
    """EnsureTimeout's message for one worker."""
    if failure is None:
        return f'background worker "{name}" did not {missing} within {seconds(timeout)}'
    return (
        f'background worker "{name}" did not become ready within {seconds(timeout)}; '
        f"last attempt {failure.attempt} failed ({failure.cause()}"
    )


def no_answer(names: list[str], timeout: float) -> str:
    """EnsureTimeout's message when the supervisor itself did not answer."""
    quoted = ", ".join(f'"{name}"' for name in names)
    return (
        f"background worker{'s' if len(names) > 1 else ''} {quoted} did not become ready "
        f"within {seconds(timeout)}: the supervisor did not answer (stopped or overloaded?)"
    )


def boot_failed(name: str, failure: Failure) -> str:
    """WorkerBootFailed's message (fail_fast)."""
    return (
        f'background worker "{name}" failed to boot: attempt {failure.attempt} failed '
        f"({failure.cause()}"
    )


def aborted(name: str, failures: int, failure: Failure) -> str:
    """WorkerAborted's message."""
    return (
        f'background worker "{name}" failed to start: {failures} consecutive failures '
        f"(last {failure.cause()}"
    )


def boot_timed_out(missing: str, boot_timeout: float) -> str:
    """The error message of a run stopped at its `boot_timeout`: `did not
    call get_worker_handle() within 0.3s of starting`."""
    return f"did not {missing} within {seconds(boot_timeout)} of starting"


def hung(silent: float, heartbeat_timeout: float) -> str:
    """The error message of a run killed as hung (`last_error.type == "Hung"`)."""
    return (
        f"no heartbeat for {silent:.2f}s (heartbeat_timeout {seconds(heartbeat_timeout)}): "
        "killed as hung"
    )


def restarts_exhausted(
    name: str, crashes: int, window: float, max_restarts: int, failure: Failure
) -> str:
    """WorkerAborted's message when a worker that was ready crashed more than
    `max_restarts` times within `restart_window` (its restart intensity)."""
    return (
        f'background worker "{name}" was aborted: {crashes} crashes within '
        f"{seconds(window)}, over max_restarts={max_restarts} (restart_window "
        f"{seconds(window)}); start_workers() starts it again (last {failure.cause()}"
    )


def generation_died(status: int | None, module: str | None) -> str:
    """Why a code generation loaded nothing: its process ended before it
    reported (`status` as reaped; None if unknown), while it imported `module`
    if it did (which only something that import ran can do: `os._exit()`, a
    crash in an extension module, the OOM killer)."""
    how = f" ({exit_words(status)})" if status is not None else ""
    if module is None:
        return f"its process died before it loaded the targets{how}"
    return f"importing {module} ended its process{how}"


def no_generation(cause: str) -> str:
    """Why a restart could not even begin."""
    return f"cannot start a new code generation: {cause}; nothing was restarted"


def not_replaced(name: str) -> str:
    """A rollout step that timed out without a recorded failure."""
    return f'background worker "{name}" was not ready again in time after its restart'


NO_CONFIG_FILE = (
    "this pool was not started by `bgpool run`, so it has no config file to load again; "
    "the application that owns it can call Pool.reload(config)"
)

RELOAD_FAILED = "reload() changed the pool, but not every eager worker it added is ready"


def reload_refused(label: str, error: dict[str, Any], *, missing: bool = False) -> str:
    """Why a reload changed nothing: a new or changed worker's code fails to
    load, or (`missing`) its target does not exist (`target_missing`)."""
    if missing:
        return f"reload refused, nothing was changed: {target_missing(label, error)}"
    return (
        f'reload refused, nothing was changed: the code of background worker "{label}" '
        f"failed to load ({error_words(error)})"
    )


def table_too_small(needed: int, count: int) -> str:
    """Why a reload changed nothing: the table cannot hold what it declares."""
    return (
        f"reload refused, nothing was changed: the new declarations need {needed} slots "
        f"in the readiness table, which has {count}; restart the pool to make a larger one"
    )


def restart_refused(name: str, error: dict[str, Any]) -> str:
    """Why a restart left a worker's running instances alone."""
    return (
        f'background worker "{name}" was not restarted: its new code failed to load '
        f"({error_words(error)}); its running instances keep the code they started with"
    )


def closest(word: str, candidates: Iterable[str], count: int = 1) -> list[str]:
    """The candidates closest to `word`, best first, case ignored: what a
    did-you-mean offers."""
    import difflib  # only once someone mistyped a name

    folded: dict[str, str] = {}
    for candidate in candidates:
        folded.setdefault(candidate.casefold(), candidate)
    return [folded[m] for m in difflib.get_close_matches(word.casefold(), folded, n=count)]


def _did_you_mean(names: list[str]) -> str:
    """` (did you mean "run"?)`, ` (did you mean "a" or "b"?)`; "" without names."""
    if not names:
        return ""
    quoted = [f'"{name}"' for name in names]
    choices = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f" (did you mean {choices}?)"


def not_declared(name: str, close: list[str] | None = None) -> str:
    """WorkerNotDeclared's message, with the closest declared names if any."""
    return f'no background worker configured for name "{name}"' + _did_you_mean(close or [])


def no_attribute(target: str, owner: str, attribute: str, close: list[str]) -> str:
    """Why a module target's function does not exist: `target myapp.jobs:rnu
    does not exist: module myapp.jobs has no attribute "rnu" (did you mean "run"?)`."""
    return f'target {target} does not exist: {owner} has no attribute "{attribute}"' + (
        _did_you_mean(close)
    )


def not_callable(target: str, found: object) -> str:
    """Why a module target cannot be called."""
    return f"target {target} is not callable (a {type(found).__name__} object)"


def target_missing(label: str, error: dict[str, Any]) -> str:
    """Why a declaration cannot start at all, whatever the number of
    attempts: its module imports, but its function does not exist (or is
    not callable). Said once, by start(), ensure() and reload() alike."""
    return f'background worker "{label}" cannot run: {error["message"]}'


def limit_reached(name: str, cap: int) -> str:
    """CatchAllLimitReached's message."""
    return (
        f'cannot start background worker "{name}": limit of {cap} reached '
        "(raise max_instances or declare it as a named worker)"
    )


def fd_limits_now(soft: int, hard: int) -> str:
    """`(RLIMIT_NOFILE: soft 1024, hard 4096)`; -1 is unlimited."""

    def limit(value: int) -> str:
        return "unlimited" if value < 0 else str(value)

    return f"(RLIMIT_NOFILE: soft {limit(soft)}, hard {limit(hard)})"


def fd_limit_too_low(instances: int, need: int, soft: int, hard: int) -> str:
    """StartupError's message when the descriptor limit cannot hold the eager workers."""
    return (
        f"could not start the pool: {instances} eager worker instances need about {need} "
        f"file descriptors in the supervisor, over its limit {fd_limits_now(soft, hard)}; "
        "raise the hard limit (ulimit -Hn, or LimitNOFILE= in a systemd unit)"
    )


def vars_not_published(name: str) -> str:
    """VarsNotPublished's message."""
    return f'background worker "{name}" has not published any vars yet'


def stopped(name: str) -> str:
    """What a call waiting for a worker hears when `stop()` (or `scale(name, 0)`) stops it."""
    return (
        f'background worker "{name}" was stopped while this call waited for it; '
        "ensure() or start_workers() starts it again"
    )


# -- requirements (WorkerSpec.requires) ---------------------------------------------


def required_twice(names: list[str]) -> str:
    """Why a `requires` list was refused: it names a worker more than once."""
    return "requires names " + ", ".join(f'"{name}"' for name in names) + " more than once"


def requires_itself(name: str) -> str:
    """Why a declaration's `requires` was refused: it names the worker itself."""
    return f'worker "{name}" cannot require itself'


def unknown_requirement(name: str, close: list[str]) -> str:
    """Why a `requires` entry was refused: no named worker of the scope has it."""
    return (
        f'requires "{name}", which is not a named worker of this scope (a requirement '
        "is a WorkerSpec with that name, in the same scope)" + _did_you_mean(close)
    )


def requirement_cycle(names: list[str]) -> str:
    """Why declarations were refused: their requirements form a cycle,
    `a -> b -> c -> a`, so none of them could ever start."""
    return "requirements form a cycle: " + " -> ".join(names)


def _required_through(name: str, path: list[str]) -> str:
    """`as it requires "db"`, with the chain when it is indirect:
    `as it requires "db" (api -> cache -> db)`."""
    chain = f" ({' -> '.join([name, *path])})" if len(path) > 1 else ""
    return f'as it requires "{path[-1]}"{chain}'


def requirement_failed(name: str, path: list[str], reason: str) -> str:
    """Why a worker was not started: a requirement (`path[-1]`, reached
    through `path`) cannot be; `reason` is that requirement's own sentence
    (aborted, failed to boot, not ready in time)."""
    return f'background worker "{name}" was not started, {_required_through(name, path)}: {reason}'


def requirement_stopped(name: str, path: list[str]) -> str:
    """Why a call waiting for a worker's start was answered: its requirement
    was stopped (`stop()`) meanwhile."""
    return (
        f'background worker "{name}" was not started, {_required_through(name, path)}, '
        f'which was stopped; ensure("{name}") starts both'
    )


def not_started(name: str, path: list[str]) -> str:
    """StartupError's words for a worker held back by a requirement that is
    named in the same message."""
    return f'background worker "{name}" was not started, {_required_through(name, path)}'


def scale_singleton(label: str, num: int) -> str:
    """Why `scale()` refused a singleton more than one instance."""
    return f'cannot scale "{label}" to {num}: a singleton runs one instance (num 0 or 1)'


def scale_catch_all(name: str) -> str:
    """Why `scale()` refused a name a catch-all serves."""
    return (
        f'cannot scale "{name}": it is served by a catch-all (a WorkerSpec with name=None), '
        "which runs one instance per name; only a named worker can be scaled"
    )


def scale_too_large(label: str, num: int, more: int, free: int) -> str:
    """Why `scale()` refused to grow a worker: the table has no room for it."""
    return (
        f'cannot scale "{label}" to {num} instances: that needs {more} more slots in the '
        f"readiness table, which has {free} free; restart the pool to make a larger one"
    )


# -- finding a pool ------------------------------------------------------------------


def no_pool_at(address: str) -> str:
    """Why a client could not reach a pool it had never reached: nothing listens
    at `address` (no socket file there, or one nobody listens on); `CLOSED`
    says instead that a pool it was connected to has stopped."""
    return f"no pool is listening at {address}"


NO_POOL_GIVEN = (
    "no pool given, and no named pool of this user is running: give its address "
    "(--address PATH), its name (--pool NAME), or set BGPOOL_ADDRESS"
)
"""The CLI's error when it has no address, no name and finds no running pool."""


def several_pools(names: list[str]) -> str:
    """The CLI's error when it has no address and more than one named pool runs."""
    listed = ", ".join(f'"{name}"' for name in names)
    return f"{len(names)} pools of this user are running ({listed}): choose one with --pool NAME"


def name_taken(name: str, pids: list[int]) -> str:
    """Why a named pool could not start: another pool of that name holds it
    (`pids`: its owner's, then its supervisor's, as far as known)."""
    if not pids:
        return f'a pool named "{name}" is already starting'
    which = f"pid {pids[0]}" + (f", supervisor pid {pids[1]}" if len(pids) > 1 else "")
    return f'a pool named "{name}" is already running ({which})'


def unsafe_directory(path: str, problem: str) -> str:
    """Why a pool directory is refused: another user could reach the sockets in it."""
    return f"refusing to use {path} for pool sockets: {problem}"


def process_title(role: str, pool: str) -> str:
    """How a pool's process shows in ps: `bgpool: supervisor myapp`,
    `bgpool: worker mailer.0 myapp`."""
    return f"bgpool: {role} {pool}"


def pool_label(name: str | None, address: str) -> str:
    """What names a pool in its processes' titles: its name, else the name of
    its private socket directory (`bgpool-k2x9q1ab`, as in its address)."""
    return name if name is not None else os.path.basename(os.path.dirname(address))


def unnamed_pool(address: str) -> str:
    """What `bgpool status` says under the table of an unnamed pool."""
    return (
        f"unnamed pool at {address} (a PoolConfig.name would let bgpool find it "
        "by name, and refuse a second pool of that name)"
    )


# -- probes and the status page ------------------------------------------------------


def no_heartbeat(deadline: float) -> str:
    """Why `/livez` fails: the supervisor's loop did not answer a round trip."""
    return f"the supervisor did not answer within {seconds(deadline)}"


PING_PENDING = "a round trip to the supervisor is still pending"
"""Why `/livez` fails when the round trip before it has not come back yet."""

POOL_NOT_RUNNING = "the pool is not running"
"""Why a probe fails before the supervisor is up or once it is gone."""

POOL_STARTING = "the pool is still starting"
"""Why `/readyz?worker=` fails before the supervisor published its table."""

NO_WORKER_PARAMETER = "give the worker's name: /readyz?worker=NAME[&scope=LABEL]"
"""The 400 answer of `/readyz` given `scope=` (or an empty `worker=`) alone."""


def no_scope_labelled(label: str) -> str:
    """The 404 answer of `/readyz?worker=..&scope=LABEL` when no declaration has
    that scope label."""
    return f"no declared scope is labelled {label!r}"


def not_found(paths: Iterable[str]) -> str:
    """The 404 answer of the metrics port to a path it does not serve."""
    return "not found: try " + ", ".join(paths) + "\n"
