"""The event table and the event lifecycle: where an event starts, waits, ends and is reaped.

    HandleEvent ─▶ RUNNING        an idle worker takes the handler (Engine.handle_event)
    RUNNING ─PDK call─▶ WAITING_KONG   the call goes back to Kong as Data (Engine._reply)
    WAITING_KONG ─Step─▶ RUNNING   Step's Data goes to the waiting worker (Engine.step)
    ended: "ret", a terminal call, a raise, handler_timeout, or event_ttl (Reaper)

Ending (Engine._end) removes the event from the table, exactly once. Locks guard id
allocation and state changes only; nothing waits for plugin code or Kong while holding one.

Who hands a worker back to the pool: the engine, when it reads the worker's final message
("ret" or a raise); after a terminal call, whichever comes last of the engine reading that call
and the handler returning (a worker back in the pool must have an empty outbox); the worker
itself, when the engine ended its event while the handler still ran (handler_timeout, the
reaper), as soon as the handler returns.
"""

from __future__ import annotations

import itertools
import logging
import threading
import traceback
import weakref
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

from . import config
from .backends import CALL, FAILED, FINISHED, TIMED_OUT, HandlerRaised, Worker, pool_size
from .bridge import ABANDONED, TERMINAL_METHODS, PDKChannel

log = logging.getLogger("kong_pdk_fix")

RUNNING = "running"
WAITING_KONG = "waiting_kong"

# Why an event ended (stats keys).
RET = "ret"
EXIT = "exit"  # kong.response.exit
ERROR = "error"  # kong.response.error
RAISED = "raised"  # the handler raised
TIMEOUT = "timeout"  # still running after handler_timeout
ABANDONED_CAUSE = "abandoned"  # no Step from Kong within event_ttl
CAUSES = (RET, EXIT, ERROR, RAISED, TIMEOUT, ABANDONED_CAUSE)

# Phases where Kong lets a plugin answer the request itself (on_error=fail-closed).
FAIL_CLOSED_PHASES = frozenset(("rewrite", "access"))


class PluginServerError(Exception):
    """Raised out of a PluginServer method: upstream's listener sends it to Kong as the error
    of the RPC reply. Subclassed from kong-pdk's PluginServerException at run time (see
    Engine.__init__) so the listener logs it as a warning, not with a traceback."""


class Event:
    __slots__ = (
        "id",
        "plugin",
        "phase",
        "worker",
        "state",
        "deadline",
        "cause",
        "terminal_sent",
        "returned",
        "__weakref__",
    )

    def __init__(self, eid: int, plugin: str, phase: str, worker: Worker) -> None:
        self.id = eid
        self.plugin = plugin
        self.phase = phase
        self.worker = worker
        self.state = RUNNING
        self.deadline = 0.0  # when WAITING_KONG: the reaper ends it after this
        self.cause: Optional[str] = None  # set once, when the event ends
        self.terminal_sent: Optional[str] = None  # kong.response.exit/error, once called
        self.returned = False  # the handler has returned

    @property
    def ended(self) -> bool:
        return self.cause is not None

    def why_ended(self) -> str:
        if self.terminal_sent:
            return "event %d of plugin %s (%s phase) already ended: %s was called" % (
                self.id,
                self.plugin,
                self.phase,
                self.terminal_sent,
            )
        what = {
            TIMEOUT: "the handler ran past handler_timeout",
            ABANDONED_CAUSE: "Kong sent no Step within event_ttl",
            RAISED: "the handler raised",
            RET: "the handler returned",
        }.get(self.cause or "", "it was still running")
        return "event %d of plugin %s (%s phase) already ended: %s" % (
            self.id,
            self.plugin,
            self.phase,
            what,
        )


_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


class Engine:
    """Serves HandleEvent and Step for one kong_pdk PluginServer."""

    def __init__(self, server: Any, backend: Any) -> None:
        from kong_pdk.exception import PluginServerException

        self.server = server
        self.backend = backend
        self.logger = server.logger  # upstream's logger: same stream and -v level as Kong sees
        self.lua_style = bool(server.lua_style)
        self.error_type = type("PluginServerError", (PluginServerError, PluginServerException), {})
        self.events: Dict[int, Event] = {}
        self.lock = backend.lock()
        self._ids = itertools.count()
        self.started = 0
        self.ended: Counter = Counter()
        self.overloaded = 0
        self.stuck: Dict[Worker, int] = {}  # worker -> event id it ran past handler_timeout
        # The pool's size is fixed when the engine starts (the server's first event).
        self.pool = backend.worker_pool(
            self._run_job, pool_size(backend, config.current().max_workers)
        )
        self.reaper = Reaper(self)
        backend.spawn(self.reaper.run, "kong-pdk-fix-reaper")
        _engines.add(self)

    # -- Kong's calls -------------------------------------------------------------------------

    def handle_event(self, event: Dict[str, Any]) -> Dict[str, Any]:
        iid = event["InstanceId"]
        instance = self.server.instances.get(iid)
        if instance is None:
            # Kong expects the error to start with "no plugin instance" (then restarts it).
            raise self.error_type("no plugin instance #%s" % iid)
        phase = event["EventName"]
        handler = getattr(instance.cls, phase)  # an unknown phase fails as upstream's does
        instance.reset_expire_ts()
        settings = config.current()

        worker = self.pool.acquire(settings.overload_timeout)
        if worker is None:
            with self.lock:
                self.overloaded += 1
            raise self.error_type(
                "kong-pdk-fix: overloaded: all %d workers busy for %.1f s; %s %s event not run"
                % (self.pool.size, settings.overload_timeout, instance.name, phase)
            )

        with self.lock:
            ev = Event(next(self._ids), instance.name, phase, worker)
            self.events[ev.id] = ev
            self.started += 1
        worker.inbox.put((ev, handler))
        return self._reply(ev, settings)

    def step(self, data: Dict[str, Any], is_error: bool = False) -> Dict[str, Any]:
        eid = data["EventId"]
        result = data.get("Data")  # absent when the PDK call returned nil
        with self.lock:
            ev = self.events.get(eid)
            if ev is None:
                raise self.error_type("event id %s not found" % eid)
            if ev.state != WAITING_KONG:
                raise self.error_type(
                    "event id %s is not waiting for a Step (a Step for it is in progress)" % eid
                )
            ev.state = RUNNING
        ev.worker.inbox.put((None, result) if is_error else (result, None))
        return self._reply(ev, config.current())

    # -- waiting for the handler's next message -----------------------------------------------

    def _reply(self, ev: Event, settings: config.Settings) -> Dict[str, Any]:
        worker = ev.worker
        message = worker.outbox.get(settings.handler_timeout)
        if message is TIMED_OUT:
            with self.lock:
                # The worker posts under this lock, so this look is final.
                message = worker.outbox.get_nowait()
                if message is TIMED_OUT:
                    self._end_locked(ev, TIMEOUT)
                    self.stuck[worker] = ev.id
            if message is TIMED_OUT:
                self.logger.error(
                    "kong-pdk-fix: %s %s handler still running after %.1f s; event %d ended "
                    "with an error reply; its worker is stuck until the handler returns:\n%s"
                    % (ev.plugin, ev.phase, settings.handler_timeout, ev.id, worker.stack())
                )
                raise self.error_type(
                    "kong-pdk-fix: plugin %s %s handler ran past handler_timeout (%.1f s)"
                    % (ev.plugin, ev.phase, settings.handler_timeout)
                )

        kind, payload = message
        if kind == CALL:
            method = payload.get("Method")
            if method in TERMINAL_METHODS:
                # Kong runs it and sends no Step. The worker finishes the handler; whichever
                # of the two comes last (this read, the handler's return) frees the worker.
                with self.lock:
                    self._end_locked(ev, EXIT if method == "kong.response.exit" else ERROR)
                    release = ev.returned
                if release:
                    self.pool.release(worker)
            else:
                with self.lock:
                    ev.state = WAITING_KONG
                    ev.deadline = self.backend.clock() + settings.event_ttl
            return {"Data": payload, "EventId": ev.id}

        if kind == FINISHED:
            self._end(ev, RET)
            self.pool.release(worker)
            return {"Data": "ret", "EventId": ev.id}

        # FAILED: the handler raised before its event ended.
        self._end(ev, RAISED)
        self.pool.release(worker)
        if settings.on_error == "fail-closed" and ev.phase in FAIL_CLOSED_PHASES:
            return {"Data": {"Method": "kong.response.error", "Args": [500]}, "EventId": ev.id}
        raise self.error_type(payload)

    def _end(self, ev: Event, cause: str) -> bool:
        with self.lock:
            return self._end_locked(ev, cause)

    def _end_locked(self, ev: Event, cause: str) -> bool:
        if ev.cause is not None:
            return False
        ev.cause = cause
        del self.events[ev.id]
        self.ended[cause] += 1
        return True

    # -- the worker's side --------------------------------------------------------------------

    def post_call(self, ev: Event, worker: Worker, call: Any, terminal: Optional[str]) -> bool:
        """Hand a PDK call of the handler to the engine; False when its event has ended.
        `terminal`: the method's name when it is kong.response.exit/error."""
        with self.lock:
            if ev.ended or ev.terminal_sent:
                return False
            if terminal:
                ev.terminal_sent = terminal
            worker.outbox.put((CALL, call))
            return True

    def _run_job(self, worker: Worker, job: Any) -> None:
        ev, handler = job
        channel = worker.state
        if channel is None:
            channel = worker.state = PDKChannel(self, worker, self.lua_style)
        channel.begin(ev)
        message: Tuple[str, Optional[str]]
        try:
            self.backend.run_handler(worker, handler, channel)
        except BaseException as ex:  # noqa: B036 - a plugin's SystemExit must not kill a worker
            message = (FAILED, self._describe_failure(ev, ex))
        else:
            message = (FINISHED, None)
        finally:
            channel.begin(None)

        with self.lock:
            ev.returned = True
            # After a terminal call, the engine may not have read it from the outbox yet:
            # if so, it frees the worker when it does (a new event must find the outbox empty).
            hand_back_myself = ev.ended
            if not hand_back_myself and not ev.terminal_sent:
                worker.outbox.put(message)
            self.stuck.pop(worker, None)
        if hand_back_myself:
            self.pool.release(worker)

    def _describe_failure(self, ev: Event, ex: BaseException) -> str:
        self.logger.error(
            "kong-pdk-fix: plugin %s raised in its %s handler (event %d):\n%s"
            % (ev.plugin, ev.phase, ev.id, traceback.format_exc())
        )
        if isinstance(ex, HandlerRaised):  # from a pool process: the text names the exception
            what = str(ex).split("\n", 1)[0]
        else:
            what = "%s: %s" % (type(ex).__name__, ex)
        return "kong-pdk-fix: plugin %s raised in its %s handler: %s" % (ev.plugin, ev.phase, what)

    # -- observability -------------------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        total, idle = self.pool.counts()
        with self.lock:
            by_state = Counter(ev.state for ev in self.events.values())
            return {
                "mode": self.backend.name,
                "events": {RUNNING: by_state[RUNNING], WAITING_KONG: by_state[WAITING_KONG]},
                "workers": {
                    "busy": total - idle,
                    "idle": idle,
                    "stuck": len(self.stuck),
                    "max": self.pool.size,
                },
                "started": self.started,
                "ended": {cause: self.ended[cause] for cause in CAUSES},
                "overloaded": self.overloaded,
            }


class Reaper:
    """Ends events Kong stopped stepping (exit, a Lua error in a PDK call, its own timeout, a
    worker reload: KONG_PROTOCOL.md says Kong never tells us) after event_ttl, and wakes
    their waiting handler with an error so the worker unwinds."""

    def __init__(self, engine: Engine) -> None:
        self._engine = weakref.ref(engine)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            engine = self._engine()
            if engine is None:
                return
            ttl = config.current().event_ttl
            try:
                self.reap(engine)
            except Exception:  # the reaper must outlive any one failure: handlers wait on it
                log.exception("kong-pdk-fix: reaping failed; trying again")
            sleep = engine.backend.sleep
            del engine  # hold no reference while sleeping
            sleep(max(0.05, min(1.0, ttl / 4)))

    @staticmethod
    def reap(engine: Engine) -> int:
        now = engine.backend.clock()
        reaped = []
        with engine.lock:
            for ev in list(engine.events.values()):
                if ev.state == WAITING_KONG and ev.deadline <= now:
                    engine._end_locked(ev, ABANDONED_CAUSE)
                    ev.worker.inbox.put(ABANDONED)  # its handler waits in PDKChannel.get
                    reaped.append(ev)
        for ev in reaped:
            engine.logger.info(
                "kong-pdk-fix: event %d of %s (%s) reaped: no Step from Kong "
                "within event_ttl" % (ev.id, ev.plugin, ev.phase)
            )
        return len(reaped)


def all_stats() -> Dict[str, Any]:
    """Stats of every live engine in this process, summed (usually there is one)."""
    engines = list(_engines)
    if len(engines) == 1:
        return engines[0].stats()
    total: Dict[str, Any] = {
        "engines": len(engines),
        "started": 0,
        "overloaded": 0,
        "events": Counter(),
        "workers": Counter(),
        "ended": Counter(),
    }
    for engine in engines:
        s = engine.stats()
        total["started"] += s["started"]
        total["overloaded"] += s["overloaded"]
        for key in ("events", "workers", "ended"):
            total[key].update(s[key])
    for key in ("events", "workers", "ended"):
        total[key] = dict(total[key])
    return total


def stop_all() -> List[Any]:
    """Stop every engine's reaper and idle workers (uninstall); returns their servers."""
    servers = []
    for engine in list(_engines):
        engine.reaper.stopped.set()
        engine.pool.stop()
        _engines.discard(engine)
        servers.append(engine.server)
    return servers
