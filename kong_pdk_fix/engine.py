"""The event table and the event lifecycle: where an event starts, waits, ends and is reaped.

    HandleEvent ─▶ RUNNING        an idle worker takes the handler (Engine.handle_event)
    RUNNING ─PDK call─▶ WAITING_KONG   the worker sends the call to Kong as Data (post_call)
    WAITING_KONG ─Step─▶ RUNNING   Kong's answer reaches the waiting worker (wait_answer)
    ended: "ret", a terminal call, a raise, handler_timeout, or event_ttl (Reaper)

Kong's connection is handed to the event's worker: the listener thread that read HandleEvent
or a Step lends its connection to the worker and waits (Engine.wait_for_return); the worker
writes the reply itself and, while its handler waits for Kong, reads that connection itself,
so a Step arriving where the last reply went reaches the handler with no thread hand-off.
The worker gives the connection back when its event ends, when something else than its Step
arrives there (the listener serves that message), or when its Step came on another connection
(KONG_PROTOCOL.md: consecutive calls of one event may arrive on different connections).

Ending (Engine._end_locked) removes the event from the table, exactly once, under the lock;
whoever ends it writes its last reply, so Kong never gets two. Locks guard ids, state changes
and who holds a connection; nothing waits for plugin code or Kong while holding one.
"""

from __future__ import annotations

import itertools
import logging
import threading
import traceback
import weakref
from collections import Counter
from typing import Any, Dict, List, Optional

from . import config
from .backends import TIMED_OUT, HandlerRaised, Worker, pool_size
from .bridge import ABANDONED, PDKChannel
from .listener import EOF, STEP_NAMES, BadRequest, BadStream, KongConnection, check_request

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
        "conn",
        "reading",
        "running_since",
        "deadline",
        "cause",
        "terminal_sent",
        "__weakref__",
    )

    def __init__(self, eid: int, plugin: str, phase: str, worker: Worker) -> None:
        self.id = eid
        self.plugin = plugin
        self.phase = phase
        self.worker = worker
        self.state = RUNNING
        # The connection whose request (HandleEvent or the last Step) the event owes a reply.
        self.conn: Optional[KongConnection] = None
        # The connection its last PDK call went on, which its worker reads for the Step.
        self.reading: Optional[KongConnection] = None
        self.running_since = 0.0  # when RUNNING: handler_timeout counts from here
        self.deadline = 0.0  # when WAITING_KONG: the reaper ends it after this
        self.cause: Optional[str] = None  # set once, when the event ends
        self.terminal_sent: Optional[str] = None  # kong.response.exit/error, once called

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
        # The pool's size is fixed when the engine starts (the server's first connection).
        self.pool = backend.worker_pool(
            self._run_job, pool_size(backend, config.current().max_workers)
        )
        self.reaper = Reaper(self)
        backend.spawn(self.reaper.run, "kong-pdk-fix-reaper")
        _engines.add(self)

    # -- Kong's calls, on the listener's side: lend the connection to the event's worker ------

    def handle_event(self, event: Dict[str, Any], conn: KongConnection) -> None:
        """Start the event's handler on a worker, which answers on `conn`; raises for an
        error reply written by the listener."""
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
            self._lend_locked(ev, conn)
        worker.inbox.put((ev, handler))

    def step(self, data: Dict[str, Any], conn: KongConnection, is_error: bool = False) -> None:
        """Give Kong's answer to the waiting handler, whose worker answers on `conn`."""
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
            self._lend_locked(ev, conn)
            # Under the lock: once an event has ended, nothing more reaches its worker's inbox.
            ev.worker.inbox.put((None, result) if is_error else (result, None))
        ev.worker.wake()  # it may be reading the connection its last reply went to

    def _lend_locked(self, ev: Event, conn: KongConnection) -> None:
        ev.state = RUNNING
        ev.running_since = self.backend.clock()
        ev.conn = conn
        conn.holder = ev

    def wait_for_return(self, conn: KongConnection) -> Any:
        """Wait, on the listener's side, until the worker gives `conn` back; answers what the
        worker read there and left for the listener (see KongConnection.returned). Ends the
        event with an error reply when its handler runs past handler_timeout."""
        while True:
            settings = config.current()
            # Look at least once a second: the worker may read a Step itself, which starts the
            # handler's time again, so the overdue moment moves.
            item = conn.returned.get(min(settings.handler_timeout, 1.0))
            if item is not TIMED_OUT:
                return item
            with self.lock:
                ev = conn.holder
                overdue = (
                    ev is not None
                    and ev.state == RUNNING
                    and ev.conn is conn
                    and self.backend.clock() - ev.running_since >= settings.handler_timeout
                )
                if overdue:
                    self._end_locked(ev, TIMEOUT)
                    conn.holder = ev.conn = None
                    self.stuck[ev.worker] = ev.id
            if overdue:
                self.logger.error(
                    "kong-pdk-fix: %s %s handler still running after %.1f s; event %d ended "
                    "with an error reply; its worker is stuck until the handler returns:\n%s"
                    % (ev.plugin, ev.phase, settings.handler_timeout, ev.id, ev.worker.stack())
                )
                conn.reply(
                    conn.owed,
                    "kong-pdk-fix: plugin %s %s handler ran past handler_timeout (%.1f s)"
                    % (ev.plugin, ev.phase, settings.handler_timeout),
                    None,
                )
                return None

    # -- the worker's side ----------------------------------------------------------------------

    def post_call(self, ev: Event, call: Any, terminal: Optional[str]) -> bool:
        """Send a PDK call of the handler to Kong as the reply it owes; False when its event
        has ended. `terminal`: the method's name when it is kong.response.exit/error."""
        with self.lock:
            if ev.ended or ev.state != RUNNING or ev.conn is None:
                return False  # (not RUNNING: a call from another thread is waiting for Kong)
            conn = ev.conn
            if terminal:
                # Kong runs it and sends no Step: the event ends here; the handler goes on
                # until it returns, with no connection.
                ev.terminal_sent = terminal
                self._end_locked(ev, EXIT if terminal == "kong.response.exit" else ERROR)
                self._take_back_locked(ev, conn)
            else:
                ev.state = WAITING_KONG
                ev.deadline = self.backend.clock() + config.current().event_ttl
                ev.reading = conn
        conn.reply(conn.owed, None, {"Data": call, "EventId": ev.id})
        if terminal:
            conn.returned.put(None)
        return True

    def wait_answer(self, ev: Event, worker: Worker) -> Any:
        """Kong's answer to the handler's last PDK call: (data, err), or ABANDONED. Reads the
        connection that call went on while the event holds it (a Step may already have come
        on another one and moved ev.conn)."""
        conn, ev.reading = ev.reading, None
        try:
            while conn is not None and conn.holder is ev:
                if worker.wait_readable(conn.sock):
                    message = conn.read_quietly()
                    answer = self._own_step(ev, conn, message)
                    if answer is not None:
                        return answer
                    self._give_back(ev, conn, message)  # the listener serves it
                    break
                answer = worker.inbox.get_nowait()  # woken: a Step came elsewhere, or the reaper
                if answer is not TIMED_OUT:
                    self._give_back(ev, conn, None)
                    return answer
            return worker.inbox.get()
        except BaseException:
            self._interrupted(ev, worker, conn)
            raise

    def _interrupted(self, ev: Event, worker: Worker, reading: Optional[KongConnection]) -> None:
        """The handler's wait for Kong was interrupted (gevent.Timeout, a kill, a failed read):
        end the event, so no answer can reach the worker any more, and give back every
        connection it holds; one where Kong waits for a reply gets an error reply."""
        owed = None
        with self.lock:
            self._end_locked(ev, RAISED)
            if reading is not None and not self._take_back_locked(ev, reading):
                reading = None
            other = ev.conn
            if other is not None and other is not reading and ev.state == RUNNING:
                if self._take_back_locked(ev, other):
                    owed = other
        while worker.inbox.get_nowait() is not TIMED_OUT:  # an answer put before the end
            pass
        if reading is not None:
            reading.returned.put(None)
        if owed is not None:
            owed.reply(
                owed.owed,
                "kong-pdk-fix: plugin %s %s handler: its PDK call was "
                "interrupted" % (ev.plugin, ev.phase),
                None,
            )
            owed.returned.put(None)

    def _own_step(self, ev: Event, conn: KongConnection, message: Any) -> Any:
        """(data, err) if `message` is the Step this event waits for, else None."""
        if message is EOF or isinstance(message, BadStream):
            return None
        try:
            msgid, name, params = check_request(message)
        except (BadRequest, BadStream):
            return None
        if name not in STEP_NAMES or params[0]["EventId"] != ev.id:
            return None
        with self.lock:
            if ev.ended or ev.state != WAITING_KONG:
                return None
            ev.state = RUNNING
            ev.running_since = self.backend.clock()
            ev.conn = conn
        conn.owed = msgid
        conn.log_request(msgid, name, params)
        data = params[0].get("Data")
        return (None, data) if name == "StepError" else (data, None)

    def _give_back(self, ev: Event, conn: KongConnection, item: Any) -> None:
        with self.lock:
            if not self._take_back_locked(ev, conn):
                return
        conn.returned.put(item)

    def _take_back_locked(self, ev: Event, conn: KongConnection) -> bool:
        if conn.holder is not ev:  # the listener took it back (handler_timeout)
            return False
        conn.holder = None
        if ev.conn is conn:
            ev.conn = None
        return True

    def _run_job(self, worker: Worker, job: Any) -> None:
        ev, handler = job
        if worker.state is None:
            worker.state = self.backend.semaphore(1)  # the worker's PDK call lock, reused
        channel = PDKChannel(self, worker, ev, self.lua_style, worker.state)
        failure: Optional[str] = None
        try:
            self.backend.run_handler(worker, handler, channel)
        except BaseException as ex:  # noqa: B036 - a plugin's SystemExit must not kill a worker
            failure = self._describe_failure(ev, ex)
        finally:
            # Whatever happened above, the connection goes back and the worker to the pool.
            try:
                self._answer_last(ev, worker, failure)
            finally:
                self.pool.release(worker)

    def _answer_last(self, ev: Event, worker: Worker, failure: Optional[str]) -> None:
        with self.lock:
            self.stuck.pop(worker, None)
            conn = ev.conn
            # Kong waits for a reply only while the event is RUNNING and has not ended.
            answer_kong = not ev.ended and ev.state == RUNNING and conn is not None
            if not ev.ended:
                self._end_locked(ev, RET if answer_kong and failure is None else RAISED)
            if conn is not None and not self._take_back_locked(ev, conn):
                conn = None
        if conn is not None:
            try:
                if answer_kong:
                    conn.reply(conn.owed, *self._last_reply(ev, failure))
            finally:
                conn.returned.put(None)

    @staticmethod
    def _last_reply(ev: Event, failure: Optional[str]) -> "tuple[Optional[str], Any]":
        """(error, result) of the reply that ends a returned or raised handler's event."""
        if failure is None:
            return None, {"Data": "ret", "EventId": ev.id}
        if config.current().on_error == "fail-closed" and ev.phase in FAIL_CLOSED_PHASES:
            error_500 = {"Method": "kong.response.error", "Args": [500]}
            return None, {"Data": error_500, "EventId": ev.id}
        return failure, None

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

    def _end_locked(self, ev: Event, cause: str) -> bool:
        if ev.cause is not None:
            return False
        ev.cause = cause
        del self.events[ev.id]
        self.ended[cause] += 1
        return True

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
                    ev.worker.inbox.put(ABANDONED)  # its handler waits in wait_answer
                    reaped.append(ev)
        for ev in reaped:
            ev.worker.wake()  # it may be reading the connection its last call went on
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
