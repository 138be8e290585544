"""Where plugin handlers run: a bounded pool of reused workers, each with its own reused pair
of one-slot mailboxes. The engine decides what goes through them; this module only moves
things and knows nothing of Kong.

Threading mode (kong-pdk's default) is here; a backend gives the engine `lock()`, `clock()`,
`spawn(fn)` for its reaper, and a `WorkerPool`.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from typing import Any, Callable, List, Optional

# What Mailbox.get answers when its timeout ran out.
TIMED_OUT = object()
# Put into a worker's inbox to end its loop (uninstall, tests).
STOP = object()


class Mailbox:
    """A reusable one-way channel that never holds more than one message.

    queue.SimpleQueue is C code with no Condition or deque per instance; one lives as long as
    its worker, instead of two Queues per event as upstream allocates."""

    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: "queue.SimpleQueue[Any]" = queue.SimpleQueue()

    def put(self, message: Any) -> None:
        self._q.put(message)

    def get(self, timeout: Optional[float] = None) -> Any:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return TIMED_OUT

    def get_nowait(self) -> Any:
        try:
            return self._q.get_nowait()
        except queue.Empty:
            return TIMED_OUT


class Worker:
    """One reused thread. `inbox` brings it a job, then Kong's answers to its PDK calls;
    `outbox` carries its PDK calls and its final message back to the engine."""

    def __init__(self, index: int, run_job: Callable[["Worker", Any], None]) -> None:
        self.index = index
        self.inbox = Mailbox()
        self.outbox = Mailbox()
        self.state: Any = None  # the engine's per-worker data (its PDK bridge)
        self._run_job = run_job
        self._thread = threading.Thread(
            target=self._loop, name="kong-pdk-fix-worker-%d" % index, daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self.inbox.get()
            if job is STOP:
                return
            self._run_job(self, job)

    def stack(self) -> str:
        """Where the worker's handler is now, for the stuck-worker report."""
        frame = sys._current_frames().get(self._thread.ident or -1)
        if frame is None:
            return "(no stack: the worker thread is gone)\n"
        return "".join(traceback.format_stack(frame))

    def stop(self, timeout: Optional[float] = None) -> None:
        self.inbox.put(STOP)
        self._thread.join(timeout)


class WorkerPool:
    """At most `max_workers()` workers, created on demand and kept; idle ones are reused last
    in, first out, so a few hot threads serve a light load."""

    def __init__(self, run_job: Callable[[Worker, Any], None],
                 max_workers: Callable[[], int]) -> None:
        self._run_job = run_job
        self._max_workers = max_workers
        self._cond = threading.Condition(threading.Lock())
        self._idle: List[Worker] = []
        self._all: List[Worker] = []

    def acquire(self, timeout: float) -> Optional[Worker]:
        """An idle worker, a new one while under the bound, or None after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._idle:
                    return self._idle.pop()
                if len(self._all) < self._max_workers():
                    worker = Worker(len(self._all), self._run_job)
                    self._all.append(worker)
                    return worker
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def release(self, worker: Worker) -> None:
        with self._cond:
            self._idle.append(worker)
            self._cond.notify()

    def counts(self) -> "tuple[int, int]":
        """(workers in all, idle workers)."""
        with self._cond:
            return len(self._all), len(self._idle)

    def stop(self) -> None:
        """End every idle worker's thread; busy ones end when their handler returns."""
        with self._cond:
            idle, self._idle = self._idle, []
            for worker in idle:
                self._all.remove(worker)
        for worker in idle:
            worker.stop(timeout=1.0)


class ThreadBackend:
    name = "threading"

    @staticmethod
    def lock() -> Any:
        return threading.Lock()

    @staticmethod
    def clock() -> float:
        return time.monotonic()

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)

    @staticmethod
    def spawn(fn: Callable[[], None], name: str) -> None:
        threading.Thread(target=fn, name=name, daemon=True).start()

    @staticmethod
    def worker_pool(run_job: Callable[[Worker, Any], None],
                    max_workers: Callable[[], int]) -> WorkerPool:
        return WorkerPool(run_job, max_workers)
