"""The ways an event ends besides "ret" (KONG_PROTOCOL.md): a handler that raises, Kong that
goes silent, a PDK call after exit, a handler that never returns, overload. Each is first
shown to hang or leak on upstream (KONG_PDK_FIX_DISABLE=1), then answered with the fix."""

from __future__ import annotations

import socket

import msgpack
import pytest
from servers import running_server, wait_until

from kong_pdk_fix.kongsim import STALL, LuaError, ScriptedPDK, drive

TTL_ENV = {"KONG_PDK_FIX_EVENT_TTL": "1"}


# -- a handler that raises -------------------------------------------------------------------


@pytest.mark.upstream
def test_upstream_freezes_when_a_handler_raises_before_its_first_pdk_call(tmp_path):
    with running_server(tmp_path, patched=False, plugins=["raises", "noop"],
                        read_timeout=2.0) as srv:
        assert srv.run("raises").kind == "timeout"
        # e_lock is still held: another plugin's event on another connection hangs too.
        assert srv.run("noop").kind == "timeout"


def test_a_raising_handler_is_answered_and_the_server_keeps_serving(tmp_path):
    with running_server(tmp_path, patched=True, plugins=["raises", "noop"],
                        read_timeout=5.0) as srv:
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


@pytest.mark.parametrize("patched", [False, True], ids=["upstream", "patched"])
def test_a_handler_raising_after_a_pdk_call(tmp_path, patched):
    with running_server(tmp_path, patched=patched, plugins=["raises_later"],
                        read_timeout=2.0) as srv:
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


@pytest.mark.parametrize("how", sorted(SILENT_KONG))
@pytest.mark.parametrize("patched", [False, True], ids=["upstream", "patched"])
def test_events_kong_stops_stepping_are_reaped(tmp_path, how, patched):
    """Two batches of events Kong stops stepping: upstream keeps a blocked thread for each;
    with the fix they are reaped after event_ttl and the second batch reuses the workers."""
    n = 40
    pdk = lambda: ScriptedPDK({"kong.request.get_header": SILENT_KONG[how]})  # noqa: E731
    with running_server(tmp_path, patched=patched, plugins=["pdk_calls"], env=TTL_ENV) as srv:
        srv.run("pdk_calls")
        threads = []
        for _ in range(2):
            kinds = srv.repeat(n, "pdk_calls", pdk)
            assert kinds == {how if how == "lua_error" else "abandoned": n}
            if patched:
                assert wait_until(lambda: _idle(srv), 3.0), srv.shim_stats()
            else:
                wait_until(lambda: False, 1.5)  # as long as the reaper would take
            threads.append(srv.server.threads())
        if patched:
            assert srv.shim_stats()["ended"]["abandoned"] == 2 * n
            assert threads[1] - threads[0] < 10, threads
        else:
            assert threads[1] - threads[0] >= n, threads


def _idle(srv) -> bool:
    stats = srv.shim_stats()
    return sum(stats["events"].values()) == 0 and stats["workers"]["busy"] == 0


def test_a_connection_that_dies_mid_event_leaves_nothing(tmp_path):
    """Kong sends Lua strings as msgpack str even when they are not UTF-8; upstream's listener
    then dies on that connection, so the Step never reaches the server."""
    with running_server(tmp_path, patched=True, plugins=["pdk_calls"], env=TTL_ENV) as srv:
        iid = srv.kong.start_instance("pdk_calls")
        reply = srv.kong.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
        raw = msgpack.packb([0, 99, "plugin.Step", [{"EventId": reply["EventId"],
                                                     "Data": b"\xff\xfe"}]],
                            use_bin_type=False)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(srv.server.socket_path)
            conn.sendall(raw)
            assert conn.recv(1024) == b""  # upstream's listener gave up on this connection
        assert wait_until(lambda: _idle(srv), 3.0), srv.shim_stats()
        assert srv.shim_stats()["ended"]["abandoned"] == 1
        assert srv.run("pdk_calls").kind == "ret"


# -- a PDK call after kong.response.exit --------------------------------------------------------


@pytest.mark.parametrize("lua_style", [True, False], ids=["lua-style", "python-style"])
def test_a_pdk_call_after_exit_fails_fast(tmp_path, lua_style):
    with running_server(tmp_path, patched=True, plugins=["report_after_exit"],
                        lua_style=lua_style, read_timeout=5.0) as srv:
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


def test_a_handler_past_handler_timeout_gets_an_error_reply(tmp_path):
    env = {"KONG_PDK_FIX_HANDLER_TIMEOUT": "0.3"}
    with running_server(tmp_path, patched=True, plugins=["slow"], env=env) as srv:
        outcome = srv.kong.run_event("slow", "access", ScriptedPDK(), {"sleep": 1.5})
        assert outcome.kind == "rpc_error" and "handler_timeout" in outcome.error
        assert srv.shim_stats()["workers"]["stuck"] == 1
        assert wait_until(lambda: srv.shim_stats()["workers"]["stuck"] == 0, 5.0)
        assert _idle(srv)
        assert srv.shim_stats()["ended"]["timeout"] == 1
    log = srv.server.output()
    assert "still running after" in log and "slow.py" in log  # the stuck worker's stack


# -- more events than workers ------------------------------------------------------------------


def test_overload_is_a_clear_error_not_a_new_thread(tmp_path):
    env = {"KONG_PDK_FIX_MAX_WORKERS": "2", "KONG_PDK_FIX_OVERLOAD_TIMEOUT": "0.2"}
    with running_server(tmp_path, patched=True, plugins=["slow"], env=env) as srv:
        threads = srv.server.threads()
        result = drive(srv.kong, [("slow", "access", None, {"sleep": 1.0})], count=6,
                       concurrency=6)
        assert result.by_kind["ret"] >= 2
        assert result.by_kind["rpc_error"] >= 2
        assert all("overloaded" in text for text in result.errors)
        assert srv.shim_stats()["overloaded"] == result.by_kind["rpc_error"]
        # two workers at most, the reaper, and upstream's listener thread per connection
        assert srv.server.threads() - threads <= 2 + 1 + 6


@pytest.mark.parametrize("patched", [False, True], ids=["upstream", "patched"])
def test_concurrent_events_are_not_serialised(tmp_path, patched):
    """Upstream holds a server-wide lock until a handler's first PDK call; with the fix,
    handlers that block before it run side by side (counted by the handlers, not a clock)."""
    with running_server(tmp_path, patched=patched, plugins=["concurrency_peak"]) as srv:
        result = drive(srv.kong, [("concurrency_peak", "access", None, {"sleep": 0.3})], count=8,
                       concurrency=4)
        assert result.by_kind == {"ret": 8}, result.errors
        outcome = srv.kong.run_event("concurrency_peak", "access", ScriptedPDK(), {"sleep": 0.0})
    peak = int(outcome.calls[-1][1][0].split()[1])
    assert (peak > 1) if patched else (peak == 1), peak
