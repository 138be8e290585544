"""`kong-pdk-fix soak`, in short runs: the unpatched server's queues climb while the patched
server's stay flat, the JSON and the chart are written, and bad options are refused."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import xml.etree.ElementTree as ElementTree

import pytest
from conftest import explain, run

from kong_pdk_fix import plot
from kong_pdk_fix.cli import main

SOAK = [
    sys.executable,
    "-c",
    "import sys; from kong_pdk_fix.cli import main; sys.exit(main())",
    "soak",
]
PLUGINS = os.path.join(os.path.dirname(__file__), "plugins")


def growth(run_: dict, key: str) -> int:
    samples = [s for s in run_["samples"] if "error" not in s]
    return samples[-1][key] - samples[0][key]


@pytest.mark.slow
@pytest.mark.upstream
def test_soak_shows_the_unpatched_leak_and_the_patched_server_flat(tmp_path) -> None:
    results, chart = tmp_path / "soak.json", tmp_path / "soak.svg"
    args = ["--duration", "2", "--concurrency", "8", "--json", results, "--plot", chart]
    proc = run([*SOAK, *args], timeout=120)
    assert proc.returncode == 0, explain(proc)

    runs = {r["name"]: r for r in json.loads(results.read_text())["runs"]}
    unpatched, patched = runs["unpatched"], runs["patched"]
    assert unpatched["fix_before"] is None
    assert patched["fix_after"]["events"] == {"running": 0, "waiting_kong": 0}
    # Half the events exit first: upstream keeps two Queues, with 4 deques each, per exit.
    assert growth(unpatched, "deque") > 1000, explain(proc)
    assert growth(patched, "deque") < 100, explain(proc)
    for run_ in (unpatched, patched):
        assert run_["errors"] == {} and run_["events"] > 100, run_["outcomes"]
        assert set(run_["outcomes"]) == {"ret", "exit"}

    for part in ("kong.response.exit as the first PDK call", "Totals", "Over time", "events/s"):
        assert part in proc.stdout, explain(proc)
    if importlib.util.find_spec("guppy") is None:
        assert "pip install 'kong-pdk-fix[check]'" in proc.stderr, explain(proc)
    else:
        assert "Heap by type, unpatched run, after" in proc.stdout, explain(proc)
        assert unpatched["heap_after"], "guppy's table is in the JSON"

    svg = ElementTree.parse(str(chart)).getroot()
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "unpatched" in texts and "patched" in texts


@pytest.mark.slow
def test_soak_draws_png_with_pillow_or_says_what_to_install(tmp_path) -> None:
    chart = tmp_path / "soak.png"
    proc = run([*SOAK, "--duration", "1", "--run", "patched", "--plot", chart], timeout=60)
    if importlib.util.find_spec("PIL") is None:
        assert proc.returncode == 2, explain(proc)
        assert "Pillow (pip install 'kong-pdk-fix[check]')" in proc.stderr
        assert not chart.exists()
    else:
        assert proc.returncode == 0, explain(proc)
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.upstream
def test_soak_runs_your_own_plugins(tmp_path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name in ("noop", "exit_first", "log_phase"):
        shutil.copy(os.path.join(PLUGINS, name + ".py"), str(plugins))
    results = tmp_path / "soak.json"
    args = ["--plugins-directory", plugins, "--run", "unpatched", "--duration", "1"]
    proc = run([*SOAK, *args, "--json", results, "--no-plot"], timeout=60)
    assert proc.returncode == 0, explain(proc)
    data = json.loads(results.read_text())
    assert data["mix"] is None
    (unpatched,) = data["runs"]
    # log_phase's log handler reads the status, which Kong's log timer answers.
    assert set(unpatched["outcomes"]) == {"ret", "exit"}, unpatched["errors"]
    assert "Plugins: yours" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "flag, mode, backend", [("-g", "gevent", "gevent"), ("-m", "process", "multiprocessing")]
)
def test_soak_passes_the_mode_on(tmp_path, flag, mode, backend) -> None:
    results = tmp_path / "soak.json"
    proc = run(
        [*SOAK, flag, "--run", "patched", "--duration", "1", "--json", results],
        timeout=60,
        cwd=tmp_path,
    )  # the default chart lands in tmp_path
    assert proc.returncode == 0, explain(proc)
    data = json.loads(results.read_text())
    assert data["mode"] == mode
    assert data["runs"][0]["fix_before"]["mode"] == backend


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mix", "noop,bogus"], "unknown --mix kind bogus"),
        (["--mix", "noop", "--plugins-directory", "."], "--mix chooses what the bundled"),
        (["--plot", "chart.gif"], "--plot FILE must end in .svg or .png"),
        (["--duration", "0"], "--duration positive"),
        (["--plugins-directory", "/nonexistent"], "is not a directory"),
    ],
)
def test_soak_refuses_bad_options_before_starting_anything(capsys, args, message) -> None:
    assert main(["soak", *args]) == 2
    assert message in capsys.readouterr().err


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("kong-pdk-fix 0.")


def test_chart_axes_start_at_zero_on_round_ticks(tmp_path) -> None:
    assert plot.nice_ticks(0, 47) == [0, 10, 20, 30, 40, 50]
    assert plot.nice_ticks(0, 0.9)[-1] >= 0.9
    chart = tmp_path / "empty.svg"
    plot.write(str(chart), "t", "seconds", [("RSS", {"a": [(0.0, 30.0), (1.0, 31.0)], "b": []})])
    svg = ElementTree.parse(str(chart)).getroot()
    labels = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "0" in labels and "a" in labels and "b" in labels
