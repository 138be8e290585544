"""The ways an event ends besides "ret" (KONG_PROTOCOL.md): a handler that raises, Kong that
goes silent, a PDK call after exit, a handler that never returns, overload. Each is first
shown to hang or leak on upstream (KONG_PDK_FIX_DISABLE=1), then answered with the fix."""

from __future__ import annotations

import socket

import msgpack
import pytest
from servers import MODES, RawConnection, running_server, wait_until

from kong_pdk_fix.kongsim import STALL, LuaError, ScriptedPDK, drive

TTL_ENV = {"KONG_PDK_FIX_EVENT_TTL": "1"}


# -- a handler that raises -------------------------------------------------------------------


@pytest.mark.upstream
@pytest.mark.parametrize("mode", MODES)
def test_upstream_freezes_when_a_handler_raises_before_its_first_pdk_call(tmp_path, mode):
    with running_server(
        tmp_path, patched=False, plugins=["raises", "noop"], mode=mode, read_timeout=2.0
    ) as srv:
        assert srv.run("raises").kind == "timeout"
        # e_lock is still held: another plugin's event on another connection hangs too.
        assert srv.run("noop").kind == "timeout"


@pytest.mark.parametrize("mode", MODES)
def test_a_raising_handler_is_answered_and_the_server_keeps_serving(tmp_path, mode):
    with running_server(
        tmp_path, patched=True, plugins=["raises", "noop"], mode=mode, read_timeout=5.0
    ) as srv:
        outcome = srv.run("raises")
        assert outcome.kind == "rpc_error"
        assert "raises" in outcome.error and "access" in outcome.error
        assert "RuntimeError" in outcome.error
        assert srv.run("noop").kind == "ret"
        stats = srv.shim_stats()
        assert stats["ended"]["raised"] == 1
        assert stats["events"] == {"running": 0, "waiting_kong": 0}
        assert stats["workers"]["busy"] == 0
    log = srv.server.output()
    assert "Traceback" in log and "RuntimeError" in log


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("patched", [False, True], ids=["upstream", "patched"])
def test_a_handler_raising_after_a_pdk_call(tmp_path, patched, mode):
    with running_server(
        tmp_path,
        patched=patched,
        plugins=["raises_later"],
        mode=mode,
        read_timeout=10.0 if patched else 2.0,  # upstream must time out; patched answers
    ) as srv:
        outcome = srv.run("raises_later")
        if not patched:
            assert outcome.kind == "timeout"  # the Step is never answered
            return
        assert outcome.kind == "rpc_error" and "raises_later" in outcome.error
        assert srv.live_events() == 0


def test_fail_closed_answers_with_a_500(tmp_path):
    env = {"KONG_PDK_FIX_ON_ERROR": "fail-closed"}
    with running_server(tmp_path, patched=True, plugins=["raises"], env=env) as srv:
        outcome = srv.run("raises")
        assert outcome.kind == "error"
        assert outcome.terminal == {"Method": "kong.response.error", "Args": [500]}
        # Kong's log phase is not a place to answer the request: fail open there.
        assert srv.live_events() == 0


# -- Kong goes silent mid-event ----------------------------------------------------------------

SILENT_KONG = {
    "stall": STALL,  # Kong's 60 s timeout, a worker reload
    "lua_error": LuaError("bad argument #1 to 'get_header'"),  # the PDK call raised in Lua
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", sorted(SILENT_KONG))
def test_events_kong_stops_stepping_are_reaped(tmp_path, how, mode):
    """Two batches of events Kong stops stepping: with the fix they are reaped after
    event_ttl and the second batch reuses the workers (upstream: the tests below)."""
    n = 4 if mode == "process" else 40  # -m: as many workers as pool processes (2 here)
    pdk = lambda: ScriptedPDK({"kong.request.get_header": SILENT_KONG[how]})  # noqa: E731
    with running_server(
        tmp_path, patched=True, plugins=["pdk_calls"], env=TTL_ENV, mode=mode
    ) as srv:
        srv.run("pdk_calls")
        threads = []
        for _ in range(2):
            kinds = srv.repeat(n, "pdk_calls", pdk)
            assert kinds == {how if how == "lua_error" else "abandoned": n}
            assert wait_until(lambda: _idle(srv), 3.0), srv.shim_stats()
            threads.append(srv.server.threads())
        assert srv.shim_stats()["ended"]["abandoned"] == 2 * n
        assert threads[1] - threads[0] < 10, threads


@pytest.mark.upstream
def test_upstream_keeps_a_thread_per_event_kong_stopped_stepping(tmp_path):
    n = 40
    pdk = lambda: ScriptedPDK({"kong.request.get_header": STALL})  # noqa: E731
    with running_server(tmp_path, patched=False, plugins=["pdk_calls"]) as srv:
        srv.run("pdk_calls")
        before = srv.sample()
        srv.repeat(n, "pdk_calls", pdk)
        wait_until(lambda: False, 1.5)  # as long as the reaper takes with the fix
        after = srv.sample()
    assert after.threads - before.threads >= 0.9 * n  # give or take the probe's own
    assert after.objects - before.objects >= 0.9 * n


@pytest.mark.upstream
def test_upstream_keeps_a_greenlet_per_event_kong_stopped_stepping(tmp_path):
    n = 40
    pdk = lambda: ScriptedPDK({"kong.request.get_header": STALL})  # noqa: E731
    with running_server(tmp_path, patched=False, plugins=["pdk_calls"], mode="gevent") as srv:
        srv.run("pdk_calls")
        before = srv.sample()
        srv.repeat(n, "pdk_calls", pdk)
        wait_until(lambda: False, 1.5)
        after = srv.sample()
    assert after.counts["greenlet"] - before.counts["greenlet"] >= 0.9 * n


@pytest.mark.upstream
def test_upstream_pins_a_pool_process_per_event_kong_stopped_stepping(tmp_path):
    pdk = lambda: ScriptedPDK({"kong.request.get_header": STALL})  # noqa: E731
    with running_server(
        tmp_path, patched=False, plugins=["pdk_calls", "noop"], mode="process", read_timeout=3.0
    ) as srv:
        pool = len(srv.server.children())
        srv.repeat(pool, "pdk_calls", pdk)
        wait_until(lambda: False, 1.5)
        assert srv.run("noop").kind == "timeout"


def _idle(srv) -> bool:
    stats = srv.shim_stats()
    return sum(stats["events"].values()) == 0 and stats["workers"]["busy"] == 0


def test_a_connection_that_dies_mid_event_leaves_nothing(tmp_path):
    """Kong goes away halfway through sending the event's Step: the server closes that
    connection, and the event, which never gets its Step, is reaped."""
    with running_server(tmp_path, patched=True, plugins=["pdk_calls"], env=TTL_ENV) as srv:
        iid = srv.kong.start_instance("pdk_calls")
        reply = srv.kong.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
        raw = msgpack.packb([0, 99, "plugin.Step", [{"EventId": reply["EventId"], "Data": "x"}]])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(srv.server.socket_path)
            conn.sendall(raw[:-3])
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(1024) == b""  # closed with no reply: nothing to answer
        assert wait_until(lambda: _idle(srv), 3.0), srv.shim_stats()
        assert srv.shim_stats()["ended"]["abandoned"] == 1
        assert srv.run("pdk_calls").kind == "ret"


# -- one event, several connections -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_an_events_calls_may_move_between_connections(tmp_path, mode):
    """KONG_PROTOCOL.md: consecutive calls of one event may arrive on different connections,
    and a connection carries calls of other events meanwhile. The worker answers on whichever
    connection the event's last call came on and hands back the one it was reading."""
    with running_server(tmp_path, patched=True, plugins=["pdk_calls"], mode=mode) as srv:
        iid = srv.kong.start_instance("pdk_calls")
        path = srv.server.socket_path
        with RawConnection(path) as a, RawConnection(path) as b:
            data = a.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})[3]
            eid = data["EventId"]
            assert data["Data"]["Method"] == "kong.request.get_header"
            # While the event waits for Kong its worker reads `a`: another call there is served.
            assert a.call("plugin.GetStatus", None)[2] is None
            data = b.call("plugin.Step", {"EventId": eid, "Data": "example.com"})[3]
            assert data["Data"]["Method"] == "kong.request.get_headers"
            assert a.call("plugin.GetStatus", None)[2] is None
            data = a.call("plugin.Step", {"EventId": eid, "Data": {"host": ["example.com"]}})[3]
            assert data["Data"]["Method"] == "kong.response.set_header"
            assert b.call("plugin.GetStatus", None)[2] is None
            assert b.call("plugin.Step", {"EventId": eid, "Data": None})[3] == {
                "Data": "ret",
                "EventId": eid,
            }
            # Both connections are still served, by their own listener threads.
            assert a.call("plugin.GetStatus", None)[2] is None
            assert b.call("plugin.GetStatus", None)[2] is None
        assert wait_until(lambda: _idle(srv), 3.0), srv.shim_stats()
        assert srv.shim_stats()["ended"]["ret"] == 1


# -- a PDK call after kong.response.exit --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lua_style", [True, False], ids=["lua-style", "python-style"])
def test_a_pdk_call_after_exit_fails_fast(tmp_path, lua_style, mode):
    env = {"KONG_PDK_FIX_MAX_WORKERS": "1"}  # both events in one worker (one pool process)
    with running_server(
        tmp_path,
        patched=True,
        plugins=["report_after_exit"],
        env=env,
        lua_style=lua_style,
        read_timeout=5.0,
        mode=mode,
    ) as srv:
        first = srv.run("report_after_exit")
        second = srv.run("report_after_exit")
    assert first.kind == "exit" and second.kind == "exit"
    method, args = second.calls[0]
    assert method == "kong.log.notice"
    if lua_style:
        assert args[0].startswith("returned (None, 'kong.request.get_header not sent to Kong")
    else:
        assert args[0].startswith("PDKException: ")
    assert "already ended: kong.response.exit was called" in args[0]


@pytest.mark.upstream
def test_upstream_blocks_a_pdk_call_after_exit_for_ever(tmp_path):
    with running_server(tmp_path, patched=False, plugins=["report_after_exit"]) as srv:
        threads = srv.server.threads()
        srv.run("report_after_exit")
        second = srv.run("report_after_exit")
        # The first event's handler never got an answer, so it had nothing to report.
        assert second.calls[0][0] == "kong.response.exit"
        assert srv.server.threads() - threads >= 2


# -- a handler that never returns ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_handler_past_handler_timeout_gets_an_error_reply(tmp_path, mode):
    env = {"KONG_PDK_FIX_HANDLER_TIMEOUT": "0.3"}
    with running_server(tmp_path, patched=True, plugins=["slow"], env=env, mode=mode) as srv:
        outcome = srv.kong.run_event("slow", "access", ScriptedPDK(), {"sleep": 1.5})
        assert outcome.kind == "rpc_error" and "handler_timeout" in outcome.error
        assert srv.shim_stats()["workers"]["stuck"] == 1
        assert wait_until(lambda: srv.shim_stats()["workers"]["stuck"] == 0, 5.0)
        assert _idle(srv)
        assert srv.shim_stats()["ended"]["timeout"] == 1
    log = srv.server.output()
    assert "still running after" in log
    # the stuck worker's stack (in -m the handler's own frames are in the pool process)
    assert ("slow.py" if mode != "process" else "run_handler") in log


# -- more events than workers ------------------------------------------------------------------


def test_overload_is_a_clear_error_not_a_new_thread(tmp_path):
    env = {"KONG_PDK_FIX_MAX_WORKERS": "2", "KONG_PDK_FIX_OVERLOAD_TIMEOUT": "0.2"}
    with running_server(tmp_path, patched=True, plugins=["slow"], env=env) as srv:
        threads = srv.server.threads()
        result = drive(srv.kong, [("slow", "access", None, {"sleep": 1.0})], count=6, concurrency=6)
        assert result.by_kind["ret"] >= 2
        assert result.by_kind["rpc_error"] >= 2
        assert all("overloaded" in text for text in result.errors)
        assert srv.shim_stats()["overloaded"] == result.by_kind["rpc_error"]
        # two workers at most, the reaper, and upstream's listener thread per connection
        assert srv.server.threads() - threads <= 2 + 1 + 6


@pytest.mark.parametrize("mode", ["thread", "gevent"])  # -m: the peak is per pool process
@pytest.mark.parametrize("patched", [False, True], ids=["upstream", "patched"])
def test_concurrent_events_are_not_serialised(tmp_path, patched, mode):
    """Upstream holds a server-wide lock until a handler's first PDK call; with the fix,
    handlers that block before it run side by side (counted by the handlers, not a clock)."""
    with running_server(tmp_path, patched=patched, plugins=["slow"], mode=mode) as srv:
        result = drive(
            srv.kong,
            [("slow", "access", None, {"sleep": 0.3, "report_peak": True})],
            count=8,
            concurrency=4,
        )
        assert result.by_kind == {"ret": 8}, result.errors
        outcome = srv.kong.run_event(
            "slow", "access", ScriptedPDK(), {"sleep": 0.0, "report_peak": True}
        )
    peak = int(outcome.calls[-1][1][0].split()[1])
    assert (peak > 1) if patched else (peak == 1), peak


# -- a pool process dies (-m) ------------------------------------------------------------------


@pytest.mark.parametrize("patched", [False, True], ids=["upstream", "patched"])
def test_a_pool_process_that_dies_is_replaced_and_its_event_answered(tmp_path, patched):
    with running_server(
        tmp_path,
        patched=patched,
        plugins=["dies", "noop"],
        mode="process",
        # Upstream must time out. Patched answers at once, but first its worker links to a pool
        # process, which on a loaded machine can take seconds; a Kong timeout must not be it.
        read_timeout=30.0 if patched else 3.0,
    ) as srv:
        pool = len(srv.server.children())
        outcome = srv.run("dies")
        if not patched:
            assert outcome.kind == "timeout"
            assert srv.run("noop").kind == "timeout"  # e_lock is held for good
            return
        assert outcome.kind == "rpc_error" and "pool process" in outcome.error
        assert srv.run("noop").kind == "ret"
        assert wait_until(lambda: len(srv.server.children()) == pool, 5.0)
        assert _idle(srv)


def test_a_pool_process_death_is_seen_when_its_pipe_stays_open(tmp_path):
    """Another process may hold the pool side of a worker's pipe (here a child the plugin
    forked; in production a pool process forked while a link was being set up), so the death
    shows as no EOF: the worker also watches the pool process itself."""
    with running_server(
        tmp_path, patched=True, plugins=["dies_leaving_a_child", "noop"], mode="process"
    ) as srv:
        outcome = srv.run("dies_leaving_a_child")
        assert outcome.kind == "rpc_error" and "pool process" in outcome.error, outcome
        assert srv.run("noop").kind == "ret"
        assert wait_until(lambda: _idle(srv), 5.0), srv.shim_stats()
