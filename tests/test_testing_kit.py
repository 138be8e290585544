"""kong_pdk_fix.testing: the kit plugin authors test with, against real plugin servers.

The leak guard must catch leaky plugins and name what leaked; the scripted request must
answer as Kong does; the pytest plugin must load from its entry point, cost nothing when
unused and keep -W error sessions clean. examples/ holds the kit's own usage examples.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kong_pdk_fix.testing import MODES, EmulatedKong, LeakError, LuaError, Request

ROOT = Path(__file__).resolve().parents[1]

THREAD_PER_EVENT = '''
import threading

# At module level: in -m mode the instance is pickled for every event, and an Event is not.
STOP = threading.Event()


class Plugin:
    """Starts a "background flush" thread per request that never ends."""

    def __init__(self, config):
        self.config = config

    def access(self, kong):
        threading.Thread(target=STOP.wait, daemon=True).start()
'''

GROWING_LIST = '''
class Plugin:
    """Remembers every request it saw."""

    def __init__(self, config):
        self.seen = []

    def access(self, kong):
        host, _ = kong.request.get_header("host")
        self.seen.append({"host": host})
'''

NEVER_RETURNS = """
import threading


class Plugin:
    def __init__(self, config):
        self.stop = threading.Event()

    def access(self, kong):
        self.stop.wait()
"""

EXIT_FIRST = """
class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        kong.response.exit(403, "denied")
"""

ECHO = """
import json


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        answers = {}
        for method, args in self.config["calls"]:
            value, _ = getattr_path(kong, method)(*args)
            answers[method + json.dumps(args)] = value
        kong.log.notice(json.dumps(answers, sort_keys=True))

    def log(self, kong):
        self.access(kong)


def getattr_path(kong, method):
    for part in method.split(".")[1:]:
        kong = getattr(kong, part)
    return kong
"""


def write_plugin(directory: Path, name: str, source: str) -> Path:
    path = directory / (name + ".py")
    path.write_text(textwrap.dedent(source))
    return path


def echo(kong: EmulatedKong, request: Request, *calls: tuple, phase: str = "access") -> dict:
    """What the plugin got back from Kong for each PDK call, as (method + JSON args) keys."""
    instance = kong.start_instance("echo", {"calls": [[m, list(a)] for m, *a in calls]})
    outcome = kong.run(phase, instance, request)
    assert outcome.ret, outcome
    (notice,) = outcome.calls_to("kong.log.notice")
    return json.loads(notice[0])


# The leak guard


@pytest.mark.parametrize("mode", MODES)
def test_leak_guard_names_a_thread_per_event(tmp_path: Path, mode: str) -> None:
    plugin = write_plugin(tmp_path, "thread_per_event", THREAD_PER_EVENT)
    with EmulatedKong(plugin, mode=mode) as kong:
        instance = kong.start_instance("thread_per_event")
        with pytest.raises(LeakError) as caught:
            kong.assert_no_leaks(instance, events=100)
    message = str(caught.value)
    assert re.search(r"^  threads: \d+ -> \d+ \(\+\d+\)$", message, re.MULTILINE), message
    assert "plugin 'thread_per_event'" in message and f"({mode} mode)" in message
    assert caught.value.report.outcomes == {"ret": 100}


@pytest.mark.parametrize("mode", ["thread", "gevent"])
def test_leak_guard_names_a_growing_list(tmp_path: Path, mode: str) -> None:
    plugin = write_plugin(tmp_path, "growing_list", GROWING_LIST)
    with EmulatedKong(plugin, mode=mode) as kong:
        instance = kong.start_instance("growing_list")
        report = kong.check_leaks(instance, request=Request(headers={"host": "a"}), events=100)
    # The dicts it keeps hold only strings, so gc does not track them: the list names the leak.
    assert report.leaks == [
        "containers: growing_list.Plugin.seen, a list now of 120 items (+100)"
    ], report


def test_leak_guard_names_workers_a_handler_never_gives_back(tmp_path: Path) -> None:
    plugin = write_plugin(tmp_path, "never_returns", NEVER_RETURNS)
    env = {"KONG_PDK_FIX_HANDLER_TIMEOUT": "0.2"}
    with EmulatedKong(plugin, env=env, read_timeout=5.0) as kong:
        instance = kong.start_instance("never_returns")
        report = kong.check_leaks(instance, events=3, warmup=0)
    assert "workers: 3 still busy (handlers that never returned)" in report.leaks, report
    assert "workers: 3 stuck past handler_timeout" in report.leaks, report
    assert report.outcomes == {"rpc_error": 3}  # Kong got an error after handler_timeout


@pytest.mark.upstream
def test_leak_guard_sees_what_unpatched_kong_pdk_leaks(tmp_path: Path) -> None:
    """KONG_PROTOCOL.md's leak table: every exit-first event stays in kong-pdk's event
    table with both its queues, on every kong-pdk release."""
    plugin = write_plugin(tmp_path, "exit_first", EXIT_FIRST)
    with EmulatedKong(plugin, patched=False) as kong:
        assert kong.stats() is None
        instance = kong.start_instance("exit_first")
        report = kong.check_leaks(instance, events=100)
    # The warm-up's 20 events are there already.
    assert "events: kong-pdk's event table grew from 20 to 120" in report.leaks, report
    (queues,) = [leak for leak in report.leaks if leak.startswith("queues: ")]
    assert "Queue +200" in queues, report  # two per event


@pytest.mark.parametrize("mode", MODES)
def test_leak_guard_passes_a_plugin_that_exits(tmp_path: Path, mode: str) -> None:
    plugin = write_plugin(tmp_path, "exit_first", EXIT_FIRST)
    with EmulatedKong(plugin, mode=mode) as kong:
        report = kong.assert_no_leaks(kong.start_instance("exit_first"))
    assert report.ok and report.outcomes == {"exit": 200}
    assert str(report).endswith("left nothing behind (ended: exit 200)")


# The scripted request


@pytest.fixture(scope="module")
def echo_kong(tmp_path_factory: pytest.TempPathFactory):
    plugin = write_plugin(tmp_path_factory.mktemp("echo"), "echo", ECHO)
    with EmulatedKong(plugin) as kong:
        yield kong


def test_request_answers_headers_as_kong_does(echo_kong: EmulatedKong) -> None:
    request = Request(headers={"X-Token": "a", "Accept": ["text/html", "*/*"], "X-Flag": True})
    got = echo(
        echo_kong,
        request,
        ("kong.request.get_header", "x_token"),
        ("kong.request.get_header", "ACCEPT"),
        ("kong.request.get_header", "missing"),
        ("kong.request.get_headers",),
    )
    assert got['kong.request.get_header["x_token"]'] == "a"
    assert got['kong.request.get_header["ACCEPT"]'] == "text/html"
    assert got['kong.request.get_header["missing"]'] is None
    # mp_rpc.lua must_fix: a map of arrays, a flag an empty array.
    assert got["kong.request.get_headers[]"] == {
        "x-token": ["a"],
        "accept": ["text/html", "*/*"],
        "x-flag": [],
    }


def test_request_answers_query_body_and_entities(echo_kong: EmulatedKong) -> None:
    request = Request(
        method="POST",
        path="/orders",
        query={"page": "2", "tag": ["a", "b"]},
        body='{"id": 7}',
        consumer={"username": "alice"},
        route={"name": "orders"},
        service={"name": "backend"},
    )
    got = echo(
        echo_kong,
        request,
        ("kong.request.get_query",),
        ("kong.request.get_query_arg", "tag"),
        ("kong.request.get_raw_query",),
        ("kong.request.get_path_with_query",),
        ("kong.request.get_method",),
        ("kong.request.get_body",),
        ("kong.client.get_consumer",),
        ("kong.router.get_route",),
        ("kong.router.get_service",),
    )
    assert got["kong.request.get_query[]"] == {"page": ["2"], "tag": ["a", "b"]}
    assert got['kong.request.get_query_arg["tag"]'] == "a"
    assert got["kong.request.get_raw_query[]"] == "page=2&tag=a&tag=b"
    assert got["kong.request.get_path_with_query[]"] == "/orders?page=2&tag=a&tag=b"
    assert got["kong.request.get_method[]"] == "POST"
    assert got["kong.request.get_body[]"] == {"id": 7}
    assert got["kong.client.get_consumer[]"] == {"username": "alice"}
    assert got["kong.router.get_route[]"] == {"name": "orders"}
    assert got["kong.router.get_service[]"] == {"name": "backend"}


def test_request_carries_shared_ctx_across_phases(echo_kong: EmulatedKong) -> None:
    request = Request()
    echo(echo_kong, request, ("kong.ctx.shared.set", "k", "v"))
    assert request.shared == {"k": "v"}
    got = echo(echo_kong, request, ("kong.ctx.shared.get", "k"), phase="log")
    assert got['kong.ctx.shared.get["k"]'] == "v"


def test_the_log_phase_answers_only_what_kongs_log_timer_does(echo_kong: EmulatedKong) -> None:
    instance = echo_kong.start_instance("echo", {"calls": [["kong.request.get_body", []]]})
    outcome = echo_kong.run("log", instance, Request(body="{}"))
    assert outcome.kind == "lua_error"
    assert outcome.error == "kong.request.get_body is not available in the log timer"


def test_answers_override_the_request(echo_kong: EmulatedKong) -> None:
    request = Request(
        headers={"host": "a"},
        answers={
            "kong.request.get_header": lambda name: name.upper(),
            "kong.node.get_id": "node-1",
        },
    )
    got = echo(echo_kong, request, ("kong.request.get_header", "host"), ("kong.node.get_id",))
    assert got == {'kong.request.get_header["host"]': "HOST", "kong.node.get_id[]": "node-1"}
    instance = echo_kong.start_instance("echo", {"calls": [["kong.node.get_id", []]]})
    failing = Request(answers={"kong.node.get_id": LuaError("no node id")})
    outcome = echo_kong.run("access", instance, failing)
    assert (outcome.kind, outcome.error) == ("lua_error", "no node id")


def test_a_raising_handler_is_an_rpc_error(tmp_path: Path) -> None:
    plugin = write_plugin(
        tmp_path,
        "raises",
        "class Plugin:\n    def __init__(self, c):\n"
        "        pass\n\n    def access(self, kong):\n        1 / 0\n",
    )
    with EmulatedKong(plugin) as kong:
        outcome = kong.run("access", kong.start_instance("raises"))
    assert outcome.kind == "rpc_error" and not outcome.ret and not outcome.exit
    assert "ZeroDivisionError" in (outcome.error or "")


# The pytest plugin


def run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W", "error", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_plugin_costs_nothing_when_unused(tmp_path: Path) -> None:
    """A session that uses no fixture of the kit has the plugin loaded (from its entry point)
    but imports neither the emulator nor the kit's modules."""
    (tmp_path / "test_plain.py").write_text(
        textwrap.dedent(
            """
            import sys

            def test_nothing_heavy_is_imported(pytestconfig):
                assert pytestconfig.pluginmanager.has_plugin("kong_pdk_fix")
                loaded = [m for m in sys.modules if m.startswith("kong_pdk_fix.")]
                assert "kong_pdk_fix.kongsim" not in loaded, loaded
                assert "kong_pdk_fix.testing.server" not in loaded, loaded
            """
        )
    )
    proc = run_pytest(tmp_path, "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_the_kong_fixture_needs_the_marker(tmp_path: Path) -> None:
    (tmp_path / "test_no_marker.py").write_text("def test_it(kong):\n    pass\n")
    proc = run_pytest(tmp_path, "-q", "--strict-markers")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the `kong` fixture needs @pytest.mark.kong_plugins(path)" in proc.stdout


def test_the_fixtures_in_a_fresh_session(tmp_path: Path) -> None:
    """The marker (with --strict-markers), kong_mode parametrized, and the factory."""
    write_plugin(tmp_path, "exit_first", EXIT_FIRST)
    (tmp_path / "test_fixtures.py").write_text(
        textwrap.dedent(
            """
            import pytest
            from kong_pdk_fix.testing import MODES

            @pytest.mark.kong_plugins("exit_first.py")
            @pytest.mark.parametrize("kong_mode", MODES)
            def test_marker(kong, kong_mode):
                assert kong.mode == kong_mode
                outcome = kong.run("access", kong.start_instance("exit_first"))
                assert (outcome.status, outcome.body) == (403, "denied")

            def test_factory(kong_plugin_server):
                kong = kong_plugin_server(["exit_first.py"], mode="gevent")
                assert kong.run("access", kong.start_instance("exit_first")).exit
            """
        )
    )
    proc = run_pytest(tmp_path, "-q", "--strict-markers")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 passed" in proc.stdout


def test_docs_code_comes_from_the_tested_examples() -> None:
    """Every Python block of docs/testing.md is part of a file in examples/, which CI runs."""
    docs = (ROOT / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", docs, re.DOTALL)
    assert blocks
    examples = [p.read_text() for p in (ROOT / "examples").rglob("*.py")]
    for block in blocks:
        assert any(block in source for source in examples), block
