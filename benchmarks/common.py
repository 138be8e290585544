"""What benchmarks/leaks.py and benchmarks/perf.py share: a plugin server under test, where
their plugins come from, the machine and checkout lines of their reports, markdown tables.

The scripts run as `python benchmarks/<script>.py`, so this directory is sys.path[0] and
`import common` finds this module.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence

from kong_pdk_fix.kongsim import Kong, PluginServerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024 * 1024
# The benchmark's own handlers first, then the tests' (reused by path, so that tests and
# benchmarks speak of the same handlers).
PLUGIN_DIRS = (os.path.join(ROOT, "benchmarks", "plugins"), os.path.join(ROOT, "tests", "plugins"))


def plugin_file(name: str) -> str:
    """The path of plugin `name` in benchmarks/plugins or tests/plugins."""
    for directory in PLUGIN_DIRS:
        path = os.path.join(directory, name + ".py")
        if os.path.exists(path):
            return path
    raise FileNotFoundError("no plugin %r in %s" % (name, " or ".join(PLUGIN_DIRS)))


class ServerUnderTest:
    """A real kong-python-pluginserver (or `command`) serving `plugins` from a temporary
    plugins directory, with an emulated Kong worker (`kong`) while entered. Leaving stops the
    server, also on errors."""

    def __init__(
        self,
        plugins: Sequence[str],
        *,
        mode: str,
        patched: bool,
        read_timeout: float,
        env: Optional[Dict[str, Optional[str]]] = None,
        command: Optional[List[str]] = None,
    ) -> None:
        self.patched = patched
        self.dir = tempfile.mkdtemp(prefix="kpf-bench-")
        for name in plugins:
            shutil.copy(plugin_file(name), self.dir)
        self.process = PluginServerProcess(
            self.dir, mode=mode, patched=patched, env=env, command=command
        )
        self.read_timeout = read_timeout
        self.kong: Optional[Kong] = None

    def __enter__(self) -> "ServerUnderTest":
        try:
            self.process.start()
            self.kong = self.process.kong(read_timeout=self.read_timeout)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kong is not None:
            self.kong.close()
        self.process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def pids(self) -> List[int]:
        # In -m mode the handlers run in pool processes: they are part of the server.
        return [self.process.pid] + self.process.children()

    def total(self, reading: Callable[[int], int]) -> int:
        """reading(pid) summed over the server's processes."""
        out = 0
        for pid in self.pids():
            try:
                out += reading(pid)
            except OSError:
                pass  # a pool process that just ended
        return out


def add_mode_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=("thread", "gevent", "process"),
        default="thread",
        help="kong-python-pluginserver mode: the default, -g or -m (%(default)s)",
    )


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%d CPUs (nproc; %s), %s %s, Python %s (%s)" % (
        os.cpu_count() or 0,
        cpu,
        platform.system(),
        platform.release(),
        platform.python_version(),
        sys.executable,
    )


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", ROOT, *args], check=True, capture_output=True, text=True
    ).stdout


def checkout() -> str:
    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        dirty = git("status", "--porcelain").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes" if dirty else "")


def table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> List[str]:
    """A markdown table; `align` has an "l" or "r" per column."""
    rule = "".join("---|" if a == "l" else "---:|" for a in align)
    lines = ["| " + " | ".join(header) + " |", "|" + rule]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
