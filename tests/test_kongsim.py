"""The Kong emulator against a real, unpatched kong-python-pluginserver."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator

import msgpack
import pytest

from kong_pdk_fix.kongsim import (
    STALL,
    Kong,
    LuaError,
    PluginServerProcess,
    ProtocolError,
    ScriptedPDK,
    drive,
    install_probe,
    probe_heap,
    step_for,
)

PLUGINS = os.path.join(os.path.dirname(__file__), "plugins")
pytestmark = pytest.mark.upstream

USED = ("noop", "pdk_calls", "exit_first", "error_later", "slow", "log_phase", "raises_later")
READ_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def plugins_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("plugins")
    for name in USED:
        shutil.copy(os.path.join(PLUGINS, name + ".py"), str(path))
    install_probe(str(path))
    return str(path)


@pytest.fixture(scope="module")
def server(plugins_dir: str) -> Iterator[PluginServerProcess]:
    with PluginServerProcess(plugins_dir, patched=False) as srv:
        yield srv


@pytest.fixture
def kong(server: PluginServerProcess) -> Iterator[Kong]:
    with Kong(server.socket_path, read_timeout=READ_TIMEOUT) as k:
        yield k


def test_start_instance_is_cached_per_config(kong: Kong) -> None:
    first = kong.instance_id("noop", {"a": 1})
    assert kong.instance_id("noop", {"a": 1}) == first
    assert kong.instance_id("noop", {"a": 2}) != first
    assert kong.start_instance("noop", {"a": 1}) != first  # a new one, now cached
    assert kong.instance_id("noop", {"a": 1}) != first


def test_noop_event_ends_with_ret(kong: Kong) -> None:
    outcome = kong.run_event("noop", "access")
    assert outcome.kind == "ret" and outcome.calls == [] and outcome.error is None
    assert isinstance(outcome.event_id, int)
    assert outcome.sent == ["plugin.HandleEvent"]


def test_pdk_calls_are_answered_with_the_step_kong_chooses(kong: Kong) -> None:
    pdk = ScriptedPDK(
        {
            "kong.request.get_header": "example.com",
            "kong.request.get_headers": {"a": "b", "c": True},
        }
    )
    outcome = kong.run_event("pdk_calls", "access", pdk)
    assert outcome.kind == "ret", outcome
    assert outcome.sent == [
        "plugin.HandleEvent",
        "plugin.Step",
        "plugin.StepMultiMap",
        "plugin.Step",
    ]
    method, args = outcome.calls[-1]
    assert method == "kong.response.set_header"
    # header getters reach the plugin as maps of arrays (mp_rpc.lua fix_mmap)
    assert json.loads(args[1]) == ["example.com", {"a": ["b"], "c": []}]
    assert [m for m, _ in pdk.calls] == [
        "kong.request.get_header",
        "kong.request.get_headers",
        "kong.response.set_header",
    ]


def test_step_method_choice() -> None:
    assert step_for("kong.client.get_consumer", {"id": "x"}) == ("plugin.StepConsumer", {"id": "x"})
    assert step_for("kong.request.get_headers", {}) == ("plugin.StepMultiMap", {})
    assert step_for("kong.ctx.shared.get", {}) == ("plugin.Step", [])
    assert step_for("kong.request.get_raw_body", "x") == ("plugin.Step", b"x")
    assert step_for("kong.request.get_header", (None, "bad")) == ("plugin.Step", None)
    assert step_for("kong.request.get_header", (None, "bad"), "2.8") == ("plugin.StepError", "bad")


@pytest.mark.parametrize(
    "plugin, kind, method",
    [
        ("exit_first", "exit", "kong.response.exit"),
        ("error_later", "error", "kong.response.error"),
    ],
)
def test_terminal_call_ends_the_event_without_step(
    kong: Kong, plugin: str, kind: str, method: str
) -> None:
    outcome = kong.run_event(plugin, "access")
    assert outcome.kind == kind
    assert outcome.terminal is not None and outcome.terminal["Method"] == method
    assert outcome.calls[-1] == (method, outcome.terminal["Args"])
    assert len(outcome.sent) == len(outcome.calls)  # HandleEvent + one Step per answered call


def test_kong_2_8_sends_step_error(server: PluginServerProcess) -> None:
    with Kong(server.socket_path, read_timeout=READ_TIMEOUT, kong_version="2.8") as k:
        outcome = k.run_event(
            "pdk_calls", "access", ScriptedPDK({"kong.request.get_header": (None, "bad")})
        )
    assert outcome.kind == "ret" and outcome.sent[1] == "plugin.StepError"


def test_lua_error_sends_nothing_more(kong: Kong) -> None:
    pdk = ScriptedPDK({"kong.request.get_header": LuaError("bad argument #1")})
    outcome = kong.run_event("pdk_calls", "access", pdk)
    assert (outcome.kind, outcome.error) == ("lua_error", "bad argument #1")
    assert outcome.sent == ["plugin.HandleEvent"]


def test_stall_abandons_the_event(kong: Kong) -> None:
    outcome = kong.run_event("pdk_calls", "access", ScriptedPDK(default=STALL))
    assert outcome.kind == "abandoned" and outcome.sent == ["plugin.HandleEvent"]
    assert kong.run_event("noop", "access").kind == "ret"


def test_no_plugin_instance_restarts_the_instance(kong: Kong) -> None:
    old = kong.instance_id("noop")
    kong.close_instance(old)  # closed behind this worker's back: its cached id is stale
    outcome = kong.run_event("noop", "access")
    assert (outcome.kind, outcome.restarts) == ("ret", 1)
    assert kong.instance_id("noop") != old


def test_fresh_policy_puts_each_call_on_its_own_connection(server: PluginServerProcess) -> None:
    with Kong(server.socket_path, read_timeout=READ_TIMEOUT, event_connection_policy="fresh") as k:
        k.instance_id("pdk_calls")
        opened = k.rpc.opened
        outcome = k.run_event("pdk_calls", "access")
        assert outcome.kind == "ret", outcome
        assert k.rpc.opened - opened == len(outcome.sent) == 4
        assert k.rpc.idle() == 1  # only StartInstance's pooled connection


def test_pool_reuses_one_connection_when_sequential(server: PluginServerProcess) -> None:
    with Kong(server.socket_path, read_timeout=READ_TIMEOUT) as k:
        for _ in range(5):
            assert k.run_event("pdk_calls", "access").kind == "ret"
        assert k.rpc.opened == 1


def test_read_timeout_discards_the_connection(kong: Kong) -> None:
    outcome = kong.run_event("slow", "access", config={"sleep": 0.3}, step_timeout=0.05)
    assert outcome.kind == "timeout"
    assert kong.rpc.idle() == 0
    assert kong.run_event("noop", "access").kind == "ret"


def test_reused_connection_reads_the_late_reply(server: PluginServerProcess) -> None:
    with Kong(server.socket_path, read_timeout=READ_TIMEOUT, reuse_on_timeout=True) as k:
        k.instance_id("noop")
        outcome = k.run_event("slow", "access", config={"sleep": 0.3}, step_timeout=0.05)
        assert outcome.kind == "timeout" and k.rpc.idle() == 1
        late = k.run_event("noop", "access")  # nginx hands the same connection out again
        assert late.kind == "protocol_error", late
        assert "unexpected RPC response ID" in str(late.error)
        conn = k.rpc.connect()
        try:
            conn.send(msgpack.packb([0, 999999, "plugin.GetStatus", [None]]))
            with pytest.raises(ProtocolError):  # the raw call reads the reply to 999999
                k.call("plugin.GetStatus", None, conn=conn)
        finally:
            conn.close()


def test_log_phase_runs_after_an_exit_with_the_log_timer_pdk(kong: Kong) -> None:
    pdk = ScriptedPDK({"kong.response.get_status": 403})
    outcomes = kong.run_request([("log_phase", None), ("noop", None)], pdk)
    assert [(o.plugin, o.phase, o.kind) for o in outcomes] == [
        ("log_phase", "access", "exit"),
        ("log_phase", "log", "ret"),
    ]
    assert outcomes[1].calls == [
        ("kong.response.get_status", []),
        ("kong.log.notice", ["status 403"]),
    ]
    log_pdk = ScriptedPDK.for_log_phase(pdk)
    assert log_pdk.call("kong.response.get_status", []) == 403
    with pytest.raises(LuaError):
        log_pdk.call("kong.service.request.set_header", ["a", "b"])


def test_probe_counts_objects(kong: Kong) -> None:
    report = probe_heap(kong)
    for name in ("deque", "Queue", "Condition", "Thread", "Event", "active_count", "pid"):
        assert report[name] >= 1, report
    assert report["pid"] != os.getpid()


def test_probe_heap_table(kong: Kong) -> None:
    pytest.importorskip("guppy")  # the server runs with this interpreter
    rows = probe_heap(kong, heap=True)["heap"]
    assert 0 < len(rows) <= 15 and {"kind", "count", "size"} == set(rows[0])


@pytest.mark.parametrize("mode", ["gevent", "process"])
def test_probe_in_other_modes(plugins_dir: str, mode: str) -> None:
    with PluginServerProcess(plugins_dir, patched=False, mode=mode) as srv:
        with Kong(srv.socket_path, read_timeout=READ_TIMEOUT) as k:
            report = probe_heap(k)
        if mode == "gevent":
            assert report["greenlet"] >= 1 and report["pid"] == srv.pid
        else:
            assert report["pid"] in srv.children()
        children = srv.children()
    assert not [pid for pid in children if _running(pid)]


def _running(pid: int) -> bool:
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.02)
    return True


def test_drive_runs_the_count_with_concurrency(kong: Kong, server: PluginServerProcess) -> None:
    scenarios = [
        ("noop", "access", None, None),
        ("pdk_calls", "access", ScriptedPDK({"kong.request.get_header": "h"}), None),
    ]
    result = drive(kong, scenarios, count=200, concurrency=4, sample=(0.05, server.threads))
    assert result.events == 200 and result.by_kind == {"ret": 200}, result.errors
    assert len(result.latencies) == 200 and result.events_per_s > 0
    assert len(result.samples) >= 2 and all(n >= 1 for _, n in result.samples)


def test_drive_for_a_duration(kong: Kong) -> None:
    started = time.monotonic()
    result = drive(kong, [("noop", "access", None, None)], duration=0.3, concurrency=2)
    assert result.events > 0 and time.monotonic() - started < 2


def test_process_readings_and_dump(server: PluginServerProcess) -> None:
    assert server.alive() and server.rss() > 0 and server.threads() >= 1 and server.fds() >= 3
    assert server.children() == []
    names = {p["Name"]: p["Phases"] for p in server.dump_all_plugins()}
    assert names["log_phase"] == ["log", "access"] and "kong_pdk_fix_probe" in names
    assert "server started" in server.output()


def test_failed_start_reports_the_output(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="usage|error"):
        PluginServerProcess(str(tmp_path), patched=False, extra_args=["--no-such-flag"]).start()
