"""`kong-pdk-fix soak`: the original bug report's experiment as one command.

Ten plugins behind an emulated Kong, 20 connections sending events for 30 s, against the
installed kong-python-pluginserver unpatched (KONG_PDK_FIX_DISABLE=1), then patched. At the
end: the heap by type before and after each run (guppy3, as the report printed it), RSS,
threads and fds over time, events/s and errors; --json FILE writes it all, --plot FILE draws
memory over time for both runs (.svg needs nothing, .png needs Pillow). Exit status 1 when a
server did not start or stopped answering.

The report's ten plugins do nothing in access, which leaks upstream on kong-pdk 0.33 and 0.34
only; so by default half the events call kong.response.exit first (an auth plugin rejecting
a request), which leaks on every release (--mix).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import __version__, compat, plot
from .kongsim import Kong, PluginServerProcess, drive, install_probe, probe_heap
from .kongsim.load import PROBE_NAME, Scenario
from .kongsim.pdk import ScriptedPDK
from .kongsim.process import DISABLE_VARIABLE
from .report import (
    EXTRA,
    QUEUE_TYPES,
    fix_status,
    install_scenario_plugin,
    live_events,
    mib,
    missing,
    noop_leaks_upstream,
    number,
    signed,
    signed_mib,
    snapshot,
    table,
)

HELP = "the original report's experiment: memory of unpatched and patched servers under load"
REPORT_PLUGINS = 10
PLUGIN_NAME = "report_plugin_%d"
# What the scenario plugin's config["do"] makes a handler do, and what upstream leaks for it.
KINDS = {
    "noop": ("the report's no-op access handler", "leaks upstream on kong-pdk 0.33 and 0.34 only"),
    "exit": ("kong.response.exit as the first PDK call", "leaks upstream on every release"),
    "pdk": ("a header read, then a header write", "does not leak upstream"),
    "after_exit": (
        "a PDK call after kong.response.exit",
        "leaks a thread per event upstream, on every release",
    ),
}
MIX = "noop,exit"
CONCURRENCY = 20
DURATION = 30.0
RUNS = {"both": ("unpatched", "patched"), "unpatched": ("unpatched",), "patched": ("patched",)}
MODES = {"thread": "threading", "gevent": "gevent (-g)", "process": "multiprocessing (-m)"}
# Kong's phases for an HTTP request, in its order; a plugin's other phases are not sent.
HTTP_PHASES = ("rewrite", "access", "response", "log")
READ_TIMEOUT = 5.0  # an event with no reply after this is counted as a timeout error
HEAP_TIMEOUT = 300.0  # guppy walks the whole heap: slow once upstream kept millions of objects
HEAP_ROWS = 10  # guppy's own default
OVER_TIME_ROWS = 7


@dataclass
class Run:
    name: str  # "unpatched" or "patched"
    command: List[str]
    # The server's KongPdkFix stats (GetStatus) before and after the load; None: unpatched.
    fix_before: Optional[Dict[str, Any]] = None
    fix_after: Optional[Dict[str, Any]] = None
    events: int = 0
    events_per_s: float = 0.0
    outcomes: Dict[str, int] = field(default_factory=dict)
    errors: Dict[str, int] = field(default_factory=dict)
    # {"t", "rss", "threads", "fds", "live_events", and the probe's counts} or {"t", "error"}
    samples: List[Dict[str, Any]] = field(default_factory=list)
    heap_before: Optional[List[Dict[str, Any]]] = None
    heap_after: Optional[List[Dict[str, Any]]] = None
    problem: Optional[str] = None  # what went wrong, if something did


DEFAULT_PLOT = "kong-pdk-fix-soak.svg"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugins-directory",
        "-d",
        metavar="DIR",
        help="soak your own plugins (every Kong HTTP phase they have) instead "
        "of the report's ten bundled ones",
    )
    parser.add_argument(
        "--mix",
        help="what the bundled plugins' events do, in turn, from %s "
        "(default %s)" % (", ".join(KINDS), MIX),
    )
    parser.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=CONCURRENCY,
        help="connections sending events at once (default %(default)s)",
    )
    parser.add_argument(
        "--duration",
        "-t",
        type=float,
        default=DURATION,
        help="seconds per run (default %(default)s)",
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "-g",
        "--gevent",
        dest="mode",
        action="store_const",
        const="gevent",
        help="run the plugin server in gevent mode",
    )
    modes.add_argument(
        "-m",
        "--multiprocessing",
        dest="mode",
        action="store_const",
        const="process",
        help="run the plugin server in multiprocessing mode",
    )
    parser.set_defaults(mode="thread")
    parser.add_argument(
        "--run",
        choices=sorted(RUNS),
        default="both",
        help="which servers to soak (default %(default)s)",
    )
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument(
        "--plot",
        metavar="FILE",
        default=DEFAULT_PLOT,
        help="draw memory over time for each run (.svg, or .png with Pillow; default %(default)s)",
    )
    parser.add_argument(
        "--no-plot", dest="plot", action="store_const", const=None, help="draw no chart"
    )


def run(options: argparse.Namespace) -> int:
    problem = usage_problem(options)
    if problem:
        print("kong-pdk-fix soak: " + problem, file=sys.stderr)
        return 2
    heap = not missing("guppy")
    if not heap:
        print(
            "kong-pdk-fix soak: no heap-by-type tables: guppy3 is not installed (%s)" % EXTRA,
            file=sys.stderr,
        )
    mix = (options.mix or MIX).split(",")
    runs = []
    with tempfile.TemporaryDirectory(prefix="kong-pdk-fix-soak-") as work:
        plugins_dir = os.path.join(work, "plugins")
        if options.plugins_directory:
            shutil.copytree(options.plugins_directory, plugins_dir)
        else:
            os.mkdir(plugins_dir)
            for i in range(REPORT_PLUGINS):
                install_scenario_plugin(plugins_dir, PLUGIN_NAME % i)
        install_probe(plugins_dir)
        for name in RUNS[options.run]:
            runs.append(
                soak(name, plugins_dir, None if options.plugins_directory else mix, options, heap)
            )

    print(summary_text(runs, options, mix, heap))
    if options.json:
        with open(options.json, "w", encoding="utf-8") as f:
            json.dump(results(runs, options, mix), f, indent=1)
            f.write("\n")
        print("results written to %s" % options.json)
    if options.plot:
        draw(options.plot, runs, options)
        print("chart written to %s" % options.plot)
    return 1 if any(r.problem for r in runs) else 0


def usage_problem(options: argparse.Namespace) -> Optional[str]:
    if options.concurrency < 1 or options.duration <= 0:
        return "--concurrency must be at least 1 and --duration positive"
    if options.mix and options.plugins_directory:
        return "--mix chooses what the bundled plugins do; it does not apply to your plugins"
    unknown = [kind for kind in (options.mix or MIX).split(",") if kind not in KINDS]
    if unknown:
        return "unknown --mix kind %s (choose from %s)" % (", ".join(unknown), ", ".join(KINDS))
    if options.plugins_directory and not os.path.isdir(options.plugins_directory):
        return "--plugins-directory %s is not a directory" % options.plugins_directory
    if options.plot and not options.plot.lower().endswith(plot.SUFFIXES):
        return "--plot FILE must end in .svg or .png"
    if options.plot and plot.needs_pillow(options.plot) and missing("PIL"):
        return "a PNG chart needs Pillow (%s), or write .svg, which needs nothing" % EXTRA
    return None


def soak(
    name: str,
    plugins_dir: str,
    mix: Optional[Sequence[str]],
    options: argparse.Namespace,
    heap: bool,
) -> Run:
    """One run: start the server, take the heap, drive events for the duration while sampling,
    take the heap again, stop the server."""
    bin_dir = os.path.dirname(sys.executable)
    wrapper = os.path.join(bin_dir, "kong-python-pluginserver-fixed")
    # Patched: the wrapper patches even where the .pth did not land (an editable install);
    # `kong-pdk-fix check` is the command that looks at how the fix is activated.
    command = [
        wrapper
        if name == "patched" and os.access(wrapper, os.X_OK)
        else os.path.join(bin_dir, "kong-python-pluginserver")
    ]
    result = Run(name, command)
    server = PluginServerProcess(
        plugins_dir, mode=options.mode, patched=name == "patched", command=command
    )
    try:
        server.start()
    except (OSError, RuntimeError) as ex:
        result.problem = "the plugin server did not start: %s" % ex
        return result
    try:
        kong = CountingKong(
            server.socket_path, read_timeout=READ_TIMEOUT, plugins_info=server.dump_all_plugins()
        )
        heap_kong = Kong(server.socket_path, read_timeout=HEAP_TIMEOUT)
        with kong, heap_kong:
            result.fix_before = fix_status(kong)
            scenarios = scenarios_for(kong, mix)
            if not scenarios:
                result.problem = "no plugin in the directory has a Kong HTTP phase"
                return result
            warm_up = drive(kong, scenarios, count=len(scenarios))  # starts every instance
            if warm_up.by_kind.get("timeout"):
                # Upstream freezes for good when a handler raises (KONG_PROTOCOL.md).
                result.problem = "the plugin server stopped answering in the first events"
                heap = False
            if heap:
                result.heap_before = probe_heap(heap_kong, heap=True).get("heap")
            progress = Progress(name, options.duration, kong)

            def sample() -> Dict[str, Any]:
                values = sample_of(server, kong)
                progress.show(values)
                return values

            driven = drive(
                kong,
                scenarios,
                duration=options.duration,
                concurrency=options.concurrency,
                sample=(max(0.5, options.duration / 30), sample),
            )
            progress.end()
            result.events, result.events_per_s = driven.events, driven.events_per_s
            result.outcomes, result.errors = dict(driven.by_kind), dict(driven.errors)
            result.samples = [
                dict(value, t=round(t, 2))
                if isinstance(value, dict)
                else {"t": round(t, 2), "error": str(value)}
                for t, value in driven.samples
            ]
            if not result.samples or "error" in result.samples[-1]:
                # No heap walk of a server that stopped answering: it would only time out.
                result.problem = result.problem or "the plugin server stopped answering"
                return result
            try:
                result.fix_after = fix_status(kong)
                if heap:
                    result.heap_after = probe_heap(heap_kong, heap=True).get("heap")
            except Exception as ex:  # noqa: BLE001 - a server that stopped answering is a finding
                result.problem = result.problem or "the plugin server stopped answering: %s" % ex
    finally:
        server.stop()
    return result


class CountingKong(Kong):
    """An emulated Kong worker that counts the events it ran, for the progress line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events = 0
        self._count_lock = threading.Lock()

    def run_event(self, *args: Any, **kwargs: Any) -> Any:
        outcome = super().run_event(*args, **kwargs)
        with self._count_lock:
            self.events += 1
        return outcome


def scenarios_for(kong: Kong, mix: Optional[Sequence[str]]) -> List[Scenario]:
    """The bundled plugins' access events, one per plugin and mix kind, or, for your own
    plugins, one event per plugin and Kong HTTP phase it has."""
    if mix is not None:
        return [
            (PLUGIN_NAME % i, "access", None, {"do": kind})
            for i in range(REPORT_PLUGINS)
            for kind in mix
        ]
    scenarios: List[Scenario] = []
    for name, phases in sorted(kong.phases.items()):
        if name == PROBE_NAME:
            continue
        for phase in HTTP_PHASES:
            if phase in phases:
                # KONG_PROTOCOL.md "The log phase": the timer answers only a few PDK calls.
                pdk = ScriptedPDK.for_log_phase() if phase == "log" else None
                scenarios.append((name, phase, pdk, None))
    return scenarios


def sample_of(server: PluginServerProcess, kong: Kong) -> Dict[str, Any]:
    snap = snapshot(server, kong)
    counts = {k: v for k, v in snap.counts.items() if isinstance(v, int) and k != "pid"}
    return dict(
        counts, rss=snap.rss, threads=snap.threads, fds=snap.fds, live_events=snap.live_events
    )


class Progress:
    """One line on stderr, rewritten at every sample, when stderr is a terminal."""

    WIDTH = 24

    def __init__(self, name: str, duration: float, kong: CountingKong) -> None:
        self.name = name
        self.duration = duration
        self.kong = kong
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        if not self.tty:
            print("soaking %s for %s s ..." % (name, number(duration)), file=sys.stderr)

    def show(self, values: Dict[str, Any]) -> None:
        if not self.tty:
            return
        elapsed = min(time.monotonic() - self.started, self.duration)
        done = int(self.WIDTH * elapsed / self.duration)
        sys.stderr.write(
            "\r\033[K%-9s [%s%s] %3.0f/%.0f s  %s events  RSS %s  deque %s"
            % (
                self.name,
                "#" * done,
                "." * (self.WIDTH - done),
                elapsed,
                self.duration,
                number(self.kong.events),
                mib(values["rss"]),
                number(values.get("deque", 0)),
            )
        )
        sys.stderr.flush()

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


# -- what is printed and written ----------------------------------------------------------------


def summary_text(
    runs: Sequence[Run], options: argparse.Namespace, mix: Sequence[str], heap: bool
) -> str:
    parts = [intro_text(runs, options, mix)]
    for run_ in runs:
        if heap:
            parts.append(heap_text(run_, "before", run_.heap_before))
            parts.append(heap_text(run_, "after", run_.heap_after))
    parts.append(totals_text(runs, options))
    parts.append(over_time_text(runs))
    parts.append(conclusion_text(runs, options))
    return "\n\n".join(parts)


def intro_text(runs: Sequence[Run], options: argparse.Namespace, mix: Sequence[str]) -> str:
    version = compat.installed_version() or "not installed"
    lines = [
        "kong-pdk-fix soak: %s connections, %s s per run, %s mode; kong-pdk %s, "
        "kong-pdk-fix %s, Python %s"
        % (
            options.concurrency,
            number(options.duration),
            MODES[options.mode],
            version,
            __version__,
            platform.python_version(),
        )
    ]
    if options.plugins_directory:
        lines.append(
            "Plugins: yours, from %s (every Kong HTTP phase they have, each PDK call "
            "answered nil)" % options.plugins_directory
        )
    else:
        lines.append(
            "Plugins: the original report's ten, bundled; each event of each plugin "
            "does, in turn (--mix %s):" % ",".join(mix)
        )
        for kind in dict.fromkeys(mix):
            what, leak = KINDS[kind]
            lines.append("  %-10s %s: %s" % (kind, what, leak))
        if "exit" in mix and not noop_leaks_upstream(compat.installed_version()):
            lines.append(
                "  the no-op plugins alone do not leak on kong-pdk %s: the exit-first events "
                "are what make the unpatched run climb here" % version
            )
    if options.mode == "process":
        lines.append(
            "Multiprocessing mode: handlers and the probe run in pool processes, so the object "
            "counts are a pool process's; RSS, threads and fds are the main process's"
        )
    for run_ in runs:
        lines.append(
            "Run %s: %s (%s)" % (run_.name, os.path.basename(run_.command[0]), server_text(run_))
        )
        if run_.problem:
            lines.append("  problem: %s" % run_.problem)
    return "\n".join(lines)


def server_text(run_: Run) -> str:
    if run_.name == "unpatched":
        return "unpatched, %s=1" % DISABLE_VARIABLE
    if run_.fix_before is None:
        return "NOT patched: the fix did not activate"
    if "events" not in run_.fix_before:
        return "patched, but kong-pdk-fix leaves this mode to upstream: %s" % (
            run_.fix_before.get("reason")
        )
    return "kong-pdk-fix active"


def heap_text(run_: Run, when: str, rows: Optional[List[Dict[str, Any]]]) -> str:
    title = "Heap by type, %s run, %s (guppy3: hpy().heap().bytype, top %d)" % (
        run_.name,
        when,
        HEAP_ROWS,
    )
    if not rows:
        return title + "\n  (no table: the server could not take it)"
    body = [
        (str(i), number(row["count"]), number(row["size"]), row["kind"])
        for i, row in enumerate(rows[:HEAP_ROWS])
    ]
    return (
        title + "\n" + table(("Index", "Count", "Size", "Kind"), body, right=(0, 1, 2), indent=" ")
    )


def answered(run_: Run) -> List[Dict[str, Any]]:
    """The samples the server answered."""
    return [s for s in run_.samples if "error" not in s]


def _first_last(run_: Run) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    good = answered(run_)
    return (good[0], good[-1]) if good else (None, None)


def totals_text(runs: Sequence[Run], options: argparse.Namespace) -> str:
    rows = [
        ("events", [number(r.events) for r in runs]),
        ("events/s", [number(r.events_per_s) for r in runs]),
        (
            "outcomes",
            [", ".join("%s %s" % (k, number(n)) for k, n in r.outcomes.items()) for r in runs],
        ),
        ("errors", [number(sum(r.errors.values())) for r in runs]),
        ("probes answered", ["%d of %d" % (len(answered(r)), len(r.samples)) for r in runs]),
    ]
    for key in (*QUEUE_TYPES, "threads", "fds", "rss"):
        cells = []
        for run_ in runs:
            first, last = _first_last(run_)
            if first is None or last is None:
                cells.append("-")
                continue
            value, change = (mib, signed_mib) if key == "rss" else (number, signed)
            growth = last[key] - first[key]
            cells.append("%s -> %s (%s)" % (value(first[key]), value(last[key]), change(growth)))
        rows.append(("RSS" if key == "rss" else key, cells))
    rows.append(("live events", [_live(r) for r in runs]))
    text = table(("", *[r.name for r in runs]), [(label, *cells) for label, cells in rows])
    text += (
        "\n  threads and fds: upstream's listener keeps a thread and a socket per connection "
        "(%d here), the fix adds a worker (a thread and a wake-up pipe) per handler running "
        "at once; both are made in the first second, then kept" % options.concurrency
    )
    for run_ in runs:
        for error, n in sorted(run_.errors.items(), key=lambda item: -item[1])[:3]:
            text += "\n  %s error x%s: %s" % (run_.name, number(n), error)
    return "Totals (first sample -> last sample)\n" + text


def _live(run_: Run) -> str:
    value = live_events(run_.fix_after)
    return "-" if value is None else "%s in the shim's table" % number(value)


def over_time_text(runs: Sequence[Run]) -> str:
    header = ["t (s)"]
    for run_ in runs:
        header += ["%s RSS" % run_.name, "threads", "fds", "deque"]
    end = max((s["t"] for r in runs for s in answered(r)), default=0.0)
    step = end / (OVER_TIME_ROWS - 1)
    rows = []
    for i in range(OVER_TIME_ROWS):
        t = step * i
        row = ["%.1f" % t]
        for run_ in runs:
            # Each run samples on its own clock; none near t: the server did not answer then.
            near = [s for s in answered(run_) if abs(s["t"] - t) <= step / 2]
            if not near:
                row += ["-", "-", "-", "-"]
                continue
            s = min(near, key=lambda sample: abs(sample["t"] - t))
            row += [mib(s["rss"]), number(s["threads"]), number(s["fds"]), number(s["deque"])]
        rows.append(row)
    return "Over time (nearest sample)\n" + table(header, rows, right=range(len(header)))


def conclusion_text(runs: Sequence[Run], options: argparse.Namespace) -> str:
    parts = []
    for run_ in runs:
        first, last = _first_last(run_)
        if first is None or last is None:
            parts.append("%s: no samples" % run_.name)
            continue
        grew = ", ".join(
            "%s %s" % (key, signed(last[key] - first[key])) for key in ("deque", "threads", "fds")
        )
        parts.append(
            "%s: %s, RSS %s in %s s"
            % (run_.name, grew, signed_mib(last["rss"] - first["rss"]), number(options.duration))
        )
    return "; ".join(parts)


def results(runs: Sequence[Run], options: argparse.Namespace, mix: Sequence[str]) -> Dict[str, Any]:
    return {
        "kong_pdk": compat.installed_version(),
        "kong_pdk_fix": __version__,
        "python": platform.python_version(),
        "mode": options.mode,
        "concurrency": options.concurrency,
        "duration": options.duration,
        "plugins_directory": options.plugins_directory,
        "mix": None if options.plugins_directory else list(mix),
        "runs": [asdict(r) for r in runs],
    }


def draw(path: str, runs: Sequence[Run], options: argparse.Namespace) -> None:
    rss: Dict[str, List[Tuple[float, float]]] = {}
    deque: Dict[str, List[Tuple[float, float]]] = {}
    for run_ in runs:
        good = answered(run_)
        rss[run_.name] = [(s["t"], s["rss"] / 1024 / 1024) for s in good]
        deque[run_.name] = [(s["t"], s.get("deque", 0)) for s in good]
    title = "kong-pdk %s, %s connections, %s mode" % (
        compat.installed_version(),
        options.concurrency,
        MODES[options.mode],
    )
    plot.write(
        path,
        title,
        "seconds",
        [("plugin server RSS (MiB)", rss), ("collections.deque objects", deque)],
    )
