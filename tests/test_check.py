"""`kong-pdk-fix check`: exit status 0 with the fix active, non-zero with one line saying why
when it is off; and its verdict on made-up runs, where each way of failing is cheap to show."""

from __future__ import annotations

import re
import sys

import pytest
from conftest import Venv, explain, run

from kong_pdk_fix import check
from kong_pdk_fix.check import ANSWERS, FLAT, HANGS, LEAKS, PLAIN, UPSTREAM, WRAPPER

CHECK = [sys.executable, "-c", "import sys; from kong_pdk_fix.cli import main; sys.exit(main())"]
# Enough events to show upstream's growth (16 queue objects and, after exit, a thread each).
FAST = ["check", "--events", "200", "--concurrency", "4"]


def last_line(proc) -> str:
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_check_passes_with_the_fix_active() -> None:
    proc = run([*CHECK, *FAST], timeout=90)
    assert proc.returncode == 0, explain(proc)
    assert last_line(proc).startswith("OK: the fix is active"), explain(proc)
    assert re.search(r"\.pth\s+live", proc.stdout), explain(proc)
    for scenario in ("exit first", "PDK call after exit", "handler raises"):
        assert scenario in proc.stdout
    assert re.search(r"as installed \(patched\).*\bflat$", proc.stdout, re.M), explain(proc)
    assert re.search(r"^\s+exit first\s+upstream .*\bleaks$", proc.stdout, re.M), explain(proc)


@pytest.mark.slow
@pytest.mark.upstream
def test_check_fails_in_one_line_when_the_fix_is_disabled() -> None:
    proc = run([*CHECK, *FAST], env={"KONG_PDK_FIX_DISABLE": "1"}, timeout=90)
    assert proc.returncode == 1, explain(proc)
    assert last_line(proc) == (
        "FAIL: the fix is off: KONG_PDK_FIX_DISABLE=1 is set here, so kong-pdk runs unpatched"
    )
    # The table is still there, showing what that means.
    assert re.search(r"as installed \(unpatched\).*\bleaks$", proc.stdout, re.M), explain(proc)
    assert re.search(r"as installed \(unpatched\).*\bhangs: ", proc.stdout, re.M), explain(proc)


@pytest.mark.slow
def test_check_passes_after_a_plain_install_of_the_wheel(wheel_venv: Venv) -> None:
    """The console script, on a fresh install: the .pth is what patches the plain server."""
    proc = run([wheel_venv.script("kong-pdk-fix"), *FAST], timeout=90)
    assert proc.returncode == 0, explain(proc)
    assert re.search(r"\.pth\s+live", proc.stdout), explain(proc)


# -- the verdict, on made-up runs -------------------------------------------------------------


def server_run(label: str, patched: bool, *verdicts: str) -> check.ServerRun:
    names = ["exit first", "PDK call after exit", "handler raises"]
    results = [check.Result(name, verdict) for name, verdict in zip(names, verdicts)]
    return check.ServerRun(check.Server(label, [label], {}), patched, results)


UPSTREAM_RUN = server_run(UPSTREAM, False, LEAKS, LEAKS, HANGS)
HOLDS = (FLAT, FLAT, ANSWERS)


@pytest.fixture(autouse=True)
def enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KONG_PDK_FIX_DISABLE", raising=False)


def test_verdict_ok_names_the_live_paths() -> None:
    ok, line = check.verdict(
        "0.36", [UPSTREAM_RUN, server_run(PLAIN, True, *HOLDS), server_run(WRAPPER, True, *HOLDS)]
    )
    assert ok, line
    assert line.startswith("OK: the fix is active (through the .pth and the wrapper) and holds")


def test_verdict_ok_through_the_wrapper_only_says_what_kong_must_start() -> None:
    ok, line = check.verdict(
        "0.36", [UPSTREAM_RUN, server_run(PLAIN, False), server_run(WRAPPER, True, *HOLDS)]
    )
    assert ok, line
    assert "start_cmd must be kong-python-pluginserver-fixed" in line


def test_verdict_fails_when_no_server_runs_patched() -> None:
    ok, line = check.verdict("0.36", [UPSTREAM_RUN, server_run(PLAIN, False)])
    assert not ok
    assert line.startswith("FAIL: the fix is not active")


def test_verdict_fails_when_a_patched_server_leaks() -> None:
    ok, line = check.verdict("0.36", [UPSTREAM_RUN, server_run(PLAIN, True, FLAT, LEAKS, ANSWERS)])
    assert not ok
    assert line.startswith("FAIL: the fix is active but does not hold: PDK call after exit leaks")


def test_verdict_is_inconclusive_when_upstream_does_not_leak() -> None:
    quiet = server_run(UPSTREAM, False, FLAT, LEAKS, HANGS)
    ok, line = check.verdict("0.36", [quiet, server_run(PLAIN, True, *HOLDS)])
    assert not ok
    assert line.startswith("FAIL: inconclusive") and "exit first" in line


def test_verdict_fails_for_an_unsupported_kong_pdk() -> None:
    ok, line = check.verdict("0.37", [UPSTREAM_RUN, server_run(PLAIN, True, *HOLDS)])
    assert not ok
    assert line.startswith("FAIL: the fix is not active: kong-pdk 0.37 is outside")


def test_verdict_says_disabled_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KONG_PDK_FIX_DISABLE", "1")
    ok, line = check.verdict("0.36", [UPSTREAM_RUN, server_run(PLAIN, True, *HOLDS)])
    assert not ok
    assert line.startswith("FAIL: the fix is off: KONG_PDK_FIX_DISABLE=1")


def test_no_pdk_call_is_checked_where_it_leaks() -> None:
    assert check.NO_PDK_CALL in check.leak_scenarios("0.33")
    assert check.NO_PDK_CALL not in check.leak_scenarios("0.36")
