"""Activation paths, each in a fresh interpreter of a venv that has the built wheel in it.

`pip install -e .` installs no .pth, so these run against the real wheel (conftest.wheel_venv)
and check the child's exit code and output. "isolated" children run with -S and site-packages
on PYTHONPATH: everything is importable but the .pth does not run, so only what the child
itself does can activate the shim.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import ROOT, Venv, child_env, explain

PTH_LINE = "import kong_pdk_fix._bootstrap as _kpf_bootstrap; _kpf_bootstrap.activate()"
START_LINE = "kong_pdk_fix._bootstrap:activate"
SENTINEL = "_kong_pdk_fix_installed"
DISABLE = {"KONG_PDK_FIX_DISABLE": "1"}

PLUGIN = """\
Schema = ({"message": {"type": "string"}},)
version = "0.1.0"
priority = 7


class Plugin(object):
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        kong.response.set_header("x-hello", "world")
"""

# Run in the children before the shim is imported: upstream's class as it was, and a check
# that each patched attribute is one wrapper layer over upstream's own function.
SNAPSHOT = """
import kong_pdk.listener as listener_module
import kong_pdk.server as server_module
cls = server_module.PluginServer
originals = dict(vars(cls))
listener_originals = dict(vars(listener_module.Server))
"""
HELPERS = f'''
import logging, warnings

def changed_names():
    return [n for n, v in vars(cls).items() if n in originals and v is not originals[n]]

def check_one_layer():
    names = changed_names()
    assert "get_status" in names, names
    for name in names:
        inner = getattr(vars(cls)[name], "__wrapped__", None)
        assert inner is originals[name], (name, inner, originals[name])
    handle = vars(listener_module.Server)["handle"]
    assert handle.__wrapped__ is listener_originals["handle"]
    assert vars(cls)["{SENTINEL}"] is True

def check_restored():
    assert set(vars(cls)) == set(originals), set(vars(cls)) ^ set(originals)
    for name, value in originals.items():
        assert vars(cls)[name] is value, name
    assert vars(listener_module.Server)["handle"] is listener_originals["handle"]
    assert not getattr(cls, "{SENTINEL}", False)

class Records(logging.Handler):
    def __init__(self):
        logging.Handler.__init__(self, logging.WARNING)
        self.records = []
    def emit(self, record):
        self.records.append(record)

def warnings_during(fn):
    """What fn returns, and the warnings (log records or warnings.warn) it emitted."""
    handler = Records()
    logger = logging.getLogger("kong_pdk_fix")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
    finally:
        logger.removeHandler(handler)
    return result, [r.getMessage() for r in handler.records] + [str(w.message) for w in caught]
'''


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, explain(proc)
    return proc


def child(*parts: str) -> str:
    return "\n".join(textwrap.dedent(part) for part in parts)


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "plugins"
    directory.mkdir()
    (directory / "hello.py").write_text(PLUGIN)
    return directory


# --- the wheel itself ------------------------------------------------------------------------


def test_wheel_ships_start_up_files_at_its_root(built_wheel: Path) -> None:
    with zipfile.ZipFile(built_wheel) as wheel:
        names = set(wheel.namelist())
        assert wheel.read("kong_pdk_fix.pth").decode().splitlines() == [PTH_LINE]
        assert wheel.read("kong_pdk_fix.start").decode().splitlines() == [START_LINE]
    # Inside the package they would do nothing: site.py reads .pth files of site dirs only.
    assert "kong_pdk_fix/kong_pdk_fix.pth" not in names
    for data in (ROOT / "kong_pdk_fix" / "kongsim" / "plugins").glob("*.py"):
        assert "kong_pdk_fix/kongsim/plugins/" + data.name in names


def test_wheel_puts_the_pth_into_site_packages(wheel_venv: Venv) -> None:
    assert (wheel_venv.purelib / "kong_pdk_fix.pth").read_text().splitlines() == [PTH_LINE]


def test_the_kong_pdk_under_test_is_supported_and_the_one_tox_names() -> None:
    import importlib.metadata

    from kong_pdk_fix.compat import version_problem

    version = importlib.metadata.version("kong-pdk")
    assert version_problem(version) is None
    factors = [f for f in os.environ.get("TOX_ENV_NAME", "").split("-") if f.startswith("kongpdk")]
    for factor in factors:  # outside tox: none
        assert version == f"0.{int(factor[len('kongpdk') :])}"


# --- the .pth --------------------------------------------------------------------------------


def test_pth_patches_kong_pdk_without_an_import_of_the_shim(wheel_venv: Venv) -> None:
    proc = wheel_venv.python_c(
        f"import kong_pdk.server as s; assert s.PluginServer.{SENTINEL} is True; print('patched')"
    )
    assert check(proc).stdout.split() == ["patched"]


def test_start_up_imports_neither_kong_pdk_nor_gevent(wheel_venv: Venv) -> None:
    # The hook is lazy: interpreters that never use kong-pdk pay for importing wrapt only.
    proc = wheel_venv.python_c(
        "import sys; print(sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('kong_pdk', 'gevent')))"
    )
    assert check(proc).stdout.strip() == "[]"


def test_disable_turns_the_pth_and_install_off(wheel_venv: Venv) -> None:
    code = child(
        f"""
        import kong_pdk.server as s
        assert not getattr(s.PluginServer, "{SENTINEL}", False)
        import kong_pdk_fix
        assert kong_pdk_fix.install() is False
        assert kong_pdk_fix.is_installed() is False
        assert not getattr(s.PluginServer, "{SENTINEL}", False)
        print("upstream")
        """
    )
    assert check(wheel_venv.python_c(code, env=DISABLE)).stdout.split() == ["upstream"]


# --- import kong_pdk_fix ---------------------------------------------------------------------


def test_isolated_child_is_not_patched_without_the_shim(wheel_venv: Venv) -> None:
    # The control for the isolated tests below: -S really keeps the .pth out.
    proc = wheel_venv.python_c(
        f"import sys, kong_pdk.server as s; print(getattr(s.PluginServer, '{SENTINEL}', False),"
        " 'kong_pdk_fix' in sys.modules)",
        isolated=True,
    )
    assert check(proc).stdout.split() == ["False", "False"]


@pytest.mark.parametrize("shim_first", [True, False], ids=["shim-first", "kong-pdk-first"])
def test_import_activates_in_either_order(wheel_venv: Venv, shim_first: bool) -> None:
    if shim_first:
        code = child(
            """
            import kong_pdk_fix
            import kong_pdk.server as s
            """
        )
    else:
        code = child(
            f"""
            import kong_pdk.server as s
            assert not getattr(s.PluginServer, "{SENTINEL}", False)
            import kong_pdk_fix
            """
        )
    code += child(
        f"""
        assert kong_pdk_fix.is_installed() is True
        assert s.PluginServer.{SENTINEL} is True
        print("patched")
        """
    )
    assert check(wheel_venv.python_c(code, isolated=True)).stdout.split() == ["patched"]


def test_install_twice_keeps_one_wrapper_layer(wheel_venv: Venv) -> None:
    code = child(
        SNAPSHOT,
        HELPERS,
        """
        import kong_pdk_fix  # the post-import hook installs here
        assert kong_pdk_fix.is_installed()
        check_one_layer()
        second, second_warnings = warnings_during(kong_pdk_fix.install)
        third, third_warnings = warnings_during(kong_pdk_fix.install)
        assert second is True and third is True, (second, third)
        check_one_layer()
        # A repeated install is normal (the .pth runs twice in a venv, the wrapper CLI installs
        # after the hook did): at most one warning about it, never one per call.
        assert len(second_warnings + third_warnings) <= 1, second_warnings + third_warnings
        assert "KongPdkFix" in cls().get_status()
        print("one layer")
        """,
    )
    assert check(wheel_venv.python_c(code, isolated=True)).stdout.split() == ["one", "layer"]


def test_install_from_two_threads_at_once_patches_once(wheel_venv: Venv) -> None:
    code = child(
        SNAPSHOT,
        HELPERS,
        """
        import sys, threading
        import kong_pdk_fix
        assert kong_pdk_fix.uninstall() is True
        check_restored()
        sys.setswitchinterval(1e-6)  # interleave the two installs as finely as we can
        for attempt in range(30):
            barrier = threading.Barrier(2)
            results = []

            def racer():
                barrier.wait()
                results.append(kong_pdk_fix.install())

            threads = [threading.Thread(target=racer) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert results == [True, True], (attempt, results)
            assert kong_pdk_fix.is_installed()
            check_one_layer()  # a second patch would wrap the first wrapper
            assert kong_pdk_fix.uninstall() is True
            check_restored()
        print("raced")
        """,
    )
    assert check(wheel_venv.python_c(code, isolated=True)).stdout.split() == ["raced"]


def test_uninstall_restores_upstream_and_install_works_again(wheel_venv: Venv) -> None:
    code = child(
        SNAPSHOT,
        HELPERS,
        """
        import kong_pdk_fix
        check_one_layer()
        assert "KongPdkFix" in cls().get_status()
        assert kong_pdk_fix.uninstall() is True
        assert kong_pdk_fix.is_installed() is False
        check_restored()
        assert "KongPdkFix" not in cls().get_status()
        assert kong_pdk_fix.install() is True
        check_one_layer()
        assert kong_pdk_fix.uninstall() is True
        check_restored()
        print("restored")
        """,
    )
    assert check(wheel_venv.python_c(code, isolated=True)).stdout.split() == ["restored"]


def test_unknown_kong_pdk_shape_is_refused_and_left_intact(wheel_venv: Venv) -> None:
    code = child(
        """
        import sys
        import kong_pdk.server as s
        del s.PluginServer.step
        before = dict(vars(s.PluginServer))
        import kong_pdk_fix  # the hook tries to install here, and must refuse
        sys.stderr.flush()
        print("@@ after the hook @@", file=sys.stderr, flush=True)
        assert kong_pdk_fix.install() is False
        assert kong_pdk_fix.is_installed() is False
        assert dict(vars(s.PluginServer)) == before
        print("refused")
        """
    )
    proc = check(wheel_venv.python_c(code, isolated=True))
    assert proc.stdout.split() == ["refused"]
    hook_part = proc.stderr.split("@@ after the hook @@")[0]
    hook_lines = [line for line in hook_part.splitlines() if line.strip()]
    assert len(hook_lines) == 1, proc.stderr
    assert "step" in hook_lines[0], hook_lines


# --- interpreter start-up never fails --------------------------------------------------------


@pytest.mark.parametrize(
    "variable, value",
    [
        ("KONG_PDK_FIX_EVENT_TTL", "banana"),
        ("KONG_PDK_FIX_HANDLER_TIMEOUT", "-1"),
        ("KONG_PDK_FIX_MAX_WORKERS", "many"),
        ("KONG_PDK_FIX_ON_ERROR", "sideways"),
        ("KONG_PDK_FIX_OVERLOAD_TIMEOUT", ""),
        ("KONG_PDK_FIX_LOG_LEVEL", "LOUDEST"),
        ("KONG_PDK_FIX_DISABLE", "maybe"),
    ],
)
@pytest.mark.parametrize("code", ["print('ok')", "import kong_pdk.server; print('ok')"])
def test_a_broken_setting_never_stops_the_interpreter(
    wheel_venv: Venv, variable: str, value: str, code: str
) -> None:
    proc = wheel_venv.python_c(code, env={variable: value})
    assert check(proc).stdout.split() == ["ok"]
    assert "Traceback" not in proc.stderr, proc.stderr


def test_a_broken_wrapt_never_stops_the_interpreter(wheel_venv: Venv, tmp_path: Path) -> None:
    fake = tmp_path / "wrapt"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated broken wrapt')\n")
    for code in ("print('ok')", "import kong_pdk.server; print('ok')"):
        proc = wheel_venv.python_c(code, env={"PYTHONPATH": str(tmp_path)})
        assert check(proc).stdout.split() == ["ok"]


# --- plugin servers: the wrapper CLI, dedicated servers, upstream's CLI ----------------------


def rpc(path: str, method: str, args: list[Any], timeout: float = 10) -> Any:
    """One MessagePack-RPC call, as Kong makes it: [0, msgid, method, args]."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(msgpack.packb([0, 1, method, args]))
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        while True:
            data = conn.recv(65536)
            assert data, "the plugin server closed the connection"
            unpacker.feed(data)
            for message in unpacker:
                if message[:2] == [2, "serverPid"]:  # the fix's notification, before a reply
                    continue
                kind, msgid, error, result = message
                assert (kind, msgid) == (1, 1)
                assert error is None, error
                return result


@contextlib.contextmanager
def serving(
    args: list[str],
    socket_name: str,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Start a plugin server with `-p <new dir>` appended; yield its socket once it answers."""
    prefix = tempfile.mkdtemp(prefix="kpf-")  # short: unix socket paths are limited to 107 bytes
    path = os.path.join(prefix, socket_name)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [*args, "-p", prefix],
            env=child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"server exited with {proc.returncode}:\n{log.read()}")
                try:
                    rpc(path, "plugin.GetStatus", [], timeout=2)
                    break
                except OSError:  # not bound or not listening yet
                    if time.monotonic() > deadline:
                        log.seek(0)
                        pytest.fail("server did not answer in 30 s:\n" + log.read())
                    time.sleep(0.05)
            yield path
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            shutil.rmtree(prefix, ignore_errors=True)


def wrapper_cli(venv: Venv) -> list[str]:
    """kong-python-pluginserver-fixed run with -S: no .pth, only the wrapper activates."""
    return [
        str(venv.python),
        "-S",
        "-c",
        "import sys; from kong_pdk_fix.cli import pluginserver_main; sys.exit(pluginserver_main())",
    ]


def isolated_env(venv: Venv, extra: dict[str, str] | None = None) -> dict[str, str]:
    return dict(extra or {}, PYTHONPATH=str(venv.purelib))


def test_wrapper_dumps_what_upstream_dumps(wheel_venv: Venv, plugin_dir: Path) -> None:
    # Kong's query command. (Upstream's --dump-plugin-info fails in every release from 0.33 to
    # 0.36: it unpacks get_plugin_info()'s dict as a (ret, err) pair.)
    flag = "--dump-all-plugins"
    upstream = subprocess.run(
        [str(wheel_venv.script("kong-python-pluginserver")), "-d", str(plugin_dir), flag],
        env=child_env(DISABLE),
        check=False,
        capture_output=True,
        timeout=60,
    )
    fixed = subprocess.run(
        [str(wheel_venv.script("kong-python-pluginserver-fixed")), "-d", str(plugin_dir), flag],
        env=child_env(),
        check=False,
        capture_output=True,
        timeout=60,
    )
    assert upstream.returncode == 0, upstream.stderr
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout == upstream.stdout
    (info,) = json.loads(fixed.stdout)
    assert (info["Name"], info["Phases"], info["Priority"]) == ("hello", ["access"], 7)


def test_wrapper_serves_patched(wheel_venv: Venv, plugin_dir: Path) -> None:
    args = [
        *wrapper_cli(wheel_venv),
        "-d",
        str(plugin_dir),
        "--event-ttl",
        "30",
        "--handler-timeout",
        "20",
        "--max-workers",
        "8",
        "--on-error",
        "fail-closed",
    ]
    with serving(args, "python_pluginserver.sock", isolated_env(wheel_venv)) as path:
        status = rpc(path, "plugin.GetStatus", [])
    assert "KongPdkFix" in status
    assert "hello" in status["Plugins"]


def test_pth_patches_upstreams_own_cli(wheel_venv: Venv, plugin_dir: Path) -> None:
    args = [str(wheel_venv.script("kong-python-pluginserver")), "-d", str(plugin_dir)]
    with serving(args, "python_pluginserver.sock") as path:
        assert "KongPdkFix" in rpc(path, "plugin.GetStatus", [])


@pytest.mark.upstream
@pytest.mark.parametrize("cli", ["kong-python-pluginserver", "kong-python-pluginserver-fixed"])
def test_disable_serves_upstream(wheel_venv: Venv, plugin_dir: Path, cli: str) -> None:
    args = [str(wheel_venv.script(cli)), "-d", str(plugin_dir)]
    with serving(args, "python_pluginserver.sock", DISABLE) as path:
        status = rpc(path, "plugin.GetStatus", [])
    assert "KongPdkFix" not in status
    assert "hello" in status["Plugins"]


DEDICATED = """\
import kong_pdk_fix  # noqa: F401  (the activation path under test: the first line)

import kong_pdk.cli


class Plugin(object):
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        pass


if __name__ == "__main__":
    kong_pdk.cli.start_dedicated_server("dedi", Plugin, "0.1", 0, [])
"""


def test_dedicated_server_importing_the_shim_first(wheel_venv: Venv, tmp_path: Path) -> None:
    script = tmp_path / "dedi.py"
    script.write_text(DEDICATED)
    plain = tmp_path / "plain.py"
    plain.write_text(DEDICATED.replace("import kong_pdk_fix", "pass"))

    dumped = check(wheel_venv.run_python([str(script), "--dump"], isolated=True))
    upstream = check(wheel_venv.run_python([str(plain), "--dump"], isolated=True))
    assert dumped.stdout == upstream.stdout
    (info,) = json.loads(dumped.stdout)
    assert (info["Name"], info["Version"], info["Phases"]) == ("dedi", "0.1", ["access"])

    args = [str(wheel_venv.python), "-S", str(script)]
    with serving(args, "dedi.sock", isolated_env(wheel_venv)) as path:
        status = rpc(path, "plugin.GetStatus", [])
    assert "KongPdkFix" in status
    assert "dedi" in status["Plugins"]
