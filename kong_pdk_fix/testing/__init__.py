"""Test your Kong Python plugins under an emulated Kong, in pytest or any test runner.

``EmulatedKong`` starts a real (patched) ``kong-python-pluginserver`` for your plugin files and
drives it as a Kong worker does: ``start_instance(name, config)``, then ``run(phase,
instance, Request(...))`` answers the plugin's PDK calls from the ``Request`` and returns an
``Outcome`` (``ret``, or the exit status, body and headers, and every PDK call made).
``assert_no_leaks`` is the leak guard. The pytest plugin (``kong_pdk_fix.testing.plugin``,
loaded automatically once the package is installed) gives the ``kong`` and
``kong_plugin_server`` fixtures; see docs/testing.md.

The names below load on first use, so that pytest loading the plugin costs nothing for test
sessions that do not use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..kongsim import STALL, LuaError, ScriptedPDK
    from .leaks import LeakError, LeakReport, Sample, check_leaks
    from .outcome import Outcome, PdkCall
    from .request import Request
    from .server import MODES, EmulatedKong, Instance

__all__ = [
    "MODES",
    "STALL",
    "EmulatedKong",
    "Instance",
    "LeakError",
    "LeakReport",
    "LuaError",
    "Outcome",
    "PdkCall",
    "Request",
    "Sample",
    "ScriptedPDK",
    "check_leaks",
]
# Where each public name lives, imported on first use.
_WHERE = {
    "EmulatedKong": ".server",
    "Instance": ".server",
    "MODES": ".server",
    "Request": ".request",
    "Outcome": ".outcome",
    "PdkCall": ".outcome",
    "LeakError": ".leaks",
    "LeakReport": ".leaks",
    "Sample": ".leaks",
    "check_leaks": ".leaks",
    "LuaError": "..kongsim",
    "STALL": "..kongsim",
    "ScriptedPDK": "..kongsim",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
