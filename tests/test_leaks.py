"""Every leaking row of KONG_PROTOCOL.md's table, in each mode, against a real
kong-python-pluginserver: first shown to leak on upstream (KONG_PDK_FIX_DISABLE=1), then shown
flat with the fix.

Sized to show the growth in a few thousand events; the 20,000-event runs are in
benchmarks/leaks.py.
"""

from __future__ import annotations

from typing import Optional

import pytest
from servers import LEAKS_EVERY_EVENT, MODES, describe, running_server, wait_until

from kong_pdk_fix.kongsim import ScriptedPDK, drive

N = 3000
# Upstream -m leaks an fd per event: stay well under the usual 1024-fd limit.
N_UPSTREAM_PROCESS = 400
WARM_UP = 200
MAX_WORKERS = 16
PATCHED_ENV = {"KONG_PDK_FIX_MAX_WORKERS": str(MAX_WORKERS)}

SCENARIOS = ("noop", "pdk_calls", "exit_first", "error_later", "finally_after_exit")


def upstream_leak(scenario: str, mode: str) -> Optional[str]:
    """What upstream leaks per event (KONG_PROTOCOL.md's table): "objects" (queues,
    channels, greenlets), "threads", "fds", "hang", or None."""
    per_event = "fds" if mode == "process" else "objects"
    if scenario == "pdk_calls":
        return None
    if scenario == "noop":
        return per_event if LEAKS_EVERY_EVENT else None
    if scenario == "exit_first":
        return per_event
    if scenario == "error_later":
        # 0.35+ forget the event when Step's reply is a terminal call, but in gevent mode
        # the handler's final put("ret") on a rendezvous Channel blocks its greenlet for ever.
        return per_event if LEAKS_EVERY_EVENT or mode == "gevent" else None
    # finally_after_exit: the PDK call after exit waits for ever
    return {"thread": "threads", "gevent": "objects", "process": "hang"}[mode]


def _pdk() -> ScriptedPDK:
    return ScriptedPDK({"kong.request.get_header": "value"})


def _run(tmp_path, plugin: str, patched: bool, mode: str, n: int):
    with running_server(
        tmp_path, patched=patched, plugins=[plugin], env=PATCHED_ENV, mode=mode, read_timeout=10.0
    ) as srv:
        srv.repeat(WARM_UP if patched else 10, plugin, _pdk)
        before = srv.sample()
        children = srv.server.children()
        kinds = srv.repeat(n, plugin, _pdk)
        after = srv.sample()
        assert srv.server.children() == children  # no pool process replaced or added
    return before, after, kinds


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_patched_server_stays_flat(tmp_path, scenario, mode):
    before, after, kinds = _run(tmp_path, scenario, True, mode, N)
    why = describe(before, after)
    assert sum(kinds.values()) == N and set(kinds) <= {"ret", "exit", "error"}, kinds
    assert after.objects - before.objects < 100, why
    assert after.threads <= MAX_WORKERS + 10, why
    assert after.fds - before.fds < 10, why
    assert after.rss - before.rss < 5 * 1024 * 1024, why
    assert after.events == 0, why


@pytest.mark.upstream
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_upstream_leaks_where_the_table_says(tmp_path, scenario, mode):
    """The other half of each leak test: the same run on upstream shows the growth the
    patched run must not have (or, where the table says upstream is clean, none)."""
    leak = upstream_leak(scenario, mode)
    if leak == "hang":
        _upstream_hangs(tmp_path, scenario, mode)
        return
    n = N_UPSTREAM_PROCESS if mode == "process" else N
    before, after, kinds = _run(tmp_path, scenario, False, mode, n)
    why = describe(before, after)
    assert after.events is None, "the server should be running unpatched"
    grew = {
        "objects": after.objects - before.objects,
        "threads": after.threads - before.threads,
        "fds": after.fds - before.fds,
    }
    if leak is not None:
        assert grew[leak] >= 0.9 * n, why  # one per event, give or take the probe's own
    else:
        assert after.objects - before.objects < 100 and after.fds - before.fds < 10, why


def _upstream_hangs(tmp_path, scenario, mode):
    """-m: each event whose handler waits for ever pins a pool process; once all are
    pinned, every HandleEvent waits for ever."""
    with running_server(
        tmp_path, patched=False, plugins=[scenario, "noop"], mode=mode, read_timeout=3.0
    ) as srv:
        pool = len(srv.server.children())
        kinds = srv.repeat(pool, scenario, _pdk)
        assert kinds == {"exit": pool}
        assert srv.run("noop").kind == "timeout"


REPORT_PLUGINS = {"noop%d" % i: "noop" for i in range(10)}


def _original_report(tmp_path, patched: bool):
    """The original report: ten plugins whose access does nothing, twenty concurrent clients."""
    scenarios = [(name, "access", None, None) for name in REPORT_PLUGINS]
    with running_server(
        tmp_path, patched=patched, plugins=["noop"], copies=REPORT_PLUGINS, env=PATCHED_ENV
    ) as srv:
        drive(srv.kong, scenarios, count=WARM_UP, concurrency=20)
        before = srv.sample()
        result = drive(srv.kong, scenarios, count=N, concurrency=20)
        after = srv.sample()
    return before, after, result


def test_original_report_set_up_stays_flat(tmp_path):
    before, after, result = _original_report(tmp_path, patched=True)
    why = describe(before, after)
    assert result.by_kind == {"ret": N}, result.errors
    assert after.objects - before.objects < 100, why
    # upstream's listener adds one thread per connection: 20 clients
    assert after.threads <= MAX_WORKERS + 20 + 10, why
    assert after.rss - before.rss < 5 * 1024 * 1024, why
    assert after.events == 0, why


@pytest.mark.upstream
def test_original_report_upstream(tmp_path):
    before, after, result = _original_report(tmp_path, patched=False)
    why = describe(before, after)
    assert result.by_kind == {"ret": N}, result.errors
    if LEAKS_EVERY_EVENT:
        assert after.objects - before.objects >= N, why
    else:
        assert after.objects - before.objects < 100, why


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_exits_never_cross_replies(tmp_path, mode):
    """After kong.response.exit the handler may return before the engine has read the exit
    from the worker's outbox; the worker must not serve another event until it has."""
    n = 1000
    with running_server(
        tmp_path,
        patched=True,
        plugins=["exit_first", "finally_after_exit"],
        env=PATCHED_ENV,
        mode=mode,
        read_timeout=10.0,
    ) as srv:
        scenarios = [
            ("exit_first", "access", None, None),
            ("finally_after_exit", "access", None, None),
        ]
        result = drive(srv.kong, scenarios, count=n, concurrency=8)
        assert result.by_kind == {"exit": n}, result.errors
        assert srv.live_events() == 0
        # A handler goes on after its exit reply (its PDK call in `finally` fails fast), so
        # its worker comes back a moment after the last reply.
        assert wait_until(lambda: srv.shim_stats()["workers"]["busy"] == 0, 5.0)
