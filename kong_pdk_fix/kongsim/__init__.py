"""Kong emulator: drives a real plugin server over its unix socket as Kong's workers do.

Written from ``KONG_PROTOCOL.md``; it imports nothing from the rest of ``kong_pdk_fix``.
"""

from __future__ import annotations

from .kong import Kong, Outcome
from .load import DriveResult, drive, install_probe, probe_heap
from .pdk import STALL, LuaError, ScriptedPDK, lua_string, step_for
from .process import PluginServerProcess
from .rpc import ConnectionClosed, ProtocolError, ReadTimeout, RPCError

__all__ = [
    "STALL",
    "ConnectionClosed",
    "DriveResult",
    "Kong",
    "LuaError",
    "Outcome",
    "PluginServerProcess",
    "ProtocolError",
    "RPCError",
    "ReadTimeout",
    "ScriptedPDK",
    "drive",
    "install_probe",
    "lua_string",
    "probe_heap",
    "step_for",
]
