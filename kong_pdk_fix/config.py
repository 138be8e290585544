"""The shim's settings: one object, filled from (highest first) configure(...), the wrapper
CLI's flags, KONG_PDK_FIX_* variables, and the defaults below.

nginx clears the environment of what it starts (KONG_PROTOCOL.md, "Start-up"): a variable
reaches a plugin server under Kong only when whitelisted through KONG_NGINX_MAIN_ENV, so the
wrapper's flags are the reliable way to set these in production.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Mapping, Optional

log = logging.getLogger("kong_pdk_fix")

ON_ERROR_CHOICES = ("fail-open", "fail-closed")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Settings:
    # Kong's read timeout is nginx's 60 s default: after that Kong sends no Step for the event.
    event_ttl: float = 60.0
    # Below Kong's 60 s read timeout, so the error reply reaches Kong before it drops the
    # connection (a reply after that is read by an unrelated request: KONG_PROTOCOL.md).
    handler_timeout: float = 50.0
    max_workers: int = 128
    # How long a HandleEvent waits for a free worker before answering "overloaded".
    overload_timeout: float = 5.0
    on_error: str = "fail-open"
    log_level: str = "warning"
    # A message larger than this closes its connection (Kong's are a few KiB; a request body
    # read through the PDK can be larger).
    max_message_size: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("event_ttl", "handler_timeout", "overload_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError("%s must be a positive number of seconds" % name)
        if self.max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        if self.max_message_size < 1024:
            raise ValueError("max_message_size must be at least 1024 bytes")
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError("on_error must be one of %s" % ", ".join(ON_ERROR_CHOICES))
        if self.log_level not in LOG_LEVELS:
            raise ValueError("log_level must be one of %s" % ", ".join(LOG_LEVELS))


ENV_PREFIX = "KONG_PDK_FIX_"
_CONVERTERS = {
    "event_ttl": float,
    "handler_timeout": float,
    "overload_timeout": float,
    "max_workers": int,
    "max_message_size": int,
    "on_error": str,
    "log_level": str,
}


def coerce(values: Mapping[str, Any]) -> Dict[str, Any]:
    """Convert raw values (strings from the environment or flags) to the settings' types."""
    out: Dict[str, Any] = {}
    for name, raw in values.items():
        if name not in _CONVERTERS:
            raise TypeError("unknown kong-pdk-fix setting %r" % name)
        if isinstance(raw, str):
            raw = raw.strip().lower() if _CONVERTERS[name] is str else raw.strip()
        try:
            out[name] = _CONVERTERS[name](raw)
        except ValueError:
            raise ValueError(
                "kong-pdk-fix setting %s=%r is not a %s" % (name, raw, _CONVERTERS[name].__name__)
            ) from None
    return out


def from_environ(environ: Mapping[str, str]) -> Dict[str, Any]:
    """The settings given through KONG_PDK_FIX_<NAME> variables; a bad value is logged and
    skipped, so a typo in the environment never stops the plugin server from starting."""
    out: Dict[str, Any] = {}
    for f in fields(Settings):
        key = ENV_PREFIX + f.name.upper()
        if key not in environ:
            continue
        try:
            value = coerce({f.name: environ[key]})
            replace(Settings(), **value)  # validate alone
        except (TypeError, ValueError) as ex:
            log.warning("kong-pdk-fix: ignoring %s: %s", key, ex)
            continue
        out.update(value)
    return out


def disabled(environ: Mapping[str, str] = os.environ) -> bool:
    """KONG_PDK_FIX_DISABLE=1 turns off every activation: the ops kill switch."""
    return environ.get("KONG_PDK_FIX_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


_lock = threading.Lock()
_overrides: Dict[str, Any] = {}  # configure(...) and the wrapper's flags
_current: Optional[Settings] = None  # what current() answers; rebuilt after configure()


def configure(**settings: Any) -> Settings:
    """Set settings from code; they win over flags and the environment. Returns the result.

    Engines read current() on every event, so a change applies from the next event on;
    max_workers only sizes a server's worker pool when its first event arrives."""
    global _current
    values = coerce(settings)
    with _lock:
        merged = dict(_overrides, **values)
        result = replace(Settings(), **dict(from_environ(os.environ), **merged))
        _overrides.clear()
        _overrides.update(merged)
        _current = result
    return result


def current() -> Settings:
    # Read on the hot path: one global load once the settings were built.
    settings = _current
    return settings if settings is not None else _build()


def _build() -> Settings:
    global _current
    with _lock:
        if _current is None:
            _current = replace(Settings(), **dict(from_environ(os.environ), **_overrides))
        return _current


def reset() -> None:
    """Forget configure(...) calls and re-read the environment (tests)."""
    global _current
    with _lock:
        _overrides.clear()
        _current = None
