"""Property tests of DESIGN.md's invariants against a real patched plugin server per mode.

Hypothesis writes event scripts: what each handler does (PDK calls, kong.response.exit/error,
a raise, PDK calls after those), what Kong does meanwhile (answers, goes silent, gets a Lua
error, hangs up mid-event), spread over several concurrent Kong threads sharing one keepalive
pool (or a new connection per call), so the calls of one event arrive on different
connections. A small model says how each event must end; then:
- every event ends exactly once, and as the model says (the shim's "ended" counters grow by
  exactly the model's causes, and Kong sees the model's outcome);
- when traffic stops, the event table is empty, no worker is busy or stuck, and no thread is
  left besides the pool's.
Derandomised and small, so CI runs the same examples every time in well under a minute.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import MODES, RawConnection, Running, idle, running_server, wait_until

from kong_pdk_fix.kongsim import STALL, LuaError, ScriptedPDK

ENV = {
    "KONG_PDK_FIX_EVENT_TTL": "1",  # events Kong dropped are reaped within about 1.25 s
    # -m has a worker per pool process (2 on CI): events wait for the reaper, not overload
    "KONG_PDK_FIX_OVERLOAD_TIMEOUT": "30",
}
EXAMPLES = {"thread": 25, "gevent": 15, "process": 10}
STEPS = ("get", "set", "exit", "error", "raise")
KONG = ("answer", "answer", "stall", "lua_error", "hangup")  # answering is the common case
TERMINAL = {"exit": "exit", "error": "error", "raise": "raised"}
# How Kong sees an event that ended with each cause (kongsim's Outcome.kind).
KIND = {"ret": "ret", "exit": "exit", "error": "error", "raised": "rpc_error"}
CAUSES = ("ret", "exit", "error", "raised", "timeout", "abandoned")


@dataclass(frozen=True)
class Event:
    """One event of tests/plugins/scripted.py: its script, and what Kong does at PDK call
    (stall, lua_error) or message (hangup: HandleEvent is message 0, the k-th Step message k)
    number `at`."""

    script: Tuple[str, ...]
    kong: str
    at: int

    def calls_to_kong(self) -> int:
        """PDK calls that reach Kong: those before the first exit, error or raise."""
        n = 0
        for step in self.script:
            if step in TERMINAL:
                break
            n += 1
        return n

    def final(self) -> str:
        for step in self.script:
            if step in TERMINAL:
                return TERMINAL[step]
        return "ret"

    def expected(self) -> Tuple[str, Optional[str]]:
        """(why the server ends it, what Kong sees: None when Kong hung up)."""
        n = self.calls_to_kong()
        if self.kong in ("stall", "lua_error") and self.at < n:
            return "abandoned", "abandoned" if self.kong == "stall" else "lua_error"
        if self.kong == "hangup" and self.at <= n:
            # the handler runs on to its next PDK call (then waits for ever) or its end
            return ("abandoned" if self.at < n else self.final()), None
        return self.final(), KIND[self.final()]

    def config(self) -> dict:
        return {"script": list(self.script)}


events = st.builds(
    Event,
    script=st.lists(st.sampled_from(STEPS), max_size=4).map(tuple),
    kong=st.sampled_from(KONG),
    at=st.integers(0, 3),
)
# Events per concurrent Kong thread, and whether Kong pools its connections.
examples = st.tuples(
    st.lists(st.lists(events, min_size=1, max_size=4), min_size=1, max_size=3),
    st.booleans(),
)


def kong_pdk(event: Event) -> ScriptedPDK:
    """Kong's PDK for one event: nil for every call, but silence or a Lua error at `at`."""
    numbers = itertools.count()

    def answer(*args: Any) -> Any:
        number = next(numbers)
        if number == event.at and event.kong == "stall":
            return STALL
        if number == event.at and event.kong == "lua_error":
            return LuaError("bad argument #1")
        return None

    return ScriptedPDK(default=answer, record=False)


def hang_up(srv: Running, iid: int, at: int) -> None:
    """Kong's loop for one event, on one connection, closed right after sending message
    `at` without reading its reply (a Kong worker that died)."""
    with RawConnection(srv.server.socket_path, timeout=30.0) as conn:
        msgid = 1
        conn.send_message(
            [0, msgid, "plugin.HandleEvent", [{"InstanceId": iid, "EventName": "access"}]]
        )
        for _ in range(at):
            reply = conn.reply()
            assert reply[:3] == [1, msgid, None] and isinstance(reply[3]["Data"], dict), reply
            msgid += 1
            conn.send_message([0, msgid, "plugin.Step", [{"EventId": reply[3]["EventId"]}]])


def run_example(srv: Running, threads: List[List[Event]], pooled: bool) -> None:
    before = srv.shim_stats()
    threads_before = srv.server.threads() - before["workers"]["busy"] - before["workers"]["idle"]
    kong = srv.server.kong(read_timeout=30.0, event_connection_policy="pool" if pooled else "fresh")
    seen: List[Tuple[Event, Any]] = []
    failures: List[BaseException] = []
    lock = threading.Lock()

    def run(sequence: List[Event]) -> None:
        try:
            for event in sequence:
                if event.kong == "hangup" and event.at <= event.calls_to_kong():
                    hang_up(srv, kong.instance_id("scripted", event.config()), event.at)
                    outcome = None
                else:
                    outcome = kong.run_event("scripted", "access", kong_pdk(event), event.config())
                with lock:
                    seen.append((event, outcome))
        except BaseException as ex:  # noqa: BLE001 - reported below, in the test's thread
            failures.append(ex)

    try:
        workers = [threading.Thread(target=run, args=(seq,), daemon=True) for seq in threads]
        for t in workers:
            t.start()
        for t in workers:
            t.join(120)
    finally:
        kong.close()
    assert not failures, failures

    for event, outcome in seen:
        cause, kind = event.expected()
        if kind is not None:
            assert outcome.kind == kind, (event, outcome)
    n = sum(len(seq) for seq in threads)

    def settled() -> bool:
        # A HandleEvent Kong hung up on may still be on its way through the listener.
        stats = srv.shim_stats()
        return stats["started"] - before["started"] >= n and idle(srv)

    assert wait_until(settled, 5.0), srv.shim_stats()
    after = srv.shim_stats()
    assert after["started"] - before["started"] == n, (before, after)
    ended = Counter({c: after["ended"][c] - before["ended"][c] for c in CAUSES})
    expected = Counter(event.expected()[0] for seq in threads for event in seq)
    assert +ended == expected, (ended, expected, threads)
    # no thread is left besides the pool's workers (connections closed, handlers returned)
    workers_now = after["workers"]["busy"] + after["workers"]["idle"]
    assert workers_now <= after["workers"]["max"]
    assert wait_until(
        lambda: srv.server.threads() - workers_now <= max(threads_before, 0) + 2, 3.0
    ), (srv.server.threads(), workers_now, threads_before)


@pytest.mark.parametrize("mode", MODES)
def test_every_event_ends_exactly_once_and_nothing_stays(tmp_path, mode):
    with running_server(
        tmp_path, patched=True, plugins=["scripted"], mode=mode, env=ENV, read_timeout=30.0
    ) as srv:

        @settings(
            max_examples=EXAMPLES[mode],
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(example=examples)
        def check(example: Tuple[List[List[Event]], bool]) -> None:
            threads, pooled = example
            run_example(srv, threads, pooled)

        check()
