"""A real plugin server process, started as Kong's ``pluginserver_<name>_start_cmd`` would be.

Resource readings come from /proc (Linux only), so nothing beyond the stdlib is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from .kong import Kong

MODES = {"thread": [], "gevent": ["-g"], "process": ["-m"]}
DEFAULT_SOCKET_NAME = "python_pluginserver.sock"  # kong_pdk.listener.DEFAULT_SOCKET_NAME
DISABLE_VARIABLE = "KONG_PDK_FIX_DISABLE"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


class PluginServerProcess:
    """``kong-python-pluginserver`` (or ``command``) serving ``plugins_dir`` on a unix socket.

    ``mode`` is ``thread`` (default), ``gevent`` (``-g``) or ``process`` (``-m``).
    ``patched=False`` sets ``KONG_PDK_FIX_DISABLE=1`` so the shim stays out; ``patched=True``
    removes that variable. ``env`` adds variables (a ``None`` value removes one). stdout and
    stderr go to a log file, read by ``output()``. Use as a context manager or call
    ``start()`` / ``stop()``.
    """

    def __init__(
        self,
        plugins_dir: str,
        *,
        mode: str = "thread",
        patched: bool = True,
        env: dict[str, str | None] | None = None,
        extra_args: Sequence[str] = (),
        command: Sequence[str] | None = None,
        lua_style: bool = True,
        prefix: str | None = None,
        verbose: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}")
        self.plugins_dir = os.path.abspath(plugins_dir)
        self.mode = mode
        self.patched = patched
        self.extra_args = list(extra_args)
        self.command = (
            list(command)
            if command
            else [os.path.join(os.path.dirname(sys.executable), "kong-python-pluginserver")]
        )
        self.lua_style = lua_style
        self.verbose = int(verbose)
        self._extra_env = dict(env or {})
        self._own_prefix = prefix is None
        self.prefix = prefix or tempfile.mkdtemp(prefix="kongsim-")
        self.socket_path = os.path.join(self.prefix, _socket_name(self.extra_args))
        self.log_path = os.path.join(self.prefix, "pluginserver.log")
        self._proc: subprocess.Popen | None = None
        self._log: Any | None = None
        self._final_output: str | None = None
        self._plugins_info: list[dict[str, Any]] | None = None

    def __enter__(self) -> PluginServerProcess:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def environment(self) -> dict[str, str]:
        """The environment the server runs with."""
        env = dict(os.environ)
        env.pop(DISABLE_VARIABLE, None)
        if not self.patched:
            env[DISABLE_VARIABLE] = "1"
        for key, value in self._extra_env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def command_line(self) -> list[str]:
        """The start command, as it would appear in ``pluginserver_<name>_start_cmd``."""
        args = self.command + ["-p", self.prefix, "-d", self.plugins_dir] + MODES[self.mode]
        if not self.lua_style:
            args.append("--no-lua-style")
        args += ["-v"] * self.verbose
        return args + self.extra_args

    def start(self) -> PluginServerProcess:
        """Start the server and wait (at most 15 s) until its socket accepts a connection."""
        os.makedirs(self.prefix, exist_ok=True)  # stop() removes a prefix of our own
        self._final_output = None
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (open while the server runs)
        self._proc = subprocess.Popen(
            self.command_line(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.environment(),
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._accepts():
            if self._proc.poll() is not None:
                output = self.output()
                self.stop()
                raise RuntimeError(f"plugin server exited with {self._proc.returncode}:\n{output}")
            if time.monotonic() > deadline:
                output = self.output()
                self.stop()
                raise RuntimeError(
                    f"plugin server did not listen within {START_TIMEOUT:.0f} s:\n{output}"
                )
            time.sleep(0.02)
        return self

    def _accepts(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.socket_path)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; child processes (``-m`` pool) are killed too."""
        if self._proc is None:
            return
        children = self.children() if self.alive() else []
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(STOP_TIMEOUT)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_prefix and self._final_output is None:
            self._final_output = self.output()
            shutil.rmtree(self.prefix, ignore_errors=True)

    def output(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        if self._final_output is not None:
            return self._final_output
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("plugin server not started")
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def rss(self, pid: int | None = None) -> int:
        """Resident set size in bytes (VmRSS of /proc/<pid>/status)."""
        with open(f"/proc/{pid or self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def threads(self, pid: int | None = None) -> int:
        """Number of threads (entries of /proc/<pid>/task)."""
        return len(os.listdir(f"/proc/{pid or self.pid}/task"))

    def fds(self, pid: int | None = None) -> int:
        """Number of open file descriptors (entries of /proc/<pid>/fd)."""
        return len(os.listdir(f"/proc/{pid or self.pid}/fd"))

    def children(self) -> list[int]:
        """Pids of the server's child processes (the ``-m`` pool), from /proc/*/stat."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            # The command name in parentheses may hold spaces; the ppid is the 2nd field after it.
            if int(stat.rpartition(")")[2].split()[1]) == self.pid:
                found.append(int(entry))
        return found

    def dump_all_plugins(self) -> list[dict[str, Any]]:
        """The ``--dump-all-plugins`` JSON (what Kong's ``query_cmd`` reads)."""
        if self._plugins_info is None:
            done = subprocess.run(
                self.command + ["-d", self.plugins_dir, "--dump-all-plugins"] + self.extra_args,
                check=False,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=self.environment(),
                timeout=30,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"--dump-all-plugins failed ({done.returncode}):\n"
                    + done.stderr.decode("utf-8", "replace")
                )
            self._plugins_info = json.loads(done.stdout)
        return self._plugins_info

    def kong(self, **options: Any) -> Kong:
        """A ``Kong`` worker for this server that knows each plugin's phases."""
        return Kong(self.socket_path, plugins_info=self.dump_all_plugins(), **options)


def _socket_name(extra_args: Sequence[str]) -> str:
    args = list(extra_args)
    for i, arg in enumerate(args):
        if arg == "--socket-name" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--socket-name="):
            return arg.partition("=")[2]
    return DEFAULT_SOCKET_NAME
