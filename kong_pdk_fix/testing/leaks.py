"""The leak guard: run one event many times and name whatever it left behind in the server.

The readings come from the same places as the project's own leak tests: the plugin server's
``GetStatus`` counters (``KongPdkFix``: live events, busy and stuck workers), kongsim's probe
plugin (queues, channels, greenlets and pipes, and kong-pdk's own event table), /proc
(threads, fds, child processes), and the kit's object probe (gc-tracked objects by type).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import kongsim
from .request import Request

if TYPE_CHECKING:
    from .server import EmulatedKong, Instance

OBJECTS_PROBE = "kong_pdk_fix_objects"
# What kong-pdk allocates per event (KONG_PROTOCOL.md's leak table): the "queues" of a report.
QUEUE_TYPES = ("Queue", "deque", "Condition", "Channel", "greenlet", "Connection")
# A leak is growth by one per EVENTS_PER_LEAK events or more, and at least MIN_GROWTH: less is
# noise (caches, pool warm-up, a few tens of objects of any type between two samples).
EVENTS_PER_LEAK = 2
MIN_GROWTH = 30
SETTLE_TIMEOUT = 5.0  # a handler may go on for a moment after its exit reply
NO_PID = -1
PROBE_TRIES = 20  # -m mode: probes until both run in the same pool process (as before)
NAMED_TYPES = 5


@dataclass(frozen=True)
class Sample:
    """The server's state at one moment (in -m mode, threads and fds include the pool)."""

    threads: int
    fds: int
    processes: int  # child processes of the server
    pid: int  # the process the probes ran in (a pool process in -m mode), or NO_PID
    queues: dict[str, int]
    upstream_events: int | None  # entries in kong-pdk's own event table (not in -m mode)
    objects: dict[str, int]  # gc-tracked objects by type
    grown: list[dict[str, Any]]  # containers that grew since the previous sample (the probe's)
    stats: dict[str, Any] | None  # GetStatus "KongPdkFix"; None on an unpatched server


@dataclass(frozen=True)
class LeakReport:
    """What ``events`` events of ``phase`` of ``plugin`` left behind; empty ``leaks`` if none.

    ``outcomes`` counts how the events ended (``{"exit": 200}``); ``before`` and ``after``
    are the samples the leaks were read from.
    """

    plugin: str
    phase: str
    mode: str
    events: int
    outcomes: dict[str, int]
    leaks: list[str]
    before: Sample
    after: Sample

    @property
    def ok(self) -> bool:
        return not self.leaks

    def __str__(self) -> str:
        ended = ", ".join(f"{kind} {n}" for kind, n in sorted(self.outcomes.items()))
        head = f"{self.events} {self.phase} events of plugin {self.plugin!r} ({self.mode} mode)"
        if self.ok:
            return f"{head} left nothing behind (ended: {ended})"
        lines = [f"{head} left behind:"] + [f"  {leak}" for leak in self.leaks]
        return "\n".join(lines + [f"(events ended: {ended})"])

    def raise_for_leaks(self) -> None:
        """Raise ``LeakError`` if anything leaked."""
        if self.leaks:
            raise LeakError(self)


class LeakError(AssertionError):
    """A leak guard failed; ``report`` is the ``LeakReport`` and the message names the leaks."""

    def __init__(self, report: LeakReport) -> None:
        super().__init__(str(report))
        self.report = report


def check_leaks(
    kong: EmulatedKong,
    instance: Instance,
    phase: str = "access",
    request: Request | None = None,
    *,
    events: int = 200,
    warmup: int = 20,
) -> LeakReport:
    """Run ``warmup`` events, sample, run ``events`` more, sample, and compare.

    Each event's PDK answers come from ``request`` (default: an empty ``GET /``). A leak is:
    an event the server still holds, a worker still busy or stuck (after waiting up to 5 s
    for handlers that go on after their exit reply), or a count of threads, fds, child
    processes, queues, objects of one type or items in one list, dict, set or deque that grew
    by at least one per two events (and at least 30); a container that grew is named by the
    module or class attribute holding it. In -m mode the probes read one pool process: a
    leak there is seen only if it happens in every pool process, and plugin instances
    (pickled per event) never grow.
    """
    request = request if request is not None else Request()
    for _ in range(warmup):
        kong.run(phase, instance, request)
    _settle(kong)
    before = _sample(kong)
    outcomes: Counter[str] = Counter()
    for _ in range(events):
        outcomes[kong.run(phase, instance, request).kind] += 1
    _settle(kong)
    limit = max(MIN_GROWTH, events // EVENTS_PER_LEAK)
    after = _sample(kong, limit, pid=before.pid)
    return LeakReport(
        plugin=instance.name,
        phase=phase,
        mode=kong.mode,
        events=events,
        outcomes=dict(outcomes),
        leaks=_leaks(before, after, limit),
        before=before,
        after=after,
    )


def _settle(kong: EmulatedKong) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        stats = kong.stats()
        if stats is None or (_live(stats) == 0 and stats["workers"]["busy"] == 0):
            return
        time.sleep(0.05)


def _live(stats: Mapping[str, Any]) -> int:
    return sum(stats["events"].values())


def _sample(kong: EmulatedKong, limit: int | None = None, pid: int | None = None) -> Sample:
    # Without ``limit`` the object probe takes its baseline; with it, it also lists the
    # containers that grew by that much since. ``pid``: the process the probes must run in.
    server = kong.server
    children = server.children()
    pids = [server.pid] + children
    for _ in range(PROBE_TRIES):
        queues = kongsim.probe_heap(kong.worker)
        objects = _objects_probe(kong, limit)
        if queues["pid"] == objects["pid"] == (pid or objects["pid"]):
            probed = objects["pid"]
            break
    else:
        probed = NO_PID  # the probe readings of this sample are not compared
    return Sample(
        threads=sum(server.threads(p) for p in pids),
        fds=sum(server.fds(p) for p in pids),
        processes=len(children),
        pid=probed,
        queues={name: queues.get(name, 0) for name in QUEUE_TYPES},
        upstream_events=None if kong.mode == "process" else queues.get("upstream_events"),
        objects=objects["objects"],
        grown=objects["grown"],
        stats=kong.stats(),
    )


def _objects_probe(kong: EmulatedKong, limit: int | None) -> dict[str, Any]:
    config = {} if limit is None else {"limit": limit}
    outcome = kong.worker.run_event(OBJECTS_PROBE, "access", kongsim.ScriptedPDK(), config)
    for method, args in outcome.calls:
        if method == "kong.log.notice" and args:
            return json.loads(args[0])
    raise RuntimeError(f"object probe sent no report: {outcome.kind} {outcome.error}")


def _leaks(before: Sample, after: Sample, limit: int) -> list[str]:
    leaks = []
    if after.stats is not None:
        running, waiting = after.stats["events"]["running"], after.stats["events"]["waiting_kong"]
        if running or waiting:
            leaks.append(
                f"events: {running + waiting} still live in the plugin server "
                f"({running} running, {waiting} waiting for Kong)"
            )
        workers = after.stats["workers"]
        if workers["busy"]:
            leaks.append(f"workers: {workers['busy']} still busy (handlers that never returned)")
        if workers["stuck"]:
            leaks.append(f"workers: {workers['stuck']} stuck past handler_timeout")
    if after.upstream_events is not None and after.upstream_events > (before.upstream_events or 0):
        leaks.append(
            f"events: kong-pdk's event table grew from {before.upstream_events} "
            f"to {after.upstream_events}"
        )
    for name in ("threads", "fds", "processes"):
        was, now = getattr(before, name), getattr(after, name)
        if now - was >= limit:
            leaks.append(f"{name}: {was} -> {now} (+{now - was})")
    if after.pid == NO_PID:
        # -m mode: the probes could not reach the same pool process twice.
        return leaks
    queues = _grown(before.queues, after.queues, limit)
    if queues:
        leaks.append("queues: " + ", ".join(queues))
    objects = _grown(before.objects, after.objects, limit, exclude=QUEUE_TYPES)
    if objects:
        leaks.append("objects: " + ", ".join(objects[:NAMED_TYPES]))
    for grown in sorted(after.grown, key=lambda c: -c["growth"])[:NAMED_TYPES]:
        where = grown["owner"] or "(held by no module or class attribute)"
        leaks.append(
            f"containers: {where}, a {grown['type']} now of {grown['length']} items "
            f"(+{grown['growth']})"
        )
    return leaks


def _grown(
    before: Mapping[str, int], after: Mapping[str, int], limit: int, exclude: tuple[str, ...] = ()
) -> list[str]:
    # "name +growth" for every type that grew by ``limit`` or more, most first; ``exclude``
    # names types by their bare class name, as kongsim's probe does.
    growth = {
        name: n - before.get(name, 0)
        for name, n in after.items()
        if name.rpartition(".")[2] not in exclude and n - before.get(name, 0) >= limit
    }
    return [f"{name} +{n}" for name, n in sorted(growth.items(), key=lambda kv: (-kv[1], kv[0]))]
