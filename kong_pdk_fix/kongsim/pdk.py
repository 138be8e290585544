"""Kong's side of a PDK call: scripted answers, Lua errors, silence, and how a result is sent back.

A plugin's PDK call reaches Kong as ``{Method, Args}``; Kong runs the Lua method and sends the
result with a ``Step*`` call (KONG_PROTOCOL.md "Kong's loop for one event"). Here a
``ScriptedPDK`` stands in for the Lua methods and ``step_for`` mirrors ``get_step_method`` and
``must_fix`` of Kong's ``kong/runloop/plugin_servers/mp_rpc.lua``.

Value conventions for answers (Kong packs Lua values, KONG_PROTOCOL.md "Framing"):
a Python ``str`` is a Lua string, sent as msgpack ``str`` (use ``lua_string`` for bytes that are
not UTF-8); ``bytes`` is sent as ``bin``; a ``tuple`` stands for Lua's multiple return values.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Callable

TERMINAL_METHODS = frozenset(("kong.response.exit", "kong.response.error"))

# mp_rpc.lua get_step_method: the typed Step for results that are Kong entities or multi-maps.
STEP_METHODS: dict[str, str] = {
    "kong.client.get_credential": "plugin.StepCredential",
    "kong.client.load_consumer": "plugin.StepConsumer",
    "kong.client.get_consumer": "plugin.StepConsumer",
    "kong.client.authenticate": "plugin.StepCredential",
    "kong.node.get_memory_stats": "plugin.StepMemoryStats",
    "kong.router.get_route": "plugin.StepRoute",
    "kong.router.get_service": "plugin.StepService",
    "kong.request.get_query": "plugin.StepMultiMap",
    "kong.request.get_headers": "plugin.StepMultiMap",
    "kong.response.get_headers": "plugin.StepMultiMap",
    "kong.service.response.get_headers": "plugin.StepMultiMap",
}

# mp_rpc.lua must_fix: header and query getters become maps of arrays, raw bodies become bin.
MULTI_MAP_METHODS = frozenset(
    (
        "kong.request.get_query",
        "kong.request.get_headers",
        "kong.response.get_headers",
        "kong.service.response.get_headers",
    )
)
RAW_BODY_METHODS = frozenset(
    (
        "kong.request.get_raw_body",
        "kong.response.get_raw_body",
        "kong.service.response.get_raw_body",
    )
)

# KONG_PROTOCOL.md "The log phase": the calls answered from the data saved for the log timer.
LOG_PHASE_METHODS = frozenset(
    (
        "kong.log.serialize",
        "kong.request.get_header",
        "kong.request.get_headers",
        "kong.request.get_uri_captures",
        "kong.response.get_status",
        "kong.response.get_header",
        "kong.response.get_headers",
        "kong.response.get_source",
        "kong.ctx.shared.get",
        "kong.ctx.shared.set",
        "kong.nginx.get_ctx",
        "kong.nginx.set_ctx",
        "kong.nginx.req_start_time",
    )
)
# Writing to the error log needs no request, so kong.log.<level> works in the timer too.
LOG_LEVELS = frozenset(("debug", "info", "notice", "warn", "err", "crit", "alert", "emerg"))


class LuaError(Exception):
    """A PDK method that raises in Lua: Kong unwinds and sends nothing more for the event."""


class _Stall:
    def __repr__(self) -> str:
        return "STALL"


STALL = _Stall()
"""Answer meaning Kong goes silent: no Step and no error ever follows (a dropped event)."""


def answered_in_log_phase(method: str) -> bool:
    """Whether Kong's log timer answers ``method`` (KONG_PROTOCOL.md "The log phase")."""
    prefix, _, level = method.rpartition(".")
    return method in LOG_PHASE_METHODS or (prefix == "kong.log" and level in LOG_LEVELS)


class ScriptedPDK:
    """Kong's PDK as a script: per method a value, a callable, a ``LuaError`` or ``STALL``.

    ``answers`` maps a PDK method name to its answer; methods not in it get ``default``
    (interpreted the same way). A callable is called with the call's arguments and its return
    value is the answer. ``allowed``, if given, is a predicate: other methods raise ``LuaError``.
    Every call is recorded in ``calls`` as ``(method, args)`` unless ``record`` is false.
    """

    def __init__(
        self,
        answers: Mapping[str, Any] | None = None,
        default: Any = None,
        *,
        allowed: Callable[[str], bool] | None = None,
        record: bool = True,
    ) -> None:
        self.answers: dict[str, Any] = dict(answers or {})
        self.default = default
        self.allowed = allowed
        self.record = record
        self.calls: list[tuple[str, list]] = []
        self._lock = threading.Lock()

    @classmethod
    def for_log_phase(cls, base: ScriptedPDK | None = None) -> ScriptedPDK:
        """The PDK of Kong's log timer: ``base``'s answers for the few methods answered there."""
        if base is None:
            return cls(allowed=answered_in_log_phase)
        return cls(base.answers, base.default, allowed=answered_in_log_phase, record=base.record)

    def call(self, method: str, args: list) -> Any:
        """Run one PDK call as Kong would; raises ``LuaError`` or returns ``STALL`` as scripted."""
        if self.record:
            with self._lock:
                self.calls.append((method, list(args)))
        if self.allowed is not None and not self.allowed(method):
            raise LuaError(f"{method} is not available in the log timer")
        answer = self.answers.get(method, self.default)
        if callable(answer):
            answer = answer(*args)
        if isinstance(answer, LuaError):
            raise LuaError(*answer.args)
        return answer


def lua_string(raw: bytes) -> str:
    """A Lua string holding arbitrary bytes: Kong packs it as msgpack ``str`` even if not UTF-8."""
    return raw.decode("utf-8", "surrogateescape")


def lua_value(value: Any) -> Any:
    """``value`` as Kong's packer carries the Lua value: an empty table is an empty array."""
    if isinstance(value, dict):
        if not value:
            return []
        return {k: lua_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [lua_value(v) for v in value]
    return value


def _multi_map(value: Any) -> Any:
    if not isinstance(value, dict):
        return lua_value(value)
    # mp_rpc.lua fix_mmap: true is an empty array, a string a one-element array, {} a map.
    return {
        k: [] if v is True else [v] if isinstance(v, str) else lua_value(v)
        for k, v in value.items()
    }


def _raw_body(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return value


def step_for(method: str, result: Any, kong_version: str = "3.x") -> tuple[str, Any]:
    """The Step method and the Data Kong sends for ``result`` of PDK ``method``.

    Data ``None`` means the key is left out (a Lua nil). A tuple result is Lua's multiple
    return values: Kong 3.x keeps only the first; Kong 2.8 sends ``StepError`` with the second
    when the first is nil or false.
    """
    if isinstance(result, tuple):
        value = result[0] if result else None
        err = result[1] if len(result) > 1 else None
        if kong_version.startswith("2.") and (value is None or value is False) and err:
            return "plugin.StepError", err
        result = value
    if method in MULTI_MAP_METHODS:
        data = _multi_map(result)
    elif method in RAW_BODY_METHODS:
        data = _raw_body(result)
    else:
        data = lua_value(result)
    if isinstance(result, dict) and isinstance(result.get("_method"), str):
        return result["_method"], data
    return STEP_METHODS.get(method, "plugin.Step"), data
