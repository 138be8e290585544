"""The worker that runs an event answers Kong on the connection it was lent (engine.py). These
are the edges of that hand-over: plugin code calling the PDK from other threads, a PDK call
interrupted inside the worker, a worker hit by an error outside any handler. Each failed
against the engine of c09f7db, which lent connections without these guards."""

from __future__ import annotations

import socket
import time

from servers import RawConnection, running_server, wait_until

START = {"Config": "{}"}


def _idle(srv) -> bool:
    stats = srv.shim_stats()
    return sum(stats["events"].values()) == 0 and stats["workers"]["busy"] == 0


def _start(conn: RawConnection, name: str) -> int:
    return conn.call("plugin.StartInstance", dict(START, Name=name))[3]["Id"]


def _nothing_more(conn: RawConnection, seconds: float) -> bool:
    conn.sock.settimeout(seconds)
    try:
        conn.read()
    except socket.timeout:
        return True
    return False


def test_pdk_calls_from_two_threads_of_one_handler_take_turns(tmp_path):
    """Two replies to one request would desync Kong's connection (a 500 for another request)."""
    with running_server(tmp_path, patched=True, plugins=["two_threads"]) as srv:
        with RawConnection(srv.server.socket_path) as conn:
            iid = _start(conn, "two_threads")
            reply = conn.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
            first = reply[3]["Data"]
            assert first["Args"] == ["from-thread"], reply
            assert _nothing_more(conn, 1.0), conn.messages[-1]  # Kong has not stepped yet
            reply = conn.call("plugin.Step", {"EventId": reply[3]["EventId"], "Data": "a"})
            assert reply[3]["Data"]["Args"] == ["from-handler"], reply
            reply = conn.call("plugin.Step", {"EventId": reply[3]["EventId"], "Data": "b"})
            assert reply[3]["Data"] == "ret", reply
        assert wait_until(lambda: _idle(srv), 3.0), srv.shim_stats()


def test_a_thread_left_running_cannot_reach_the_next_event(tmp_path):
    """Its late PDK call fails fast on its own ended event instead of being sent to Kong as
    another request's reply."""
    env = {"KONG_PDK_FIX_MAX_WORKERS": "1"}  # the next event runs on the same worker
    plugins = ["stray_thread", "sleep_then_call"]
    with running_server(tmp_path, patched=True, plugins=plugins, env=env) as srv:
        with RawConnection(srv.server.socket_path) as conn:
            stray, sleeper = _start(conn, "stray_thread"), _start(conn, "sleep_then_call")
            event = {"EventName": "access"}
            assert (
                conn.call("plugin.HandleEvent", dict(event, InstanceId=stray))[3]["Data"] == "ret"
            )
            conn.sock.settimeout(5.0)
            reply = conn.call("plugin.HandleEvent", dict(event, InstanceId=sleeper))
            assert reply[3]["Data"] == {"Method": "kong.request.get_header", "Args": ["x"]}, reply
            reply = conn.call("plugin.Step", {"EventId": reply[3]["EventId"], "Data": None})
            assert reply[3]["Data"] == "ret", reply
            assert _nothing_more(conn, 0.5), conn.messages[-1]
        assert wait_until(lambda: _idle(srv), 3.0), srv.shim_stats()


def test_a_pdk_call_interrupted_by_a_gevent_timeout_gives_its_connection_back(tmp_path):
    """The event ends there (Kong's late Step gets an error), the connection the worker was
    reading is served again and the worker takes the next event."""
    env = {"KONG_PDK_FIX_MAX_WORKERS": "1", "KONG_PDK_FIX_OVERLOAD_TIMEOUT": "1"}
    plugins = ["gevent_timeout_caught", "noop"]
    with running_server(tmp_path, patched=True, plugins=plugins, mode="gevent", env=env) as srv:
        path = srv.server.socket_path
        with RawConnection(path) as first, RawConnection(path) as second:
            iid = _start(first, "gevent_timeout_caught")
            reply = first.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
            eid = reply[3]["EventId"]
            time.sleep(0.6)  # the handler's Timeout fires while its worker waits for Kong
            late = second.call("plugin.Step", {"EventId": eid, "Data": "x"})
            assert late[2] is not None and "not found" in late[2], late
            assert first.call("plugin.GetStatus", None)[2] is None
            noop = _start(second, "noop")
            reply = second.call("plugin.HandleEvent", {"InstanceId": noop, "EventName": "access"})
            assert reply[3]["Data"] == "ret", reply
        assert wait_until(lambda: _idle(srv), 3.0), srv.shim_stats()
        assert srv.shim_stats()["ended"]["raised"] == 1


def test_a_worker_survives_a_gevent_timeout_a_handler_left_armed(tmp_path):
    """The Timeout fires in the worker after the handler returned; upstream confines the
    damage to that event's greenlet, and so must a reused worker."""
    env = {"KONG_PDK_FIX_MAX_WORKERS": "1", "KONG_PDK_FIX_OVERLOAD_TIMEOUT": "1"}
    plugins = ["gevent_timeout_left", "noop"]
    with running_server(tmp_path, patched=True, plugins=plugins, mode="gevent", env=env) as srv:
        assert srv.run("gevent_timeout_left").kind == "ret"
        time.sleep(0.6)
        kinds = [srv.run("noop").kind for _ in range(3)]
        assert kinds == ["ret"] * 3, (kinds, srv.server.output()[-2000:])
        assert wait_until(lambda: _idle(srv), 3.0), srv.shim_stats()
