"""Invariant 7 of DESIGN.md: the same event script gives the same replies from patched and
unpatched servers wherever upstream does not hang."""

from __future__ import annotations

import pytest
from servers import MODES, running_server

from kong_pdk_fix.kongsim import LuaError, ScriptedPDK

ANSWERS = {"kong.request.get_header": "abc", "kong.request.get_headers": {"x": ["1", "2"]}}

# (plugin, phase, PDK answers): flows that end in a reply on upstream too.
FLOWS = [
    ("noop", "access", ANSWERS),
    ("pdk_calls", "access", ANSWERS),
    ("pdk_calls", "access", {}),  # nil results: Step without a Data key
    ("exit_first", "access", ANSWERS),
    ("error_later", "access", ANSWERS),
    ("log_phase", "access", ANSWERS),
    ("log_phase", "log", {"kong.response.get_status": 403}),
]


def _replies(tmp_path, patched: bool, mode: str):
    with running_server(tmp_path, patched=patched, read_timeout=5.0, mode=mode) as srv:
        outcomes = []
        for plugin, phase, answers in FLOWS:
            outcome = srv.run(plugin, ScriptedPDK(answers), phase)
            outcomes.append((outcome.kind, outcome.calls, outcome.terminal, outcome.error))
        # errors Kong may see: an unknown instance (Kong restarts it), an unknown event
        for method, arg in [
            ("plugin.HandleEvent", {"InstanceId": 9999, "EventName": "access"}),
            ("plugin.Step", {"EventId": 9999, "Data": "x"}),
        ]:
            outcomes.append(_error_of(srv, method, arg))
    return outcomes


def _error_of(srv, method, arg):
    try:
        return ("reply", srv.kong.call(method, arg))
    except Exception as ex:  # the emulator raises the RPC error
        return ("error", str(ex))


@pytest.mark.upstream
@pytest.mark.parametrize("mode", MODES)
def test_patched_and_upstream_give_the_same_replies(tmp_path, mode):
    assert _replies(tmp_path, True, mode) == _replies(tmp_path, False, mode)


@pytest.mark.upstream
def test_a_request_with_exit_then_log_phase_matches_upstream(tmp_path):
    def run(patched):
        with running_server(tmp_path, patched=patched, plugins=["log_phase", "pdk_calls"]) as srv:
            outcomes = srv.kong.run_request(
                [("log_phase", None), ("pdk_calls", None)],
                ScriptedPDK(ANSWERS),
                phases=("access",),
                log=True,
            )
            return [(o.kind, o.calls, o.terminal) for o in outcomes]

    assert run(True) == run(False)


@pytest.mark.upstream
def test_kong_28_step_error_matches_upstream(tmp_path):
    """Kong 2.8 sends a PDK method's error back with StepError."""

    def run(patched):
        with running_server(tmp_path, patched=patched, plugins=["pdk_calls"]) as srv:
            kong = type(srv.kong)(srv.server.socket_path, kong_version="2.8", read_timeout=5.0)
            try:
                outcome = kong.run_event(
                    "pdk_calls", "access", ScriptedPDK({"kong.request.get_header": LuaError("x")})
                )
            finally:
                kong.close()
            return outcome.kind, outcome.calls

    assert run(True) == run(False)
