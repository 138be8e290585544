"""The PDK handle given to plugin code.

Plugin code gets kong-pdk's own `Kong(ch, lua_style).kong`, so the PDK stubs, the log-argument
sanitising and the Lua-style `(data, err)` returns stay exactly upstream's. We only replace
`ch`: upstream's `rpc_of` does `ch.put(call)` and then, unless the call is terminal,
`data, err = ch.get()`. Our `ch` knows which event it serves, so a call on an ended event
never blocks: its `get()` answers `(None, why)` at once, which upstream's `rpc_of` turns into
the Lua-style error or a PDKException.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Tuple

if TYPE_CHECKING:
    from .backends import Worker
    from .engine import Engine, Event

# Kong runs these and never sends another Step for the event (KONG_PROTOCOL.md).
TERMINAL_METHODS = frozenset(("kong.response.exit", "kong.response.error"))

# Put into a waiting worker's inbox when the reaper ends its event (see engine.Reaper).
ABANDONED = object()


class PDKChannel:
    """One per event: a thread the handler left running cannot reach the next event."""

    def __init__(
        self, engine: "Engine", worker: "Worker", event: "Event", lua_style: bool, call_lock: Any
    ) -> None:
        from kong_pdk.pdk import Kong  # imported late: kong_pdk is what we patch

        self._engine = engine
        self._worker = worker
        self.event = event
        self._refusal: Optional[str] = None
        # Held from put() to get(): threads (greenlets) of one handler take turns, so no two
        # replies are ever written for one request and each caller gets its own answer.
        self._call_lock = call_lock
        self.kong = Kong(self, lua_style).kong

    def put(self, call: Any) -> None:
        event = self.event
        method = call.get("Method") if isinstance(call, dict) else None
        terminal = method in TERMINAL_METHODS
        self._call_lock.acquire()
        try:
            sent = self._engine.post_call(event, call, method if terminal else None)
        except BaseException:
            self._call_lock.release()
            raise
        if terminal:
            self._call_lock.release()  # rpc_of calls no get() after exit/error
        elif not sent:
            # The event ended; upstream's rpc_of calls get() next and returns our answer.
            self._refusal = "%s not sent to Kong: %s" % (method, event.why_ended())
        else:
            self._refusal = None

    def get(self) -> Tuple[Any, Optional[str]]:
        try:
            if self._refusal is not None:
                why, self._refusal = self._refusal, None
                return None, why
            event = self.event
            answer = self._engine.wait_answer(event, self._worker)
            if answer is ABANDONED:
                return None, "no answer from Kong: %s" % event.why_ended()
            return answer  # (data, err) from Step or StepError
        finally:
            self._call_lock.release()
