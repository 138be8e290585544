"""Hostile input, Kong going away, restarts (issue 6), against real plugin servers.

Every bad input is sent on a connection of its own over the server's real unix socket; then a
normal event on a NEW connection must be answered, and the shim's event table must be empty
with no worker busy. One patched server per mode serves the whole module (with
KONG_PDK_FIX_EVENT_TTL=1, so events Kong dropped are reaped quickly, and max_message_size
1 MiB). Where upstream behaves differently the upstream half (KONG_PDK_FIX_DISABLE=1) shows the
defect. Overload, handler_timeout and events Kong stops stepping are in test_event_endings.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from typing import Any, Dict, List, Optional

import msgpack
import pytest
from servers import (
    MODES,
    PLUGINS,
    RawConnection,
    Running,
    fresh_event,
    idle,
    running_server,
    wait_until,
)

from kong_pdk_fix.kongsim import (
    Kong,
    Outcome,
    PluginServerProcess,
    ScriptedPDK,
    drive,
    lua_string,
)

MIB = 1024 * 1024
ENV = {"KONG_PDK_FIX_EVENT_TTL": "1", "KONG_PDK_FIX_MAX_MESSAGE_SIZE": str(MIB)}
SERVED = ["noop", "pdk_calls", "slow", "echo_header"]
CLOSING = "closing connection"
IID = object()  # stands for a live instance id in the cases below
SLOW_THEN_PDK = {"sleep": 0.3, "report_peak": True}  # blocks, then one PDK call


@pytest.fixture(scope="module", params=MODES)
def srv(request, tmp_path_factory):
    """One patched server per mode for the module; each test leaves it idle."""
    mode = request.param
    with running_server(
        tmp_path_factory.mktemp("reliability-" + mode),
        patched=True,
        plugins=SERVED,
        mode=mode,
        env=ENV,
    ) as running:
        yield running


def closings(srv: Running) -> List[str]:
    return [line for line in srv.server.output().splitlines() if CLOSING in line]


def serves_and_is_idle(srv: Running) -> None:
    """A normal event on a new connection is answered and nothing stays behind."""
    outcome = fresh_event(srv, "pdk_calls")
    assert outcome.kind == "ret", (outcome, srv.server.output()[-3000:])
    assert wait_until(lambda: idle(srv), 3.0), srv.shim_stats()


def raw(srv: Running) -> RawConnection:
    return RawConnection(srv.server.socket_path)


# -- a byte stream that cannot be read on: the connection is closed, with one log line -------


def send_not_msgpack(srv: Running, conn: RawConnection) -> None:
    conn.send(b"\xc1\xc1\xc1\xc1")  # 0xc1 is never used by MessagePack


def send_truncated_mid_event(srv: Running, conn: RawConnection) -> None:
    """Kong dies half-way through writing a Step: the event waits for a Step for ever."""
    iid = srv.kong.instance_id("pdk_calls")
    reply = conn.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
    assert isinstance(reply[3]["Data"], dict), reply  # a PDK call: the event waits for Kong
    step = msgpack.packb([0, 99, "plugin.Step", [{"EventId": reply[3]["EventId"], "Data": "h"}]])
    conn.send(step[: len(step) // 2])
    conn.sock.shutdown(socket.SHUT_WR)


def send_oversized(srv: Running, conn: RawConnection) -> None:
    """A well-formed request of 2 MiB with max_message_size at 1 MiB."""
    payload = msgpack.packb([0, 7, "plugin.GetStatus", ["x" * (2 * MIB)]])
    try:
        conn.send(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close before it has read it all


UNREADABLE = {
    "not-msgpack": send_not_msgpack,
    "truncated-then-eof": send_truncated_mid_event,
    "oversized": send_oversized,
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_an_unreadable_stream_closes_that_connection_only(srv, case):
    with raw(srv) as other:
        assert other.call("plugin.GetStatus", None)[2] is None
        if case == "oversized":  # just under the limit is served
            assert other.call("plugin.GetStatus", "x" * (MIB // 2))[2] is None
        before = len(closings(srv))
        with raw(srv) as conn:
            UNREADABLE[case](srv, conn)
            assert conn.closed_by_server(), conn.messages
        assert wait_until(lambda: len(closings(srv)) > before, 5.0), srv.server.output()[-3000:]
        new = closings(srv)[before:]
        assert len(new) == 1, new
        reason = new[0].split(CLOSING, 1)[1].strip(" :-")
        assert reason, new  # the line says why
        if case == "oversized":
            assert any(word in reason.lower() for word in ("size", "large", "limit")), new
        # a connection that was open before is still served
        assert other.call("plugin.GetStatus", None)[2] is None
    serves_and_is_idle(srv)


# -- well-framed values that are not requests --------------------------------------------------

NOT_REQUESTS_WITH_MSGID = {
    "two-items": [0, 7],
    "three-items": [0, 7, "plugin.GetStatus"],
    "five-items": [0, 7, "plugin.GetStatus", [None], None],
    "a-response": [1, 7, None, None],
    "type-9": [9, 7, "plugin.GetStatus", [None]],
    "method-int": [0, 7, 42, [None]],
    "method-nil": [0, 7, None, [None]],
    "method-bin": [0, 7, b"plugin.GetStatus", [None]],
    "params-map": [0, 7, "plugin.GetStatus", {"a": 1}],
    "params-str": [0, 7, "plugin.GetStatus", "x"],
    "params-nil": [0, 7, "plugin.GetStatus", None],
}


@pytest.mark.parametrize("case", sorted(NOT_REQUESTS_WITH_MSGID))
def test_a_value_that_is_not_a_request_gets_a_bad_request_reply(srv, case):
    before = len(closings(srv))
    with raw(srv) as conn:
        conn.send_message(NOT_REQUESTS_WITH_MSGID[case])
        reply = conn.reply()
        assert reply[:2] == [1, 7] and reply[3] is None, reply
        assert isinstance(reply[2], str) and reply[2].startswith("bad request: "), reply
        # the connection goes on
        assert conn.call("plugin.GetStatus", None)[2] is None
    assert len(closings(srv)) == before
    serves_and_is_idle(srv)


NOT_REQUESTS_WITHOUT_MSGID = {
    "int": 42,
    "str": "GET / HTTP/1.1",
    "nil": None,
    "bin": b"\x00\x01",
    "map": {"msgid": 7, "method": "plugin.GetStatus"},
    "empty-array": [],
    "one-item": [0],
    "msgid-str": [0, "7", "plugin.GetStatus", [None]],
    "msgid-float": [0, 7.0, "plugin.GetStatus", [None]],
    "msgid-nil": [0, None, "plugin.GetStatus", [None]],
    "a-notification": [2, "serverPid", 1],
}


@pytest.mark.parametrize("case", sorted(NOT_REQUESTS_WITHOUT_MSGID))
def test_a_value_with_no_msgid_closes_the_connection(srv, case):
    before = len(closings(srv))
    with raw(srv) as conn:
        conn.send_message(NOT_REQUESTS_WITHOUT_MSGID[case])
        assert conn.closed_by_server(), conn.messages
    assert wait_until(lambda: len(closings(srv)) == before + 1, 5.0), closings(srv)[before:]
    serves_and_is_idle(srv)


@pytest.mark.upstream
@pytest.mark.parametrize("mode", MODES)
def test_upstream_drops_the_connection_on_a_value_that_is_not_four_items(tmp_path, mode):
    """Upstream unpacks every message into four names: anything else kills the connection
    handler, so Kong gets no reply at all for a message that carries a msgid."""
    with running_server(tmp_path, patched=False, plugins=["noop"], mode=mode) as up:
        with RawConnection(up.server.socket_path) as conn:
            conn.send_message([0, 7, "plugin.GetStatus"])
            assert conn.closed_by_server(), conn.messages


# -- requests Kong can get an error reply for --------------------------------------------------

# (method, params, text the error must contain (any of them), or None for any error text)
RPC_ERRORS: Dict[str, tuple] = {
    "unknown-namespace": ("kong.GetStatus", [None], ["RPC for kong is not supported"]),
    "unknown-method": ("plugin.NoSuchMethod", [None], ["NoSuchMethod", "no_such_method"]),
    "no-namespace": ("GetStatus", [None], None),
    "empty-method": ("", [None], None),
    "dotted-twice": ("plugin.Get.Status", [None], None),
    # PluginServer attributes Kong never calls: reachable by name through upstream's getattr
    "python-dunder": ("plugin.__init__", [], ["__init__"]),
    "python-private": ("plugin._LoadPlugins", [], ["_LoadPlugins", "_load_plugins"]),
    "cleanup": ("plugin.Cleanup", [], ["Cleanup", "cleanup"]),
    "handle-event-str": ("plugin.HandleEvent", ["access"], None),
    "handle-event-no-iid": ("plugin.HandleEvent", [{"EventName": "access"}], None),
    "handle-event-iid-str": (
        "plugin.HandleEvent",
        [{"InstanceId": "0", "EventName": "access"}],
        None,
    ),
    "handle-event-unknown-phase": (
        "plugin.HandleEvent",
        [{"InstanceId": IID, "EventName": "no_such_phase"}],
        None,
    ),
    "handle-event-two-params": (
        "plugin.HandleEvent",
        [{"InstanceId": IID, "EventName": "access"}, None],
        None,
    ),
    "handle-event-no-params": ("plugin.HandleEvent", [], None),
    "handle-event-unknown-instance": (
        "plugin.HandleEvent",
        [{"InstanceId": 123456789, "EventName": "access"}],
        ["no plugin instance"],
    ),
    "start-instance-no-name": ("plugin.StartInstance", [{"Config": "{}"}], None),
    "start-instance-bad-json": (
        "plugin.StartInstance",
        [{"Name": "noop", "Config": "{not json"}],
        None,
    ),
    "start-instance-unknown-plugin": (
        "plugin.StartInstance",
        [{"Name": "no_such_plugin", "Config": "{}"}],
        ["no_such_plugin"],
    ),
    "step-str": ("plugin.Step", ["x"], None),
    "step-array": ("plugin.Step", [[1, 2]], None),
    "step-no-event-id": ("plugin.Step", [{"Data": 1}], None),
    "step-unknown-event": ("plugin.Step", [{"EventId": 987654321, "Data": 1}], None),
    "step-multi-map-int": ("plugin.StepMultiMap", [7], None),
    "close-instance-str": ("plugin.CloseInstance", ["x"], None),
    "plugin-info-int": ("plugin.GetPluginInfo", [42], None),
}


def _with_instance(value: Any, iid: int) -> Any:
    if value is IID:
        return iid
    if isinstance(value, list):
        return [_with_instance(v, iid) for v in value]
    if isinstance(value, dict):
        return {k: _with_instance(v, iid) for k, v in value.items()}
    return value


@pytest.mark.parametrize("case", sorted(RPC_ERRORS))
def test_a_bad_call_gets_an_error_reply_and_the_connection_goes_on(srv, case):
    method, params, texts = RPC_ERRORS[case]
    params = _with_instance(params, srv.kong.instance_id("noop"))
    instances = len(srv.status()["Plugins"]["noop"]["Instances"])
    before = len(closings(srv))
    with raw(srv) as conn:
        conn.send_message([0, 7, method, params])
        reply = conn.reply()
        assert reply[:2] == [1, 7] and reply[3] is None, reply
        assert isinstance(reply[2], str) and reply[2], reply
        if texts is not None:
            assert any(text in reply[2] for text in texts), reply
        if case == "handle-event-unknown-instance":  # Kong restarts the instance on this text
            assert reply[2].startswith("no plugin instance"), reply
        assert conn.call("plugin.GetStatus", None)[2] is None
    assert len(closings(srv)) == before
    # the server is as it was: the instances Kong holds still run (no __init__ was called)
    assert len(srv.status()["Plugins"]["noop"]["Instances"]) == instances
    assert srv.run("noop").kind == "ret"
    serves_and_is_idle(srv)


# -- Lua strings that are not UTF-8 --------------------------------------------------------------

NOT_UTF8 = b"\xff\xfe caf\xe9 \xc3( \xed\xa0\x80 ok"


def test_a_str_that_is_not_utf8_goes_back_to_kong_byte_for_byte(srv):
    """Kong packs Lua strings as msgpack str whatever their bytes (KONG_PROTOCOL.md
    "Framing"): the plugin must see them and hand them back unchanged."""
    pdk = ScriptedPDK({"kong.request.get_header": lua_string(NOT_UTF8)})
    outcome = srv.run("echo_header", pdk)
    assert outcome.kind == "ret", outcome
    method, args = outcome.calls[-1]
    assert method == "kong.response.set_header" and args[0] == "x-echo", outcome.calls
    assert args[1].encode("utf-8", "surrogateescape") == NOT_UTF8
    serves_and_is_idle(srv)


@pytest.mark.upstream
@pytest.mark.parametrize("mode", MODES)
def test_upstream_drops_the_connection_on_a_str_that_is_not_utf8(tmp_path, mode):
    pdk = ScriptedPDK({"kong.request.get_header": lua_string(NOT_UTF8)})
    with running_server(
        tmp_path, patched=False, plugins=["echo_header"], mode=mode, read_timeout=3.0
    ) as up:
        outcome = up.run("echo_header", pdk)
    # upstream's connection handler dies on the Step: Kong's connection closes, no reply
    assert outcome.kind == "io_error", outcome


# -- serverPid and instance ids ----------------------------------------------------------------


def test_the_first_reply_on_each_connection_follows_a_server_pid_notification(srv):
    pid = srv.server.pid
    with raw(srv) as conn:
        conn.send_message([0, 1, "plugin.GetStatus", [None]])
        assert conn.read() == [2, "serverPid", pid]
        reply = conn.read()
        assert reply[:3] == [1, 1, None] and reply[3]["Pid"] == pid, reply
        conn.send_message([0, 2, "plugin.GetStatus", [None]])
        assert conn.read()[:2] == [1, 2]  # once per connection
    with raw(srv) as conn:  # an error reply counts as the first reply too
        conn.send_message([0, 3, "kong.GetStatus", [None]])
        assert conn.read() == [2, "serverPid", pid]
        assert conn.read()[:2] == [1, 3]
    srv.kong.call("plugin.GetStatus", None)
    assert srv.kong.server_pid == pid  # the emulated Kong took note


@pytest.mark.upstream
def test_upstream_sends_no_server_pid(tmp_path):
    with running_server(tmp_path, patched=False, plugins=["noop"]) as up:
        with RawConnection(up.server.socket_path) as conn:
            conn.send_message([0, 1, "plugin.GetStatus", [None]])
            assert conn.read()[:3] == [1, 1, None]


@pytest.mark.parametrize("mode", MODES)
def test_instance_ids_count_from_the_server_start_in_microseconds(tmp_path, mode):
    """So ids never repeat across restarts. (About 1.8e15: well inside the 2**53 a Lua
    number holds exactly.)"""
    started = time.time()
    with running_server(tmp_path, patched=True, plugins=["noop"], mode=mode) as running:
        first = running.kong.start_instance("noop")
        second = running.kong.start_instance("noop", {"other": "config"})
        answered = time.time()
    assert int(started * 1e6) <= first <= int(answered * 1e6), (started, first, answered)
    assert second == first + 1
    assert second < 2**53


def _reached(outcome: Outcome) -> Optional[str]:
    """The plugin that ran the event: whoami.py sets x-plugin to its name."""
    for method, args in outcome.calls:
        if method == "kong.response.set_header" and args[:1] == ["x-plugin"]:
            return args[1]
    return None


def _restart(tmp_path, patched: bool, mode: str) -> Outcome:
    """Kong worker 1 caches alpha's instance id; the plugin server restarts on the same
    socket (an OOM kill, say); Kong worker 2 starts beta first on the new server; then
    worker 1 runs alpha with its cached id."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name in ("alpha", "beta"):
        shutil.copy(os.path.join(PLUGINS, "whoami.py"), str(plugins / (name + ".py")))
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    info = [{"Name": name, "Phases": ["access"]} for name in ("alpha", "beta")]

    def server() -> PluginServerProcess:
        return PluginServerProcess(str(plugins), mode=mode, patched=patched, prefix=str(prefix))

    worker1 = Kong(server().socket_path, plugins_info=info, read_timeout=5.0)
    worker2 = Kong(server().socket_path, plugins_info=info, read_timeout=5.0)
    try:
        with server():
            before = worker1.run_event("alpha", "access")
            assert before.kind == "ret" and _reached(before) == "alpha", before
        with server():
            beta = worker2.run_event("beta", "access")
            assert beta.kind == "ret" and _reached(beta) == "beta", beta
            return worker1.run_event("alpha", "access")
    finally:
        worker1.close()
        worker2.close()


@pytest.mark.parametrize("mode", MODES)
def test_after_a_restart_a_cached_instance_id_never_reaches_another_plugin(tmp_path, mode):
    after = _restart(tmp_path, patched=True, mode=mode)
    assert after.kind == "ret", after
    assert _reached(after) == "alpha", after


@pytest.mark.upstream
@pytest.mark.parametrize("mode", MODES)
def test_upstream_after_a_restart_runs_a_cached_id_on_another_plugin(tmp_path, mode):
    """Upstream numbers instances from 0 in every process: alpha's id is beta's now."""
    after = _restart(tmp_path, patched=False, mode=mode)
    assert after.kind == "ret", after
    assert _reached(after) == "beta", after


# -- Kong going away -----------------------------------------------------------------------------


def _abandoned(srv: Running) -> int:
    return srv.shim_stats()["ended"]["abandoned"]


@pytest.mark.parametrize("when", ["before-the-reply", "after-a-pdk-call"])
def test_kong_hanging_up_mid_event_leaves_nothing(srv, when):
    """Kong closes the connection while the server works on a reply, or after reading a PDK
    call (a Kong worker that died): the event waits for a Step that never comes."""
    abandoned = _abandoned(srv)
    if when == "before-the-reply":
        iid = srv.kong.instance_id("slow", SLOW_THEN_PDK)
        with raw(srv) as conn:
            conn.send_message(
                [0, 1, "plugin.HandleEvent", [{"InstanceId": iid, "EventName": "access"}]]
            )
    else:
        iid = srv.kong.instance_id("pdk_calls")
        with raw(srv) as conn:
            reply = conn.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
            assert isinstance(reply[3]["Data"], dict), reply
    assert wait_until(lambda: idle(srv) and _abandoned(srv) == abandoned + 1, 5.0), srv.shim_stats()
    serves_and_is_idle(srv)


def test_a_late_reply_read_by_another_request_leaves_nothing(srv):
    """Kong's read timed out with no bytes, so nginx put the connection back into its pool
    with a reply still owed; the next request on it reads that reply (a 500 in Kong). The
    event whose reply went astray is never stepped: it is reaped."""
    abandoned = _abandoned(srv)
    kong = srv.server.kong(read_timeout=5.0, reuse_on_timeout=True)
    try:
        kong.instance_id("noop")
        kong.instance_id("slow", SLOW_THEN_PDK)
        timed_out = kong.run_event(
            "slow", "access", ScriptedPDK(), SLOW_THEN_PDK, step_timeout=0.05
        )
        assert timed_out.kind == "timeout" and kong.rpc.idle() == 1, timed_out
        late = kong.run_event("noop", "access")
        assert late.kind == "protocol_error", late
    finally:
        kong.close()
    assert wait_until(lambda: idle(srv) and _abandoned(srv) == abandoned + 1, 5.0), srv.shim_stats()
    serves_and_is_idle(srv)


def _threads_besides_workers(srv: Running) -> int:
    workers = srv.shim_stats()["workers"]
    return srv.server.threads() - (workers["busy"] + workers["idle"])


def test_events_abandoned_by_closing_their_connections_leave_nothing(srv):
    """Issue 6's done-when: with KONG_PDK_FIX_EVENT_TTL=1, 200 events abandoned by closing
    their connections leave no thread, event or worker busy 3 s later. (-m: as many events
    as pool processes, each of which runs one handler at a time.)"""
    mode = srv.server.mode
    stats = srv.shim_stats()
    n = stats["workers"]["max"] if mode == "process" else 200
    iid = srv.kong.instance_id("pdk_calls")
    assert wait_until(lambda: idle(srv), 3.0)
    threads = srv.server.threads()
    others = _threads_besides_workers(srv)
    greenlets = srv.sample().counts.get("greenlet", 0) if mode == "gevent" else 0
    started, abandoned = stats["started"], stats["ended"]["abandoned"]

    for _ in range(n):
        with raw(srv) as conn:
            reply = conn.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
            assert reply[2] is None and isinstance(reply[3]["Data"], dict), reply
    closed = time.monotonic()
    assert wait_until(lambda: idle(srv), 3.0), srv.shim_stats()
    assert time.monotonic() - closed <= 3.0
    stats = srv.shim_stats()
    assert stats["ended"]["abandoned"] - abandoned == n, stats
    assert stats["started"] - started >= n, stats
    if mode == "gevent":
        assert srv.server.threads() <= threads, srv.server.threads()
        workers = stats["workers"]["busy"] + stats["workers"]["idle"]
        grown = srv.sample().counts.get("greenlet", 0) - greenlets
        assert grown <= workers + 5, grown  # new pool workers at most
    else:
        # no connection or event thread is left: only pool workers, all idle
        assert _threads_besides_workers(srv) <= others + 2, (srv.server.threads(), stats)
    assert stats["workers"]["busy"] + stats["workers"]["idle"] <= stats["workers"]["max"]
    serves_and_is_idle(srv)


def test_concurrent_events_over_one_keepalive_pool_are_all_answered(srv):
    """Forty Kong threads share one keepalive pool, so the calls of one event arrive on
    different connections, each of which carries calls of other events in between
    (KONG_PROTOCOL.md "Framing"). Every event must be answered, none twice."""
    n = 5000
    started = srv.shim_stats()["started"]
    result = drive(srv.kong, [("pdk_calls", "access", None, None)], count=n, concurrency=40)
    assert result.by_kind == {"ret": n}, (result.by_kind, result.errors)
    assert wait_until(lambda: idle(srv), 3.0), srv.shim_stats()
    assert srv.shim_stats()["started"] - started == n
    serves_and_is_idle(srv)
