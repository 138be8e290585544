"""Your plugins in a real plugin server, and an emulated Kong worker talking to it."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

from .. import kongsim
from .leaks import LeakReport, check_leaks
from .outcome import Outcome
from .request import Request

MODES = ("thread", "gevent", "process")
PROBES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins")

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Instance:
    """A plugin instance Kong started: the plugin's ``name``, its ``config`` and its ``id``."""

    name: str
    config: dict[str, Any]
    id: int


class EmulatedKong:
    """A real ``kong-python-pluginserver`` serving your plugins, driven as one Kong worker.

    ``plugins`` is a plugin file, a directory of them, or a list of both; they are copied
    into a directory of their own next to the probes the leak guard needs. ``mode`` is
    ``thread`` (default), ``gevent`` (``-g``) or ``process`` (``-m``). With ``patched`` (the
    default) the server is ``kong-python-pluginserver-fixed``; ``patched=False`` runs
    upstream's unpatched server, to compare. ``env`` adds environment variables (e.g.
    ``KONG_PDK_FIX_EVENT_TTL``), ``extra_args`` command-line flags; ``lua_style=False``
    passes ``--no-lua-style``. ``read_timeout`` bounds each call Kong makes (Kong's own is
    60 s).

    Use as a context manager, or call ``start()`` and ``close()``; the pytest fixtures do it
    for you.
    """

    def __init__(
        self,
        plugins: PathLike | Sequence[PathLike],
        *,
        mode: str = "thread",
        patched: bool = True,
        env: dict[str, str | None] | None = None,
        extra_args: Sequence[str] = (),
        lua_style: bool = True,
        read_timeout: float = 10.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        paths = [plugins] if isinstance(plugins, (str, os.PathLike)) else list(plugins)
        self.plugin_paths = [os.path.abspath(os.fspath(p)) for p in paths]
        for path in self.plugin_paths:
            if not os.path.exists(path):
                raise FileNotFoundError(f"no plugin file or directory at {path}")
        self.mode = mode
        self.patched = patched
        self.read_timeout = read_timeout
        command = "kong-python-pluginserver-fixed" if patched else "kong-python-pluginserver"
        self._server_options: dict[str, Any] = dict(
            mode=mode,
            patched=patched,
            env=env,
            extra_args=extra_args,
            command=[_script(command)],
            lua_style=lua_style,
        )
        self._workdir: str | None = None
        self._server: kongsim.PluginServerProcess | None = None
        self._kong: kongsim.Kong | None = None

    def __enter__(self) -> EmulatedKong:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> EmulatedKong:
        """Copy the plugins, start the server and wait until it listens."""
        if self._server is not None:
            raise RuntimeError("EmulatedKong is already started")
        self._workdir = tempfile.mkdtemp(prefix="kong-pdk-fix-testing-")
        plugins_dir = os.path.join(self._workdir, "plugins")
        os.mkdir(plugins_dir)
        for path in self.plugin_paths:
            if os.path.isdir(path):
                shutil.copytree(
                    path,
                    plugins_dir,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"),
                )
            else:
                shutil.copy(path, plugins_dir)
        kongsim.install_probe(plugins_dir)
        for probe in os.listdir(PROBES_DIR):
            if probe.endswith(".py"):
                shutil.copy(os.path.join(PROBES_DIR, probe), plugins_dir)
        self._server = kongsim.PluginServerProcess(plugins_dir, **self._server_options)
        self._server.start()
        self._kong = kongsim.Kong(self._server.socket_path, read_timeout=self.read_timeout)
        return self

    def close(self) -> None:
        """Close Kong's connections, stop the server and remove the copied plugins."""
        if self._kong is not None:
            self._kong.close()
            self._kong = None
        if self._server is not None:
            self._server.stop()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    @property
    def server(self) -> kongsim.PluginServerProcess:
        """The plugin server process (``kongsim.PluginServerProcess``): pid, /proc readings."""
        if self._server is None:
            raise RuntimeError("EmulatedKong is not started: call start() or use it in a with")
        return self._server

    @property
    def worker(self) -> kongsim.Kong:
        """The emulator's Kong worker, for what this class does not cover (raw RPC calls)."""
        if self._kong is None:
            raise RuntimeError("EmulatedKong is not started: call start() or use it in a with")
        return self._kong

    def start_instance(self, name: str, config: dict[str, Any] | None = None) -> Instance:
        """``plugin.StartInstance`` of plugin ``name`` (its file name) with ``config``.

        As in Kong, the instance is kept for (name, config): a later ``run`` whose instance
        the server no longer knows starts it again.
        """
        config = dict(config or {})
        return Instance(name, config, self.worker.start_instance(name, config))

    def run(
        self,
        phase: str,
        instance: Instance,
        request: Request | kongsim.ScriptedPDK | None = None,
    ) -> Outcome:
        """Run one event of ``phase`` (``access``, ``log``, ...) for ``instance``, as Kong does.

        Kong answers the plugin's PDK calls from ``request`` (default: an empty ``GET /``), or
        from a ``kongsim.ScriptedPDK`` for full control. Returns how the event ended and
        every PDK call the plugin made.
        """
        if request is None:
            request = Request()
        pdk = request.pdk(phase) if isinstance(request, Request) else request
        raw = self.worker.run_event(instance.name, phase, pdk, instance.config)
        return Outcome.from_kongsim(raw)

    def stats(self) -> dict[str, Any] | None:
        """The shim's counters from ``plugin.GetStatus`` (``KongPdkFix``); None if unpatched."""
        status = self.worker.call("plugin.GetStatus", None)
        return status.get("KongPdkFix") if isinstance(status, dict) else None

    def output(self) -> str:
        """What the plugin server wrote to stdout and stderr (its log), also after close()."""
        return self._server.output() if self._server is not None else ""

    def check_leaks(
        self,
        instance: Instance,
        phase: str = "access",
        request: Request | None = None,
        *,
        events: int = 200,
        warmup: int = 20,
    ) -> LeakReport:
        """Run ``events`` events of ``phase`` for ``instance`` and report what they left behind.

        See ``kong_pdk_fix.testing.check_leaks``.
        """
        return check_leaks(self, instance, phase, request, events=events, warmup=warmup)

    def assert_no_leaks(
        self,
        instance: Instance,
        phase: str = "access",
        request: Request | None = None,
        *,
        events: int = 200,
        warmup: int = 20,
    ) -> LeakReport:
        """``check_leaks``, raising ``LeakError`` (an ``AssertionError``) naming what leaked."""
        report = self.check_leaks(instance, phase, request, events=events, warmup=warmup)
        report.raise_for_leaks()
        return report


def _script(name: str) -> str:
    # The console script of the environment running the tests, else the first on PATH.
    beside = os.path.join(os.path.dirname(sys.executable), name)
    found = beside if os.path.exists(beside) else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH")
    return found
