"""install() and uninstall(): thin wrapt wrappers. kong_pdk.listener.Server.handle hands each
Kong connection to our listener (which hands HandleEvent and Step* to the engine instead of
upstream's PluginServer methods); on kong_pdk.server.PluginServer, GetStatus adds the engine's
stats and StartInstance numbers instances apart from earlier server processes. Upstream files
are never edited.

install() is idempotent, thread-safe, all-or-nothing and reversible; it refuses an unsupported
kong-pdk with one log line and leaves upstream as it was.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Callable, Dict, Tuple

import wrapt

from . import compat, config

log = logging.getLogger("kong_pdk_fix")

SENTINEL = "_kong_pdk_fix_installed"  # set on PluginServer while patched
ENGINE_ATTRIBUTE = "_kong_pdk_fix_engine"  # set on each PluginServer instance, lazily
FIRST_ID_ATTRIBUTE = "_kong_pdk_fix_first_instance_id"  # likewise, at its first StartInstance

_lock = threading.RLock()
# (class, attribute name) -> upstream's function, while installed.
_originals: Dict[Tuple[type, str], Any] = {}


def _engine_for(server: Any) -> Any:
    """The engine serving this PluginServer, created on its first call."""
    engine = server.__dict__.get(ENGINE_ATTRIBUTE)
    if engine is not None:
        return engine
    with _lock:
        engine = server.__dict__.get(ENGINE_ATTRIBUTE)
        if engine is None:
            from .backends import for_server
            from .engine import Engine

            engine = Engine(server, for_server(server))
            server.__dict__[ENGINE_ATTRIBUTE] = engine
        return engine


def _get_status(wrapped: Callable, server: Any, args: tuple, kwargs: dict) -> Any:
    status = wrapped(*args, **kwargs)
    status["KongPdkFix"] = _engine_for(server).stats()
    return status


def _start_instance(wrapped: Callable, server: Any, args: tuple, kwargs: dict) -> Any:
    # Upstream numbers instances from 0 in every process, so after a restart an id a Kong
    # worker cached can name another plugin's instance. Starting from this process's start
    # time in microseconds keeps ids apart across restarts (and exact in Lua's doubles).
    first = server.__dict__.setdefault(FIRST_ID_ATTRIBUTE, time.time_ns() // 1000)
    if server.instance_id < first:
        server.instance_id = first  # max(): concurrent first calls agree
    return wrapped(*args, **kwargs)


def _handle_connection(wrapped: Callable, listener: Any, args: tuple, kwargs: dict) -> Any:
    from .listener import serve

    serve(listener.ps, _engine_for(listener.ps), args[0] if args else kwargs["fd"])


def _wrappers(server_module: Any) -> Dict[Tuple[type, str], Callable]:
    import kong_pdk.listener

    cls = server_module.PluginServer
    return {
        (cls, "get_status"): _get_status,
        (cls, "start_instance"): _start_instance,
        (kong_pdk.listener.Server, "handle"): _handle_connection,
    }


def install() -> bool:
    """Patch kong_pdk's plugin server. True when the fix is in place (now or already)."""
    if config.disabled():
        log.info("kong-pdk-fix: not installed: KONG_PDK_FIX_DISABLE is set")
        return False
    with _lock:
        try:
            import kong_pdk.server as server_module
        except Exception as ex:  # kong_pdk missing or broken: upstream is not ours to fix
            log.warning("kong-pdk-fix: not installed: kong_pdk.server cannot be imported: %s", ex)
            return False
        cls = server_module.PluginServer
        if cls.__dict__.get(SENTINEL):
            log.debug("kong-pdk-fix: already installed")
            return True
        problem = compat.version_problem(compat.installed_version()) or compat.shape_problem(
            server_module
        )
        if problem:
            log.warning("kong-pdk-fix: not installed, kong-pdk left unpatched: %s", problem)
            return False

        applied: Dict[Tuple[type, str], Any] = {}
        try:
            for (owner, name), wrapper in _wrappers(server_module).items():
                original = owner.__dict__[name]
                setattr(owner, name, wrapt.FunctionWrapper(original, wrapper))
                applied[(owner, name)] = original
            setattr(cls, SENTINEL, True)
        except Exception as ex:
            for (owner, name), original in applied.items():
                setattr(owner, name, original)
            log.warning("kong-pdk-fix: not installed, kong-pdk left unpatched: %r", ex)
            return False
        _originals.update(applied)
        logging.getLogger("kong_pdk_fix").setLevel(config.current().log_level.upper())
        log.debug("kong-pdk-fix: installed on kong-pdk %s", compat.installed_version())
        return True


def uninstall() -> bool:
    """Put upstream's methods back. True when something was undone."""
    with _lock:
        server_module = sys.modules.get("kong_pdk.server")
        if server_module is None or not server_module.PluginServer.__dict__.get(SENTINEL):
            return False
        cls = server_module.PluginServer
        for (owner, name), original in _originals.items():
            setattr(owner, name, original)
        _originals.clear()
        delattr(cls, SENTINEL)

        from .engine import stop_all

        for server in stop_all():
            server.__dict__.pop(ENGINE_ATTRIBUTE, None)
        return True


def is_installed() -> bool:
    server_module = sys.modules.get("kong_pdk.server")
    return bool(server_module is not None and server_module.PluginServer.__dict__.get(SENTINEL))
