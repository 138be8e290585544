"""Which kong-pdk is installed, and does its plugin server have the shape the patch expects.

The supported range is declared here once. The version is read with importlib.metadata, so
checking it never imports kong_pdk (whose import pulls in gevent).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Tuple

try:
    from importlib import metadata
except ImportError:  # pragma: no cover - Python < 3.8 is not supported anyway
    metadata = None  # type: ignore[assignment]

DISTRIBUTION = "kong-pdk"
# Releases this package is tested against (tox factors kongpdk033..kongpdk036).
SUPPORTED = ((0, 33), (0, 36))

# Every Step* method Kong may call is an alias of PluginServer.step (kong_pdk/server.py).
STEP_METHODS = (
    "step",
    "step_service",
    "step_consumer",
    "step_route",
    "step_plugin",
    "step_credential",
    "step_memory_stats",
    "step_multi_map",
)
ERROR_STEP_METHOD = "step_error"
# The PluginServer attributes the engine reads, set by its __init__.
SERVER_ATTRIBUTES = ("instances", "logger", "lua_style", "use_gevent", "use_multiprocess")


def installed_version() -> Optional[str]:
    if metadata is None:
        return None
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def parse_version(text: str) -> Tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def supported_range_text() -> str:
    low, high = SUPPORTED
    return "%d.%d to %d.%d" % (low + high)


def version_problem(version: Optional[str]) -> Optional[str]:
    """Why this kong-pdk version is refused, or None when it is supported."""
    if version is None:
        return "kong-pdk is not installed (no distribution metadata for %r)" % DISTRIBUTION
    parsed = parse_version(version)[:2]
    low, high = SUPPORTED
    if not low <= parsed <= high:
        return "kong-pdk %s is outside the supported range %s" % (version, supported_range_text())
    return None


def shape_problem(server_module: Any) -> Optional[str]:
    """Why kong_pdk.server does not look like the releases we patch, or None."""
    cls = getattr(server_module, "PluginServer", None)
    if not inspect.isclass(cls):
        return "kong_pdk.server has no PluginServer class"
    for name in ("handle_event", "get_status", "start_instance", ERROR_STEP_METHOD) + STEP_METHODS:
        if not callable(getattr(cls, name, None)):
            return "kong_pdk.server.PluginServer.%s is missing" % name
    try:
        from kong_pdk.listener import Server
    except ImportError as ex:
        return "kong_pdk.listener.Server cannot be imported: %s" % ex
    if list(inspect.signature(Server.handle).parameters)[:3] != ["self", "fd", "address"]:
        return "kong_pdk.listener.Server.handle(self, fd, address, ...) has another signature"
    if getattr(server_module, "MSG_RET", None) != "ret":
        return "kong_pdk.server.MSG_RET is not 'ret'"
    try:
        from kong_pdk.pdk import Kong
    except ImportError as ex:
        return "kong_pdk.pdk.Kong cannot be imported: %s" % ex
    params = list(inspect.signature(Kong).parameters)
    if params[:2] != ["ch", "lua_style"]:
        return "kong_pdk.pdk.Kong(ch, lua_style) has another signature: %s" % params
    return None
