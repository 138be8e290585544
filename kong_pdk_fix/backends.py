"""Where plugin handlers run: a bounded pool of reused workers, each with a reused inbox (a
one-slot mailbox) and a wake-up pipe that interrupts its read of a lent Kong connection. The
engine decides what goes through them; this module only moves things and knows nothing of
Kong's events.

A backend gives the engine `lock()`, `clock()`, `sleep()`, `spawn()` for its reaper,
`mailbox()`, `poller()`, a `WorkerPool`, and `run_handler()`. Three of them, one per kong-pdk
mode:
- ThreadBackend (the default): a worker is a thread.
- GeventBackend (`-g`): a worker is a greenlet; mailboxes are buffered gevent queues (upstream's
  gevent Channel is a rendezvous, so its last put after an exit blocks for ever), polling is
  gevent's.
- ProcessBackend (`-m`): the handler runs in a process of upstream's multiprocessing pool, as
  upstream does; a worker is a thread that owns one pipe to one pool process for the life of
  the process and relays the handler's PDK calls through the engine's PDK channel.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import select
import sys
import threading
import time
import traceback
from typing import Any, Callable, List, Optional

from .bridge import TERMINAL_METHODS

log = logging.getLogger("kong_pdk_fix")

# Pool process -> worker messages over a -m link, (kind, payload); READY starts a link.
CALL, FINISHED, FAILED, READY = "call", "finished", "failed", "ready"
# What Mailbox.get answers when its timeout ran out.
TIMED_OUT = object()
# Put into a worker's inbox to end its loop (uninstall).
STOP = object()


class Mailbox:
    """A reusable one-way channel; the engine never lets it hold more than one message."""

    __slots__ = ("_q", "_empty")

    def __init__(self, q: Any, empty: "type[Exception]") -> None:
        self._q = q
        self._empty = empty

    def put(self, message: Any) -> None:
        self._q.put(message)

    def get(self, timeout: Optional[float] = None) -> Any:
        try:
            return self._q.get(timeout=timeout)
        except self._empty:
            return TIMED_OUT

    def get_nowait(self) -> Any:
        try:
            return self._q.get_nowait()
        except self._empty:
            return TIMED_OUT


class Worker:
    """One reused thread or greenlet. `inbox` brings it a job, then Kong's answers to its PDK
    calls when they arrive on another connection than the one it reads; `wake()` interrupts
    that read (wait_readable) when something is put in the inbox."""

    def __init__(self, index: int, run_job: Callable[["Worker", Any], None], backend: Any) -> None:
        self.index = index
        self.backend = backend
        self.inbox = backend.mailbox()
        self._wake_r, self._wake_w = os.pipe()
        try:
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self._poller = backend.poller()
            self._poller.register(self._wake_r, select.POLLIN)
            self.state: Any = None  # the engine's per-worker data
            self.link: Any = None  # the process backend's pipe to its pool process
            self._run_job = run_job
            self._handle = backend.spawn(self._loop, "kong-pdk-fix-worker-%d" % index)
        except BaseException:
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise

    def _loop(self) -> None:
        while True:
            try:
                job = self.inbox.get()
                if job is STOP:
                    break
                if not (isinstance(job, tuple) and len(job) == 2 and callable(job[1])):
                    continue  # never a job: a stale answer
                self._run_job(self, job)
            except BaseException:  # noqa: B036 - e.g. a gevent.Timeout a handler left armed
                log.error("kong-pdk-fix: worker %d survived an error:", self.index, exc_info=True)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:  # already more wake-ups pending than it will ever read
            pass

    def wait_readable(self, sock: Any) -> bool:
        """Wait until `sock` can be read (True) or wake() was called (False). A wake-up may
        be stale (its inbox item already taken): callers look in the inbox and wait again."""
        fd = sock.fileno()
        self._poller.register(fd, select.POLLIN)
        try:
            ready = dict(self._poller.poll())
        finally:
            self._poller.unregister(fd)
        if fd in ready:
            return True
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        return False

    def stack(self) -> str:
        """Where the worker's handler is now, for the stuck-worker report."""
        return self.backend.stack(self)

    def stop(self) -> None:
        self.inbox.put(STOP)


class WorkerPool:
    """At most `size` workers, created on demand and kept; idle ones are reused last in,
    first out, so a few hot workers serve a light load."""

    def __init__(self, run_job: Callable[[Worker, Any], None], size: int, backend: Any) -> None:
        self._run_job = run_job
        self._backend = backend
        self.size = size
        self._slots = backend.semaphore(size)
        self._lock = threading.Lock()  # guards the lists only; never held while waiting
        self._idle: List[Worker] = []
        self._all: List[Worker] = []

    def acquire(self, timeout: float) -> Optional[Worker]:
        """An idle worker, a new one while under the bound, or None after `timeout` s."""
        if not self._slots.acquire(timeout=timeout):
            return None
        try:
            with self._lock:
                if self._idle:
                    return self._idle.pop()
                worker = Worker(len(self._all), self._run_job, self._backend)
                self._all.append(worker)
                return worker
        except BaseException:
            self._slots.release()  # no worker: give its slot back
            raise

    def release(self, worker: Worker) -> None:
        with self._lock:
            self._idle.append(worker)
        self._slots.release()

    def counts(self) -> "tuple[int, int]":
        """(workers in all, idle workers)."""
        with self._lock:
            return len(self._all), len(self._idle)

    def stop(self) -> None:
        """End the idle workers (uninstall); busy ones finish their handler and stay idle."""
        with self._lock:
            idle, self._idle = self._idle, []
            for worker in idle:
                self._all.remove(worker)
        for worker in idle:
            self._backend.retire(worker)


class ThreadBackend:
    name = "threading"

    def __init__(self, server: Any = None) -> None:
        pass

    lock = staticmethod(threading.Lock)
    clock = staticmethod(time.monotonic)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)

    @staticmethod
    def semaphore(n: int) -> Any:
        return threading.Semaphore(n)

    @staticmethod
    def mailbox() -> Mailbox:
        # SimpleQueue is C code with no Condition or deque of its own.
        return Mailbox(queue.SimpleQueue(), queue.Empty)

    poller = staticmethod(select.poll)

    @staticmethod
    def spawn(fn: Callable[[], None], name: str) -> Any:
        thread = threading.Thread(target=fn, name=name, daemon=True)
        thread.start()
        return thread

    @staticmethod
    def stack(worker: Worker) -> str:
        frame = sys._current_frames().get(worker._handle.ident or -1)
        return "".join(traceback.format_stack(frame)) if frame else "(no stack)\n"

    def worker_pool(self, run_job: Callable[[Worker, Any], None], size: int) -> WorkerPool:
        return WorkerPool(run_job, size, self)

    def run_handler(self, worker: Worker, handler: Callable, channel: Any) -> None:
        handler(channel.kong)

    def retire(self, worker: Worker) -> None:
        worker.stop()


class GeventBackend(ThreadBackend):
    """Greenlets. The engine's lock stays an OS lock: it is never held across a switch
    (nothing under it blocks), and kong-pdk does not monkey-patch threading."""

    name = "gevent"

    @staticmethod
    def sleep(seconds: float) -> None:
        import gevent

        gevent.sleep(seconds)

    @staticmethod
    def semaphore(n: int) -> Any:
        from gevent.lock import Semaphore

        return Semaphore(n)

    @staticmethod
    def mailbox() -> Mailbox:
        from gevent.queue import Empty, Queue

        return Mailbox(Queue(), Empty)  # buffered: a put never waits for its getter

    @staticmethod
    def poller() -> Any:
        from gevent.select import poll

        return poll()

    @staticmethod
    def spawn(fn: Callable[[], None], name: str) -> Any:
        import gevent

        greenlet = gevent.spawn(fn)
        greenlet.name = name
        return greenlet

    @staticmethod
    def stack(worker: Worker) -> str:
        frame = worker._handle.gr_frame
        return "".join(traceback.format_stack(frame)) if frame else "(no stack)\n"


# -- multiprocessing (-m) ---------------------------------------------------------------------

LINK_TIMEOUT = 10


class HandlerRaised(Exception):
    """A handler raised in its pool process; the message names the exception and holds the
    pool process's traceback."""


class PoolProcessDied(Exception):
    pass


class ProcessBackend(ThreadBackend):
    """Handlers run in upstream's multiprocessing pool (kong-pdk's `-m`), which pickles the
    plugin instance to a pool process for every event; so do we. Each worker thread here
    keeps one long-running task on one pool process, talking over one pipe kept as long as
    that process lives (upstream opens a pipe per event and leaks it when the event never
    ends)."""

    name = "multiprocessing"

    def __init__(self, server: Any) -> None:
        self._pool = server._process_pool
        self.processes = self._pool._processes
        self._lua_style = bool(server.lua_style)

    def run_handler(self, worker: Worker, handler: Callable, channel: Any) -> None:
        if worker.link is None:
            worker.link = self._open_link()
        link = worker.link
        try:
            link.send(handler)  # pickles the plugin instance, as upstream does
            while True:
                kind, payload = link.recv()
                if kind == CALL:
                    channel.put(payload)
                    if payload.get("Method") not in TERMINAL_METHODS:
                        link.send(channel.get())
                elif kind == FINISHED:
                    return
                else:
                    raise HandlerRaised(payload)
        except (EOFError, OSError) as ex:
            # The pool process died (upstream's pool starts another): start a new task there.
            link.close()
            worker.link = None
            raise PoolProcessDied("the pool process running the handler died (%r)" % ex) from None

    def _open_link(self) -> Any:
        parent, child = multiprocessing.Pipe(duplex=True)
        self._pool.apply_async(serve_in_pool_process, (child, self._lua_style))
        # The pool pickles `child` later, from its task thread: keep our copy open until the
        # task has started, then close it so that the pipe closes with the pool process.
        if not parent.poll(LINK_TIMEOUT):
            parent.close()
            child.close()
            raise PoolProcessDied("no pool process took the task within %d s" % LINK_TIMEOUT)
        _, pid = parent.recv()  # READY
        child.close()
        return Link(parent, pid)

    def retire(self, worker: Worker) -> None:
        if worker.link is not None:
            worker.link.close()  # the pool task sees EOF and ends
        worker.stop()


class Link:
    """A worker's pipe to the pool process serving it, and that process's pid.

    A pool process forked while another worker's link was being set up inherits that link's
    pool-side end, so the death of the process serving that link no longer shows as EOF. A
    wait for the pool process therefore also looks, once a second, whether it still lives."""

    def __init__(self, conn: Any, pid: int) -> None:
        self.conn = conn
        self.pid = pid

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def recv(self) -> Any:
        while not self.conn.poll(1.0):
            if not _alive(self.pid):
                raise EOFError("pool process %d is gone" % self.pid)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.close()


def _alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            # A zombie is dead: the pool reaps it only once its sentinel pipe closes, which a
            # process holding a copy of that pipe (a child of the plugin) can delay.
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: a zombie counts as alive until the pool reaps it
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _ChildChannel:
    """The pool process's side of a worker's pipe, given to kong-pdk's Kong(ch, lua_style)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def put(self, call: Any) -> None:
        self._conn.send((CALL, call))

    def get(self) -> Any:
        return self._conn.recv()  # (data, err): the engine's answer, a refusal included


def serve_in_pool_process(conn: Any, lua_style: bool) -> None:
    """A task that runs for the life of its pool process: one handler call per message."""
    from kong_pdk.pdk import Kong

    kong = Kong(_ChildChannel(conn), lua_style).kong
    conn.send((READY, os.getpid()))
    while True:
        try:
            handler = conn.recv()
        except (EOFError, OSError):
            return
        try:
            handler(kong)
        except BaseException as ex:  # noqa: B036 - report it, keep the pool process serving
            message = "%s: %s\n%s" % (type(ex).__name__, ex, traceback.format_exc())
            conn.send((FAILED, message))
        else:
            conn.send((FINISHED, None))


def for_server(server: Any) -> Any:
    if server.use_multiprocess:
        return ProcessBackend(server)
    if server.use_gevent:
        return GeventBackend(server)
    return ThreadBackend(server)


def pool_size(backend: Any, max_workers: int) -> int:
    # In -m a worker is pinned to a pool process: never more workers than processes.
    return min(max_workers, getattr(backend, "processes", max_workers))
