"""The lifecycle of worker instances: spawn, readiness, exit, and what follows
an exit (restart now, back off, or give up), with catch-all names hosted and
released, and the code generations they are forked from. Every state change
goes through `Core._transition`.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import itertools
import logging
import math
import os
import selectors
import time
from collections.abc import Callable
from typing import Any

from .. import platform, texts
from ..protocol import Message, ProtocolError, error_reply
from ..shm import varstore
from ..shm.table import BOOT_BUCKETS
from ..states import State
from ..worker.runtime import Boot, exec_spawned
from . import logs, policy, relay
from .drains import Drains
from .generations import Generation, module_path
from .instances import Instance, Run, Worker, error_record, policy_error
from .registry import Decl
from .waiters import failure_reply

log = logging.getLogger("bgpool")

FIXED_FDS = 64
"""Descriptors the supervisor needs besides its workers': stdio, its listener,
selector, wake-up pipe and table, a spawn's pipe ends in passing, and clients'
connections."""


def _fds_per_instance(decl: Decl) -> int:
    """Descriptors the supervisor holds for each running instance: its stop
    pipe's write end, its notify pipe's read end, and the read ends of its
    relayed stdout and stderr."""
    return 2 + (2 if decl.output == "prefix" else 0)


class Lifecycle(Drains):
    """Spawning instances and deciding what follows each exit."""

    def start_eager(self) -> None:
        """Start every instance of every eager declaration, unless the
        descriptor limit cannot hold them or a declaration's target does not
        exist (the code is loaded first, with either start method): then
        start none, and let `start()` say why (`startup_problem`)."""
        eager = [i for w in self.workers.values() if w.decl.eager for i in w.instances]
        need = FIXED_FDS + sum(_fds_per_instance(i.worker.decl) for i in eager)
        soft, hard = platform.fd_limits()
        if 0 <= soft < need:
            self.startup_problem = error_reply(
                "StartupError", texts.fd_limit_too_low(len(eager), need, soft, hard)
            )
            return
        declared = [(d.label, d) for d in self.registry.decls]  # lazy ones and catch-alls too
        refusal = self._refuse_missing(declared, "StartupError", "could not start the pool: ")
        if refusal is not None:
            self.startup_problem = refusal
            return
        self._start_fresh(eager)

    def _refuse_missing(
        self, candidates: list[tuple[str, Decl]], error: str, opening: str = ""
    ) -> Message | None:
        """The reply refusing to start what `candidates` (a label and the
        declaration starting under it) name, if the newest code lacks the
        function of one of them; None if it has them all. Each such worker's
        diagnostics show why (no attempt was made)."""
        gen = self._newest_code() if candidates else None
        if gen is None:
            return None
        missing = [(label, decl, e) for label, decl in candidates if (e := gen.missing(decl))]
        if not missing:
            return None
        workers = []
        for _, decl, problem in missing:
            worker = self.workers.get((decl.scope_id, decl.name)) if decl.name else None
            if worker is not None:
                attempts = max(i.attempts for i in worker.instances)
                worker.last_failure = texts.Failure(attempts, None, decl.target, problem)
                workers.append(worker)
        text = "; ".join(texts.target_missing(label, problem) for label, _, problem in missing)
        return failure_reply(error, opening + text, workers)

    # -- code generations ------------------------------------------------------------

    def _new_generation(
        self, decls: list[Decl], skipped: dict[str, dict[str, Any]] | None = None
    ) -> Generation:
        """Fork a generation that loads the code of `decls` afresh (but for the
        modules `skipped` names: `Generation`)."""
        self.generation_count += 1
        gen = Generation(
            self.generation_count,
            decls,
            self.seed,
            module_path(self.settings.root),
            self.pool_label,
            skipped,
        )
        self.generations.append(gen)
        return gen

    def _newest_code(self) -> Generation | None:
        """The newest loaded code, which a fresh start runs (loaded now,
        blocking, if there is none): the generation fresh starts fork from,
        or with start_method="spawn" the last one loaded only to check the
        code, closed at once (a spawned worker imports its own). None if no
        generation could be made (the spawn then says why)."""
        spawn = self.settings.start_method == "spawn"
        if spawn and self.current is not None:
            return self.current
        try:
            gen = self._current_generation()
        except OSError:
            return None
        if spawn:
            gen.close()
        return gen

    def _current_generation(self) -> Generation:
        """The newest loaded generation; one is loaded now (blocking) if there
        is none, or it died. The first, asked for at start, is waited for.
        Returned closed if it died before it loaded, other than in an import
        (`_loaded`), as a new one would."""
        gen = self.current
        if gen is None or not gen.alive:
            gen = self._new_generation(self.registry.decls)
        if not gen.loaded:
            gen = self.current = self._loaded(gen)
        return gen

    def _loaded(self, gen: Generation) -> Generation:
        """`gen` once loaded (blocking); if its process died importing a
        module, a new generation of the same code loaded without that module,
        and so on: the workers that need such a module import it themselves,
        and their boot fails as the generation did, theirs alone."""
        while not gen.wait_loaded() and (skipped := gen.without_culprit()) is not None:
            gen = self._new_generation(self.registry.decls, skipped)
        return gen

    def _release_generations(self) -> None:
        """Close every generation that is neither the newest nor loading nor
        what some instance would restart from."""
        used = {id(i.generation) for w in self.workers.values() for i in w.instances}
        for gen in list(self.generations):
            if gen is not self.current and gen.loaded and id(gen) not in used:
                gen.close()
            if not gen.alive:
                self.generations.remove(gen)

    # -- names -----------------------------------------------------------------------

    def _host(self, decl: Decl, name: str) -> Worker:
        """Give a catch-all name a free slot (the caller checked the cap)."""
        decl.hosted.add(name)
        return self._declare(decl, name)

    def _release(self, worker: Worker) -> None:
        """Free an aborted catch-all name's slot, so the cap counts it no more."""
        decl = worker.decl
        decl.hosted.discard(worker.name)
        del self.workers[(decl.scope_id, worker.name)]
        self.slots.give_back([inst.slot for inst in worker.instances])

    def _wake(self, workers: list[Worker], *, revive: bool = False) -> None:
        """Start the instances of workers that are not running (a fresh try
        after an abort or a stop), from the newest code (`_transition` forgot
        their generation); one that `stop()` is draining starts again once it
        has exited. Nothing holds these workers stopped any more. An instance
        `max_restarts` aborted starts again only when `revive` says so
        (`start_workers()`): `ensure()` hears `WorkerAborted` instead."""
        stopped = []
        for worker in workers:
            worker.held = False
            for inst in worker.instances:
                if inst.exhausted is not None and not revive:
                    continue
                if inst.state in (State.STOPPED, State.ABORTED):
                    inst.failures = 0
                    inst.crash_times.clear()
                    stopped.append(inst)
                elif inst.drain is not None:
                    inst.drain.respawn = True
        self._start_fresh(stopped)

    # -- spawn -----------------------------------------------------------------------

    def _start_fresh(self, insts: list[Instance]) -> None:
        """Start `insts` afresh rather than as a restart: at `start()`, on
        `ensure()` or `start_workers()`, for a reload's new workers
        (`Requirements` holds back those whose requirements are not ready)."""
        self._spawn_all(insts)

    def _spawn_all(self, insts: list[Instance], announce: Callable[[], None] | None = None) -> None:
        """Fork a new process for each of `insts` (each to STARTING), the
        requests to a generation sent without waiting for each answer in
        turn. A process that cannot be made (out of descriptors or processes)
        is a failed start, told to its waiters at once. `announce` runs once
        the processes are asked for, before they are booked: what a restart
        records about the run that ended (its crash, published and logged)
        then no longer delays the new one, which boots meanwhile."""
        prepared: list[tuple[Instance, list[int], Boot]] = []
        unmade: list[tuple[Instance, list[int], OSError]] = []
        for inst in insts:
            assert inst.run is None
            inst.attempts += 1
            made: list[int] = []
            try:
                for _ in range(2 + (2 if inst.worker.decl.output == "prefix" else 0)):
                    made.extend(os.pipe2(os.O_CLOEXEC))
            except OSError as exc:
                unmade.append((inst, made, exc))
                continue
            prepared.append((inst, made, self._boot(inst, made)))
            # spawn to ready counts from here: its fork is part of it, however
            # late in a batch its generation's answer is read
            inst.started_at, inst.started_mono = time.time(), self.timers.clock()
        forked = self._fork_all([(inst, boot) for inst, _, boot in prepared])
        if announce is not None:
            announce()
        for inst, made, error in unmade:
            self._not_started(inst, made, error)
        for (inst, made, _), pid in zip(prepared, forked, strict=True):
            if isinstance(pid, OSError):
                self._not_started(inst, made, pid)
            else:
                self._started(inst, pid, made)

    def _not_started(self, inst: Instance, fds: list[int], exc: OSError) -> None:
        for fd in fds:
            os.close(fd)
        self._cannot_start(inst, exc)

    def _started(self, inst: Instance, pid: int, fds: list[int]) -> None:
        """`inst`'s process `pid` exists: keep the supervisor's ends of `fds`,
        watch its notify pipe and relayed output (to STARTING)."""
        stop_r, stop_w, notify_r, notify_w, *outputs = fds
        os.close(stop_r)
        os.close(notify_w)
        os.set_blocking(notify_r, False)
        inst.tail = collections.deque(maxlen=relay.TAIL_LINES)
        read_ends, write_ends = outputs[0::2], outputs[1::2]
        for fd in write_ends:
            os.close(fd)
        record = functools.partial(self._logged, inst)
        for stream, read_end in enumerate(read_ends, start=1):
            self.relay.attach(read_end, stream, inst.label, inst.tail, record)
        inst.run = Run(pid, stop_w, notify_r, read_ends)
        inst.ready_at = 0.0
        self.by_pid[pid] = inst
        self.selector.register(
            notify_r, selectors.EVENT_READ, functools.partial(self._on_notify, inst)
        )
        self._transition(inst, State.STARTING, f"pid {pid}, attempt {inst.attempts}")

    def _logged(self, inst: Instance, stream: int, text: str) -> None:
        """One line `inst` wrote on `stream` (1 or 2): kept in its worker's
        ring, and sent to those who follow the name."""
        worker = inst.worker
        entry = (time.time(), stream, inst.index, texts.clip(text, logs.LINE_CHARS))
        worker.logs.append(entry)
        for follower in self.followers.get((worker.decl.scope_id, worker.name), ()):
            follower.send(entry)

    def _boot(self, inst: Instance, fds: list[int]) -> Boot:
        """What the worker process of `inst` is told: its ends of `fds` (stop
        pipe, notify pipe, then stdout and stderr pipes if relayed)."""
        worker, decl = inst.worker, inst.worker.decl
        stop_r, _, _, notify_w, *outputs = fds
        return Boot(
            name=worker.name,
            scope_id=decl.scope_id,
            scope_label=decl.scope_label,
            instance=inst.index,
            target=decl.target,
            script=decl.script,
            args=decl.args,
            env=decl.env,
            supervisor_pid=self.pid,
            stop_fd=stop_r,
            notify_fd=notify_w,
            sys_path=module_path(self.settings.root),
            vars_segment=varstore.segment_name(self.table.name, worker.instances[0].slot),
            max_vars_bytes=self.settings.max_vars_bytes,
            pool=self.pool_label,
            stdout_fd=outputs[1] if outputs else None,
            stderr_fd=outputs[3] if outputs else None,
            heartbeat_interval=(
                policy.beat_interval(decl.heartbeat_timeout) if decl.heartbeat_timeout else None
            ),
        )

    def _fork_all(self, requests: list[tuple[Instance, Boot]]) -> list[int | OSError]:
        """Start each worker process: forked by its instance's code generation
        (the one it was started with, else the newest), or with
        `start_method="spawn"` forked here and replaced by a fresh
        interpreter. Each one's pid, or why it could not be made."""
        if self.settings.start_method == "spawn":
            return [self._fork_spawned(boot) for _, boot in requests]
        results: list[int | OSError] = []
        for gen, group in itertools.groupby(requests, key=lambda r: self._generation_for(r[0])):
            boots = [boot for _, boot in group]
            results += [gen] * len(boots) if isinstance(gen, OSError) else gen.spawn_many(boots)
        return results

    def _generation_for(self, inst: Instance) -> Generation | OSError:
        """The generation `inst` forks from: its own while it lives, else the
        newest (which becomes its own); or why none could be loaded."""
        gen = inst.generation
        if gen is None or not gen.alive:
            try:
                gen = inst.generation = self._current_generation()
            except OSError as exc:
                return exc
        return gen

    @staticmethod
    def _fork_spawned(boot: Boot) -> int | OSError:
        try:
            pid = os.fork()
        except OSError as exc:
            return exc
        if pid == 0:  # pragma: no cover - the child never returns
            exec_spawned(boot)
        return pid

    def _cannot_start(self, inst: Instance, exc: OSError) -> None:
        """No process could be made for `inst`: one that was never ready is
        given up at once (its waiters hear why, a catch-all name is freed);
        one that was ready backs off and tries again, as after a crash."""
        cause = f"cannot start a process: {platform.os_error_words(exc)}"
        self._transition(inst, State.STARTING, f"attempt {inst.attempts}: {cause}")
        error = policy_error("OSError", cause)
        self._after_run(inst, None, 0.0, error, give_up=not inst.ever_ready)

    def _respawn(self, inst: Instance, announce: Callable[[], None] | None = None) -> None:
        """Start `inst` again after an exit (from BACKOFF, CRASHED, STOPPING, or
        at once after a clean exit; `announce`: as `_spawn_all`'s)."""
        inst.timer = None
        inst.restarts += 1
        self._spawn_all([inst], announce)

    # -- what a worker reports -------------------------------------------------------

    def _on_notify(self, inst: Instance, _fd: object = None) -> None:
        """Read what the worker reported: readiness, vars, or its exception."""
        run = inst.run
        if run is None or run.notify_r is None:
            return
        try:
            data = os.read(run.notify_r, 65536)
        except BlockingIOError:
            return
        if not data:
            self._close_notify(run)
            return
        try:
            messages = run.decoder.feed(data)
        except ProtocolError as exc:
            log.warning("%s sent a malformed report, ignoring it from now: %s", inst.label, exc)
            self._close_notify(run)
            return
        for message in messages:
            if message.get("t") == "ready":
                run.handle_taken = True
                self._maybe_ready(inst, run)
            elif message.get("t") == "vars":
                # The run's first publication (perhaps the same as the last
                # run's: it counts for readiness all the same).
                run.published = True
                self._maybe_ready(inst, run)
            elif message.get("t") == "beat":
                run.last_beat = self._beat_time(message.get("at"), run.last_beat)
            elif message.get("t") == "error":
                run.error = error_record(message)
            elif message.get("t") == "guarded":
                self._lease_guarded(inst)

    def _lease_guarded(self, inst: Instance) -> None:
        """A singleton's worker armed its lease guard (`Leases`'s)."""

    def _beat_time(self, at: object, latest: float) -> float:
        """When a heartbeat was sent: the worker's monotonic stamp (the same
        clock as the supervisor's, on Linux), never later than now; now if it
        sent none that makes sense."""
        now = self.timers.clock()
        if type(at) is not float or not math.isfinite(at):
            return now
        return max(latest, min(at, now))

    def _close_notify(self, run: Run) -> None:
        if run.notify_r is not None:
            with contextlib.suppress(KeyError):  # a heartbeating run's is read at deadlines
                self.selector.unregister(run.notify_r)
            os.close(run.notify_r)
            run.notify_r = None

    def _maybe_ready(self, inst: Instance, run: Run) -> None:
        """Readiness: the handle taken, and with ready_on="vars" a publication
        too, both in the current run."""
        wants_vars = inst.worker.decl.ready_on == "vars"
        if run.handle_taken and (run.published or not wants_vars) and not run.ready:
            self._on_ready(inst, run)

    def _on_ready(self, inst: Instance, run: Run) -> None:
        """The run became ready (STARTING to READY; an instance already
        draining is recorded as ready but stays STOPPING)."""
        worker = inst.worker
        run.ready = True
        inst.ever_ready = True
        inst.ready_at = time.time()
        # A run of a stop()ped worker that takes its handle during the drain
        # must not make the name ready again: stop() made it unready for good.
        first = not worker.name_ready and not worker.held
        worker.name_ready = worker.name_ready or not worker.held
        elapsed = self.timers.clock() - inst.started_mono
        inst.boot_sum += elapsed
        inst.boot_buckets[bisect.bisect_left(BOOT_BUCKETS, elapsed)] += 1
        if inst.state == State.STARTING:
            self._transition(
                inst, State.READY, f"took its handle {elapsed * 1000:.1f} ms after spawn"
            )
        else:
            self._publish(inst)
        if first:
            for other in worker.instances:
                self._publish(other)
        self._settle_all()

    # -- exits -----------------------------------------------------------------------

    def _reap(self) -> None:
        """Collect every exited child; dispatch the workers' exits."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            inst = self.by_pid.pop(pid, None)
            if inst is not None:
                self._on_exit(inst, os.waitstatus_to_exitcode(status))
                continue
            for gen in self.generations:  # one that died loading: it says why with this
                if gen.pid == pid:
                    gen.reaped(os.waitstatus_to_exitcode(status))
            # anything else: a worker's orphaned descendant, re-parented to us as subreaper

    def _on_exit(self, inst: Instance, status: int) -> None:
        """The worker's process ended with `status` (negative: killed by a signal)."""
        run = inst.run
        assert run is not None
        if run.notify_r is not None:
            self._on_notify(inst)  # its last words (readiness, exception) come first
            self._close_notify(run)
        for fd in run.outputs:
            self.relay.drain(fd)
        if run.stop_w is not None:
            os.close(run.stop_w)
        run.cancel_timers()
        inst.run = None
        inst.last_exit = status
        if inst.state == State.STOPPING:
            self._drained(inst, status)
        else:
            # a policy's verdict (boot timeout, hung) says why, whatever it printed as it died
            error = run.verdict or run.error
            self._after_run(inst, status, self.timers.clock() - inst.started_mono, error)
        if len(self.generations) > 1:  # an older one may have lost its last instance
            self._release_generations()

    def _after_run(
        self,
        inst: Instance,
        status: int | None,
        run_seconds: float,
        error: dict[str, Any] | None,
        *,
        give_up: bool = False,
    ) -> None:
        """Decide what follows a run that ended outside a drain (STARTING or
        READY): restart now, back off, or give up (at the failure cap, or at
        once with `give_up`)."""
        worker, decl = inst.worker, inst.worker.decl
        boot_failure = not inst.ever_ready
        failed = boot_failure or status != 0
        if status != 0:
            inst.crashes += 1
        inst.failures = policy.count_failures(inst.failures, failed=failed, run_seconds=run_seconds)
        words = texts.exit_words(status)
        if failed:
            worker.last_failure = texts.Failure(
                inst.attempts, status, decl.target, error, tuple(inst.tail)
            )
            if boot_failure:
                worker.boot_failures += 1
            words += f": {texts.error_words(error)}" if error else ""
        exhausted = failed and not boot_failure and self._count_crash(inst)
        if (
            exhausted
            or give_up
            or policy.should_abort(inst.failures, inst.ever_ready, decl.max_failures)
        ):
            why = (
                f"gave up after {len(inst.crash_times)} crashes within "
                f"{texts.seconds(decl.restart_window)} (max_restarts={decl.max_restarts})"
                if exhausted
                else f"gave up after {inst.failures} consecutive boot failures"
            )
            if exhausted:
                self._exhausted(inst)
            self._transition(inst, State.ABORTED, f"{why}; last: {words}", logging.ERROR)
            if decl.name is None:
                self._release(worker)
            self._settle_all()
            return
        delay = policy.restart_delay(
            failed=failed, failures=inst.failures, since_last_start=run_seconds
        )
        record = (
            functools.partial(self._transition, inst, State.CRASHED, words, logging.WARNING)
            if failed
            else functools.partial(log.info, "%s exited (%s); restarting it", inst.label, words)
        )
        if delay > 0:
            record()
            self._transition(inst, State.BACKOFF, f"restart in {delay:g}s after {words}")
            inst.timer = self.timers.call_later(delay, lambda: self._respawn(inst))
        else:
            self._respawn(inst, record)  # the new process is asked for first
        self._settle_all()

    def _count_crash(self, inst: Instance) -> bool:
        """Count a crash after readiness against `max_restarts` (within
        `restart_window`); return whether the instance is to be aborted."""
        decl = inst.worker.decl
        if decl.max_restarts is None:
            return False
        now = self.timers.clock()
        inst.crash_times.append(now)
        while inst.crash_times and inst.crash_times[0] <= now - decl.restart_window:
            inst.crash_times.popleft()
        return policy.restarts_exhausted(len(inst.crash_times), decl.max_restarts)

    def _exhausted(self, inst: Instance) -> None:
        """`inst` is to be aborted for its restart intensity: what waiters (and
        later `ensure()` calls) hear from now on is said once; a name none of
        whose instances is left is not ready any more, so `ensure()` asks the
        supervisor and hears it. Called before the move to ABORTED, whose
        publication then shows the name not ready at once: a reader that
        sees the instance aborted never sees the name still ready."""
        worker, decl = inst.worker, inst.worker.decl
        assert worker.last_failure is not None and decl.max_restarts is not None
        inst.exhausted = texts.restarts_exhausted(
            worker.name, len(inst.crash_times), decl.restart_window, decl.max_restarts,
            worker.last_failure,
        )  # fmt: skip
        others = [other for other in worker.instances if other is not inst]
        if worker.name_ready and all(other.state == State.ABORTED for other in others):
            worker.name_ready = False
            for other in others:
                self._publish(other)
