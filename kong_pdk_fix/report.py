"""What `kong-pdk-fix check` and `soak` share: the scenario plugin they install, a snapshot of
what a plugin server holds, and plain-text tables and numbers.

Standard library and the Kong emulator only: the diagnostics extra is optional.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from . import compat
from .kongsim import Kong, PluginServerProcess, probe_heap

EXTRA = "pip install 'kong-pdk-fix[check]'"
SCENARIO_TEMPLATE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "kongsim", "plugins", "kong_pdk_fix_scenario.py"
)
# The types that hold upstream's per-event queues (the original report's heap table).
QUEUE_TYPES = ("deque", "Queue", "Condition")
STATUS_KEY = "KongPdkFix"  # in the GetStatus reply of a patched server


def install_scenario_plugin(plugins_dir: str, name: str) -> str:
    """Copy the scenario plugin into `plugins_dir` as plugin `name`; returns its path."""
    target = os.path.join(plugins_dir, name + ".py")
    shutil.copyfile(SCENARIO_TEMPLATE, target)
    return target


def noop_leaks_upstream(version: Optional[str]) -> bool:
    """kong-pdk 0.33 and 0.34 keep every event until "ret" arrives by Step, so even an event
    with no PDK call stays for ever (KONG_PROTOCOL.md's leak table)."""
    return version is not None and compat.parse_version(version)[:2] <= (0, 34)


def missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


@dataclass
class Snapshot:
    """What a plugin server holds at one moment."""

    rss: int  # bytes
    threads: int
    fds: int
    counts: Dict[str, Any]  # the probe's report: live objects by class name
    live_events: Optional[int]  # events in the shim's table; None on an unpatched server

    @property
    def queue_objects(self) -> int:
        return sum(int(self.counts.get(name, 0)) for name in QUEUE_TYPES)


def fix_status(kong: Kong) -> Optional[Dict[str, Any]]:
    """The shim's stats from GetStatus, or None when the server runs unpatched."""
    return kong.call("plugin.GetStatus", None).get(STATUS_KEY)


def live_events(status: Optional[Dict[str, Any]]) -> Optional[int]:
    if status is None or "events" not in status:  # unpatched, or a mode the shim leaves alone
        return None
    return sum(status["events"].values())


def snapshot(server: PluginServerProcess, kong: Kong) -> Snapshot:
    """Probe the server through `kong` (one event) and read its /proc numbers."""
    counts = probe_heap(kong)
    return Snapshot(
        rss=server.rss(),
        threads=server.threads(),
        fds=server.fds(),
        counts=counts,
        live_events=live_events(fix_status(kong)),
    )


# -- text ---------------------------------------------------------------------------------------


def number(n: float) -> str:
    return "{:,}".format(int(round(n)))


def signed(n: float) -> str:
    return "{:+,}".format(int(round(n)))


def mib(size: float) -> str:
    return "%.1f MiB" % (size / 1024 / 1024)


def signed_mib(size: float) -> str:
    return "%+.1f MiB" % (size / 1024 / 1024)


def table(
    header: Optional[Sequence[str]],
    rows: Sequence[Sequence[str]],
    right: Sequence[int] = (),
    indent: str = "  ",
) -> str:
    """Columns padded to their widest cell; the columns in `right` are right-aligned."""
    every = ([header] if header else []) + list(rows)
    widths = [max(len(str(row[i])) for row in every) for i in range(len(every[0]))]
    lines: List[str] = []
    for row in every:
        cells = [
            str(cell).rjust(w) if i in right else str(cell).ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        ]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)
