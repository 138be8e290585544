"""How one event of a plugin ended, and the PDK calls it made, as a test reads them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from .. import kongsim


class PdkCall(NamedTuple):
    """One PDK call the plugin made: ``method`` (``"kong.response.set_header"``) and ``args``.

    A tuple, so ``call == ("kong.log.notice", ["hello"])`` works.
    """

    method: str
    args: list[Any]


@dataclass(frozen=True)
class Outcome:
    """How an event ended, seen from Kong, with every PDK call the plugin made in order.

    ``kind`` is ``ret`` (the handler returned), ``exit`` / ``error`` (it called
    ``kong.response.exit`` / ``kong.response.error``; Kong sends nothing more for the event),
    ``lua_error`` (a PDK call raised in Lua, e.g. one not available in the log phase),
    ``rpc_error`` (the plugin server answered an error, e.g. the handler raised: Kong logs it
    and the request goes on), ``abandoned`` (a scripted ``STALL``), ``timeout`` (no reply
    within the read timeout), ``protocol_error`` or ``io_error``.

    ``status``, ``body`` and ``headers`` are the arguments of the terminal call
    (``kong.response.exit(status, body, headers)``, ``kong.response.error(status, message,
    headers)``); ``None`` when the event did not end with one. ``error`` is the error Kong
    would log for ``lua_error``, ``rpc_error`` and the like.
    """

    kind: str
    calls: list[PdkCall]
    status: int | None = None
    body: Any = None
    headers: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ret(self) -> bool:
        """The handler returned normally."""
        return self.kind == "ret"

    @property
    def exit(self) -> bool:
        """The handler ended the request with ``kong.response.exit`` or ``kong.response.error``."""
        return self.kind in ("exit", "error")

    def calls_to(self, method: str) -> list[list[Any]]:
        """The arguments of every call to ``method``, in order."""
        return [call.args for call in self.calls if call.method == method]

    @classmethod
    def from_kongsim(cls, outcome: kongsim.Outcome) -> Outcome:
        """The test's view of the emulator's outcome."""
        calls = [PdkCall(method, list(args)) for method, args in outcome.calls]
        status = body = headers = None
        if outcome.terminal is not None:
            args = list(outcome.terminal.get("Args") or [])
            args += [None] * (3 - len(args))
            status, body, headers = args[:3]
        return cls(
            kind=outcome.kind,
            calls=calls,
            status=status,
            body=body,
            headers=headers,
            error=outcome.error,
        )
