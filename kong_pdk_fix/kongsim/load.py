"""Load driver and probes: many events through one emulated Kong, and what the server holds."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .kong import Kong
from .pdk import ScriptedPDK

PROBE_NAME = "kong_pdk_fix_probe"
PROBE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins", PROBE_NAME + ".py")
ERROR_TEXT_LIMIT = 200

Scenario = tuple[str, str, Optional[ScriptedPDK], Optional[dict[str, Any]]]


@dataclass
class DriveResult:
    """What ``drive`` saw: outcome kinds, error texts, timing and the side samples."""

    events: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    events_per_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    samples: list[tuple[float, Any]] = field(default_factory=list)  # (seconds since start, value)


def drive(
    kong: Kong,
    scenarios: Sequence[Scenario],
    *,
    count: int | None = None,
    duration: float | None = None,
    concurrency: int = 1,
    sample: tuple[float, Callable[[], Any]] | None = None,
) -> DriveResult:
    """Run events ``(plugin, phase, pdk, config)`` round-robin from ``concurrency`` threads.

    Stops after ``count`` events or ``duration`` seconds, whichever comes first (one of them
    is required); each event is bounded by Kong's read timeout. ``sample=(every_s, fn)`` calls
    ``fn()`` at the start, every ``every_s`` seconds and at the end, from a side thread; a
    sample that raises is recorded as the exception.
    """
    if count is None and duration is None:
        raise ValueError("drive needs count or duration")
    if not scenarios:
        raise ValueError("drive needs at least one scenario")
    result = DriveResult()
    lock = threading.Lock()
    started = time.monotonic()
    deadline = None if duration is None else started + duration
    next_index = [0]

    def take() -> Scenario | None:
        with lock:
            i = next_index[0]
            if (count is not None and i >= count) or (
                deadline is not None and time.monotonic() >= deadline
            ):
                return None
            next_index[0] = i + 1
        return scenarios[i % len(scenarios)]

    def worker() -> None:
        scenario = take()
        while scenario is not None:
            name, phase, pdk, config = scenario
            outcome = kong.run_event(name, phase, pdk, config)
            with lock:
                result.events += 1
                result.by_kind[outcome.kind] += 1
                if outcome.error is not None:
                    result.errors[outcome.error[:ERROR_TEXT_LIMIT]] += 1
                result.latencies.append(outcome.latency)
            scenario = take()

    def take_sample(fn: Callable[[], Any]) -> None:
        try:
            value = fn()
        except Exception as ex:  # noqa: BLE001 (a dead server must not stop the run)
            value = ex
        result.samples.append((time.monotonic() - started, value))

    stop = threading.Event()

    def sampler(every_s: float, fn: Callable[[], Any]) -> None:
        take_sample(fn)
        while not stop.wait(every_s):
            take_sample(fn)
        take_sample(fn)  # the state after the last event

    side = None
    if sample is not None:
        side = threading.Thread(target=sampler, args=sample, daemon=True)
        side.start()
    workers = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, concurrency))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if side is not None:
        stop.set()
        side.join()
    result.elapsed = time.monotonic() - started
    result.events_per_s = result.events / result.elapsed if result.elapsed > 0 else 0.0
    return result


def install_probe(plugins_dir: str) -> str:
    """Copy the probe plugin (``kong_pdk_fix_probe``) into ``plugins_dir``; returns its path."""
    target = os.path.join(plugins_dir, PROBE_NAME + ".py")
    shutil.copyfile(PROBE_FILE, target)
    return target


def probe_heap(kong: Kong, heap: bool = False) -> dict[str, Any]:
    """Run the probe's access event and return its report.

    The report maps class names to live objects of that kind, the probe's own event included
    (``deque``, ``Queue``, ``Condition``, ``Thread``, ``Event``, ``Connection``, ``greenlet``
    if importable, ``Channel`` if gevent is imported), plus ``pid``, ``active_count``
    (``threading.active_count()``) and, with ``heap``, ``heap``: guppy3's top 15 rows by type
    as ``{kind, count, size}`` (``None`` if guppy3 is not installed in the server). In
    multiprocessing mode the handler runs in a pool process, so the report is that pool
    process's.
    """
    outcome = kong.run_event(PROBE_NAME, "access", ScriptedPDK(), {"heap": bool(heap)})
    for method, args in outcome.calls:
        if method == "kong.log.notice" and args:
            return json.loads(args[0])
    raise RuntimeError(f"probe sent no report: {outcome.kind} {outcome.error}")
