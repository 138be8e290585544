"""Every leaking row of KONG_PROTOCOL.md's table, against a real kong-python-pluginserver:
first shown to leak on upstream (KONG_PDK_FIX_DISABLE=1), then shown flat with the fix.

Sized to show the growth in a few thousand events; the 20,000-event runs are in
benchmarks/leaks.py.
"""

from __future__ import annotations

import pytest
from servers import LEAKS_EVERY_EVENT, describe, running_server

from kong_pdk_fix.kongsim import ScriptedPDK, drive

N = 3000
WARM_UP = 200
MAX_WORKERS = 16

# scenario -> (plugin, what upstream leaks per event on this kong-pdk, or None when nothing)
SCENARIOS = {
    "noop": ("noop", "queues" if LEAKS_EVERY_EVENT else None),
    "pdk_calls": ("pdk_calls", None),
    "exit_first": ("exit_first", "queues"),
    # 0.35+ forget the event when Step's reply is a terminal call; 0.33/0.34 only on "ret".
    "error_later": ("error_later", "queues" if LEAKS_EVERY_EVENT else None),
    "finally_after_exit": ("finally_after_exit", "threads"),
}
PATCHED_ENV = {"KONG_PDK_FIX_MAX_WORKERS": str(MAX_WORKERS)}


def _pdk() -> ScriptedPDK:
    return ScriptedPDK({"kong.request.get_header": "value"})


def _run(tmp_path, plugin: str, patched: bool):
    with running_server(tmp_path, patched=patched, plugins=[plugin], env=PATCHED_ENV) as srv:
        srv.repeat(WARM_UP, plugin, _pdk)
        before = srv.sample()
        kinds = srv.repeat(N, plugin, _pdk)
        after = srv.sample()
    return before, after, kinds


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_patched_server_stays_flat(tmp_path, scenario):
    plugin, _ = SCENARIOS[scenario]
    before, after, kinds = _run(tmp_path, plugin, patched=True)
    why = describe(before, after)
    assert sum(kinds.values()) == N and "timeout" not in kinds, kinds
    assert after.objects - before.objects < 100, why
    assert after.threads <= MAX_WORKERS + 10, why
    assert after.rss - before.rss < 5 * 1024 * 1024, why
    assert after.fds - before.fds < 10, why
    assert after.events == 0, why


@pytest.mark.upstream
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_upstream_leaks_where_the_table_says(tmp_path, scenario):
    """The other half of each leak test: the same run on upstream shows the growth the
    patched run must not have (or, where the table says upstream is clean, none)."""
    plugin, leak = SCENARIOS[scenario]
    before, after, kinds = _run(tmp_path, plugin, patched=False)
    why = describe(before, after)
    assert after.events is None, "the server should be running unpatched"
    if leak is None:
        assert after.objects - before.objects < 100, why
    else:
        # Two Queues per event: each holds 3 Conditions and 4 deques.
        assert after.objects - before.objects >= N, why
    if leak == "threads":
        assert after.threads - before.threads >= N, why


REPORT_PLUGINS = {"noop%d" % i: "noop" for i in range(10)}


def _original_report(tmp_path, patched: bool):
    """The original report: ten plugins whose access does nothing, twenty concurrent clients."""
    scenarios = [(name, "access", None, None) for name in REPORT_PLUGINS]
    with running_server(tmp_path, patched=patched, plugins=["noop"], copies=REPORT_PLUGINS,
                        env=PATCHED_ENV) as srv:
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
