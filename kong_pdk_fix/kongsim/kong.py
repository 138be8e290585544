"""One emulated Kong worker: instance ids, Kong's loop for one event, and a request's phases.

Written from KONG_PROTOCOL.md ("Methods Kong calls", "Kong's loop for one event", "The log
phase") and Kong's ``mp_rpc.lua`` (``bridge_loop``, ``handle_event``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .pdk import STALL, TERMINAL_METHODS, LuaError, ScriptedPDK, step_for
from .rpc import Connection, ConnectionClosed, ProtocolError, ReadTimeout, Rpc, RPCError

EVENT_CONNECTION_POLICIES = ("pool", "fresh")


@dataclass
class Outcome:
    """How one event ended, seen from Kong.

    ``kind`` is one of: ``ret`` (the handler finished), ``exit`` / ``error`` (a terminal call,
    no Step sent after it), ``lua_error`` (a PDK call raised in Lua, nothing more sent),
    ``abandoned`` (Kong went silent), ``rpc_error`` (an error reply; Kong logs it and goes on),
    ``timeout`` (no reply within the read timeout), ``protocol_error`` (a reply failed Kong's
    asserts: a 500), ``io_error`` (connect, send or the connection closed).
    """

    kind: str
    plugin: str = ""
    phase: str = ""
    event_id: int | None = None
    calls: list[tuple[str, list]] = field(default_factory=list)
    terminal: dict | None = None
    error: str | None = None
    restarts: int = 0
    latency: float = 0.0
    sent: list[str] = field(default_factory=list)  # the RPC methods Kong sent, in order


class _Ended(Exception):
    """Kong's loop for an event stopped early (terminal call, Lua error, silence)."""

    def __init__(self, kind: str, error: str | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.error = error


class Kong:
    """One emulated Kong worker talking to a plugin server over its unix socket. Thread-safe.

    ``kong_version`` is ``"3.x"`` or ``"2.8"`` (2.8 sends ``StepError``). With
    ``event_connection_policy="fresh"`` every call of an event uses a new connection, closed
    after its reply, so consecutive calls of one event always arrive on different connections.
    ``plugins_info`` is the plugin server's ``--dump-all-plugins`` output, from which Kong
    learns each plugin's phases (its ``query_cmd``). Without it, ``run_request`` asks the
    server once per plugin with ``plugin.GetPluginInfo`` as a stand-in (Kong itself never
    calls it); a plugin it cannot learn about is taken to have every phase.
    """

    def __init__(
        self,
        socket_path: str,
        *,
        read_timeout: float = 60.0,
        idle_pool_size: int = 256,
        kong_version: str = "3.x",
        reuse_on_timeout: bool = False,
        event_connection_policy: str = "pool",
        idle_timeout: float = 60.0,
        plugins_info: Iterable[dict[str, Any]] | None = None,
    ) -> None:
        if event_connection_policy not in EVENT_CONNECTION_POLICIES:
            raise ValueError(f"event_connection_policy must be one of {EVENT_CONNECTION_POLICIES}")
        self.kong_version = kong_version
        self.event_connection_policy = event_connection_policy
        self.rpc = Rpc(
            socket_path,
            read_timeout=read_timeout,
            idle_pool_size=idle_pool_size,
            idle_timeout=idle_timeout,
            reuse_on_timeout=reuse_on_timeout,
            on_notification=self._notification,
        )
        self.phases: dict[str, list[str]] = {
            p["Name"]: list(p["Phases"]) for p in plugins_info or ()
        }
        self.server_pid: int | None = None
        self._instances: dict[tuple[str, str], int] = {}
        # Reentrant: a serverPid notification may arrive during StartInstance.
        self._instances_lock = threading.RLock()

    def __enter__(self) -> Kong:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close all pooled connections."""
        self.rpc.close()

    def call(
        self,
        method: str,
        arg: Any,
        conn: Connection | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One raw RPC (``plugin.<Method>``); raises as ``Rpc.call`` does."""
        return self.rpc.call(method, arg, conn=conn, timeout=timeout)

    def _notification(self, label: Any, args: Any) -> None:
        # KONG_PROTOCOL.md "Framing": a changed serverPid makes the worker forget instance ids.
        if label != "serverPid":
            return
        with self._instances_lock:
            if self.server_pid is not None and args != self.server_pid:
                self._instances.clear()
            self.server_pid = args

    # Instances

    def start_instance(self, name: str, config: dict[str, Any] | None = None) -> int:
        """StartInstance and cache its id for (name, config); returns the id."""
        with self._instances_lock:
            return self._start_instance(name, config)

    def _start_instance(self, name: str, config: dict[str, Any] | None) -> int:
        reply = self.rpc.call(
            "plugin.StartInstance", {"Name": name, "Config": json.dumps(config or {})}
        )
        if not (isinstance(reply, dict) and isinstance(reply.get("Id"), int)):
            raise ProtocolError(f"StartInstance reply has no Id: {reply!r}")
        iid = reply["Id"]
        self._instances[(name, _config_key(config))] = iid
        return iid

    def instance_id(self, name: str, config: dict[str, Any] | None = None) -> int:
        """The cached instance id for (name, config), started on first use."""
        with self._instances_lock:
            iid = self._instances.get((name, _config_key(config)))
            if iid is None:
                iid = self._start_instance(name, config)
            return iid

    def close_instance(self, iid: int) -> None:
        """CloseInstance; the reply is ignored and the cached id kept, as in Kong."""
        try:
            self.rpc.call("plugin.CloseInstance", iid)
        except RPCError:
            pass

    def _forget_instance(self, name: str, config: dict[str, Any] | None, iid: int) -> None:
        key = (name, _config_key(config))
        with self._instances_lock:
            if self._instances.get(key) == iid:
                del self._instances[key]

    def has_phase(self, name: str, phase: str) -> bool:
        """Whether plugin ``name`` handles ``phase`` (learnt as the class docstring says)."""
        if name not in self.phases:
            try:
                info = self.rpc.call("plugin.GetPluginInfo", name)
                self.phases[name] = list(info["Phases"])
            except (RPCError, TypeError, KeyError):
                return True
        return phase in self.phases[name]

    # Events

    def run_event(
        self,
        name: str,
        phase: str,
        pdk: ScriptedPDK | None = None,
        config: dict[str, Any] | None = None,
        *,
        step_timeout: float | None = None,
    ) -> Outcome:
        """Kong's loop for one event of plugin ``name`` (KONG_PROTOCOL.md "Kong's loop").

        ``pdk`` answers the plugin's PDK calls (default: every call answers nil).
        ``step_timeout`` overrides the read timeout for this event's calls.
        """
        pdk = pdk if pdk is not None else ScriptedPDK(record=False)
        outcome = Outcome(kind="ret", plugin=name, phase=phase)
        started = time.monotonic()
        try:
            while True:
                try:
                    self._bridge_loop(outcome, pdk, config, step_timeout)
                    break
                except _RestartInstance as ex:
                    # mp_rpc.lua handle_event: forget the instance, start it again, rerun.
                    if outcome.restarts:
                        raise ex.error from None
                    self._forget_instance(name, config, ex.iid)
                    outcome.restarts += 1
        except _Ended as ex:
            outcome.kind, outcome.error = ex.kind, ex.error
        except RPCError as ex:
            outcome.kind, outcome.error = "rpc_error", str(ex)
        except ReadTimeout as ex:
            outcome.kind, outcome.error = "timeout", f"no data: {ex}"
        except ProtocolError as ex:
            outcome.kind, outcome.error = "protocol_error", str(ex)
        except (ConnectionClosed, OSError) as ex:
            outcome.kind, outcome.error = "io_error", str(ex) or type(ex).__name__
        outcome.latency = time.monotonic() - started
        return outcome

    def _bridge_loop(
        self,
        outcome: Outcome,
        pdk: ScriptedPDK,
        config: dict[str, Any] | None,
        timeout: float | None,
    ) -> None:
        iid = self.instance_id(outcome.plugin, config)
        try:
            reply = self._event_call(
                outcome,
                "plugin.HandleEvent",
                {"InstanceId": iid, "EventName": outcome.phase},
                timeout,
            )
        except RPCError as ex:
            if "no plugin instance" in str(ex).lower():
                raise _RestartInstance(iid, ex) from None
            raise
        outcome.event_id = reply["EventId"]
        while reply["Data"] != "ret":
            method, args = _pdk_call(reply["Data"])
            outcome.calls.append((method, args))
            if method in TERMINAL_METHODS:
                # KONG_PROTOCOL.md: Kong never sends another Step after exit/error.
                outcome.terminal = reply["Data"]
                raise _Ended(method.rpartition(".")[2])
            try:
                result = pdk.call(method, args)
            except LuaError as ex:
                raise _Ended("lua_error", str(ex)) from None
            if result is STALL:
                raise _Ended("abandoned")
            step, data = step_for(method, result, self.kong_version)
            arg: dict[str, Any] = {"EventId": outcome.event_id}
            if data is not None:
                arg["Data"] = data
            try:
                reply = self._event_call(outcome, step, arg, timeout)
            except RPCError as ex:
                if "no plugin instance" in str(ex).lower():
                    raise _RestartInstance(iid, ex) from None
                raise

    def _event_call(
        self, outcome: Outcome, method: str, arg: dict[str, Any], timeout: float | None
    ) -> dict[str, Any]:
        outcome.sent.append(method)
        reply = self.rpc.call(
            method, arg, fresh=self.event_connection_policy == "fresh", timeout=timeout
        )
        if not (isinstance(reply, dict) and "Data" in reply and "EventId" in reply):
            raise ProtocolError(f"{method} reply is not {{Data, EventId}}: {reply!r}")
        return reply

    # Requests

    def run_request(
        self,
        plugins: Sequence[tuple[str, dict[str, Any] | None]],
        pdk: ScriptedPDK | None = None,
        phases: Sequence[str] = ("access",),
        log: bool = True,
    ) -> list[Outcome]:
        """One request through ``plugins`` (in the given order) for each of ``phases``.

        An exit or error ends the request's remaining phases. Then, with ``log``, the log
        phase of every plugin that has one runs in its own thread, as Kong's log timer does,
        with ``ScriptedPDK.for_log_phase(pdk)``; those outcomes come last.
        """
        outcomes: list[Outcome] = []
        for phase in phases:
            ended = False
            for name, config in plugins:
                if not self.has_phase(name, phase):
                    continue
                outcome = self.run_event(name, phase, pdk, config)
                outcomes.append(outcome)
                if outcome.kind in ("exit", "error"):
                    ended = True
                    break
            if ended:
                break
        if log:
            outcomes.extend(self._run_log_phase(plugins, pdk))
        return outcomes

    def _run_log_phase(
        self, plugins: Sequence[tuple[str, dict[str, Any] | None]], pdk: ScriptedPDK | None
    ) -> list[Outcome]:
        log_pdk = ScriptedPDK.for_log_phase(pdk)
        logged = [(name, config) for name, config in plugins if self.has_phase(name, "log")]
        results: list[Outcome | None] = [None] * len(logged)

        def run(i: int, name: str, config: dict[str, Any] | None) -> None:
            results[i] = self.run_event(name, "log", log_pdk, config)

        # KONG_PROTOCOL.md "The log phase": a timer per plugin, after the response was sent.
        threads = [
            threading.Thread(target=run, args=(i, name, config), daemon=True)
            for i, (name, config) in enumerate(logged)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [r for r in results if r is not None]


class _RestartInstance(Exception):
    def __init__(self, iid: int, error: RPCError) -> None:
        super().__init__(str(error))
        self.iid = iid
        self.error = error


def _config_key(config: dict[str, Any] | None) -> str:
    return json.dumps(config or {}, sort_keys=True)


def _pdk_call(data: Any) -> tuple[str, list]:
    if not (isinstance(data, dict) and isinstance(data.get("Method"), str)):
        raise ProtocolError(f'Data is neither "ret" nor {{Method, Args}}: {data!r}')
    args = data.get("Args")
    return data["Method"], list(args) if isinstance(args, (list, tuple)) else []
