"""`kong-pdk-fix check`: is the fix active where this runs (a Kong image at build time, say),
and does it hold?

It prints the Python and kong-pdk versions, which activation paths are live, then runs the
scenarios that leak or hang on the installed upstream kong-pdk through the Kong emulator, against
the installed `kong-python-pluginserver` started as Kong starts it, unpatched
(KONG_PDK_FIX_DISABLE=1) and as installed, and against `kong-python-pluginserver-fixed` when it
is there. A table per scenario and server, then a one-line verdict. Exit status 0 only when the
fix is active and holds: every patched server stays flat while upstream leaks or hangs.
"""

from __future__ import annotations

import argparse
import os
import site
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import __version__, compat, config
from .kongsim import Kong, PluginServerProcess, drive, install_probe
from .kongsim.process import DISABLE_VARIABLE
from .report import (
    fix_status,
    install_scenario_plugin,
    noop_leaks_upstream,
    number,
    signed,
    snapshot,
    table,
)

HELP = "is the fix active in this environment, and does it hold?"
PLUGIN = "kong_pdk_fix_scenario"
EVENTS = 500
CONCURRENCY = 4
# Every event here takes milliseconds: no reply within this means the server is frozen.
REPLY_TIMEOUT = 2.0
# deque + Queue + Condition growth at or above this over a scenario is a leak (upstream leaves
# 16 of them per exit-first event).
FLAT_OBJECTS = 100

UPSTREAM = "upstream"
PLAIN = "kong-python-pluginserver"
WRAPPER = "kong-python-pluginserver-fixed"

# Result words.
FLAT = "flat"
LEAKS = "leaks"
HANGS = "hangs"
ANSWERS = "answers"
NOT_RUN = "not run"

# (what the table calls it, the scenario plugin's config["do"]): KONG_PROTOCOL.md's leak table.
EXIT_FIRST = ("exit first", "exit")
AFTER_EXIT = ("PDK call after exit", "after_exit")
NO_PDK_CALL = ("no PDK call", "noop")  # leaks on kong-pdk 0.33 and 0.34 only
HANDLER_RAISES = ("handler raises", "raise")


@dataclass
class Server:
    label: str
    command: List[str]
    env: Dict[str, Optional[str]]  # on top of this process's environment; None removes


@dataclass
class Result:
    scenario: str
    verdict: str
    outcomes: str = ""
    objects: str = "-"  # deque + Queue + Condition growth
    threads: str = "-"
    live_events: str = "-"
    note: str = ""


@dataclass
class ServerRun:
    server: Server
    patched: bool = False  # its GetStatus reply carries the KongPdkFix key
    results: List[Result] = field(default_factory=list)
    error: Optional[str] = None  # "did not start: ..." or "stopped answering: ..."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--events", type=int, default=EVENTS, help="events per leak scenario (default %(default)s)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=CONCURRENCY,
        help="connections sending events at once (default %(default)s)",
    )


def run(options: argparse.Namespace) -> int:
    if options.events < 1 or options.concurrency < 1:
        print("kong-pdk-fix check: --events and --concurrency must be at least 1", file=sys.stderr)
        return 2
    version = compat.installed_version()
    scenarios = leak_scenarios(version)
    runs = []
    with tempfile.TemporaryDirectory(prefix="kong-pdk-fix-check-") as plugins_dir:
        install_scenario_plugin(plugins_dir, PLUGIN)
        install_probe(plugins_dir)
        for server in servers():
            _status("running %s ..." % server.label)
            runs.append(
                run_server(server, plugins_dir, scenarios, options.events, options.concurrency)
            )
    _status("checking import kong_pdk_fix ...")
    imported = import_activates()
    _status("")

    print(environment_text(version))
    print()
    print(activation_text(runs, imported))
    print()
    print(
        "Emulated Kong: %d events per leak scenario, %d connections at once, threading mode "
        "(kong-python-pluginserver's default)." % (options.events, options.concurrency)
    )
    print(results_text(runs))
    print()
    ok, line = verdict(version, runs)
    print(line)
    return 0 if ok else 1


def leak_scenarios(version: Optional[str]) -> List[Tuple[str, str]]:
    if noop_leaks_upstream(version):
        return [NO_PDK_CALL, EXIT_FIRST, AFTER_EXIT]
    return [EXIT_FIRST, AFTER_EXIT]


def servers() -> List[Server]:
    """Upstream, then the installed servers started as Kong starts them: this environment,
    KONG_PDK_FIX_DISABLE included, is theirs."""
    bin_dir = os.path.dirname(sys.executable)
    # PluginServerProcess drops the variable by default; put back what this environment has.
    as_installed = {DISABLE_VARIABLE: os.environ.get(DISABLE_VARIABLE)}
    found = [
        Server(UPSTREAM, [os.path.join(bin_dir, PLAIN)], {DISABLE_VARIABLE: "1"}),
        Server(PLAIN, [os.path.join(bin_dir, PLAIN)], as_installed),
    ]
    wrapper = os.path.join(bin_dir, WRAPPER)
    if os.access(wrapper, os.X_OK):
        found.append(Server(WRAPPER, [wrapper], as_installed))
    return found


def run_server(
    server: Server,
    plugins_dir: str,
    scenarios: Sequence[Tuple[str, str]],
    events: int,
    concurrency: int,
) -> ServerRun:
    result = ServerRun(server)
    process = PluginServerProcess(plugins_dir, command=server.command, env=server.env)
    try:
        process.start()
    except (OSError, RuntimeError) as ex:
        result.error = "did not start: %s" % str(ex).splitlines()[0]
        return result
    try:
        with process.kong(read_timeout=REPLY_TIMEOUT) as kong:
            result.patched = fix_status(kong) is not None
            result.results = run_scenarios(process, kong, scenarios, events, concurrency)
    except Exception as ex:  # noqa: BLE001 - a server that stopped answering is the finding
        result.error = "stopped answering: %s" % ex
    finally:
        process.stop()
    return result


def run_scenarios(
    process: PluginServerProcess,
    kong: Kong,
    scenarios: Sequence[Tuple[str, str]],
    events: int,
    concurrency: int,
) -> List[Result]:
    results = []
    before = snapshot(process, kong)
    for name, do in scenarios:
        driven = drive(
            kong, [(PLUGIN, "access", None, {"do": do})], count=events, concurrency=concurrency
        )
        outcomes = ", ".join("%s %s" % (kind, number(n)) for kind, n in driven.by_kind.items())
        timeouts = driven.by_kind.get("timeout", 0)
        note = "%d events with no reply in %.0f s" % (timeouts, REPLY_TIMEOUT) if timeouts else ""
        try:
            after = snapshot(process, kong)
        except Exception:  # noqa: BLE001 - a server that stopped answering is the finding
            results.append(Result(name, HANGS, outcomes, note=note or "the probe got no reply"))
            break
        objects = after.queue_objects - before.queue_objects
        threads = after.threads - before.threads
        # A worker and a listener thread per connection, plus a few of the server's own.
        leaked = (
            objects >= FLAT_OBJECTS or threads > 2 * concurrency + 10 or bool(after.live_events)
        )
        results.append(
            Result(
                name,
                HANGS if timeouts else LEAKS if leaked else FLAT,
                outcomes,
                signed(objects),
                signed(threads),
                "-" if after.live_events is None else number(after.live_events),
                note,
            )
        )
        before = after
    if len(results) < len(scenarios):
        return results + [Result(name, NOT_RUN) for name, _ in scenarios[len(results) :]]
    return results + [run_raising_handler(kong)]


def run_raising_handler(kong: Kong) -> Result:
    """One event whose handler raises, then one that does nothing: does the second get a
    reply? Upstream holds its server-wide lock for ever after the first (KONG_PROTOCOL.md)."""
    name, do = HANDLER_RAISES
    raised = kong.run_event(PLUGIN, "access", None, {"do": do})
    following = kong.run_event(PLUGIN, "access", None, {"do": "noop"})
    outcomes = "%s, then %s" % (raised.kind, following.kind)
    if following.kind == "ret":
        return Result(name, ANSWERS, outcomes, note="the next event is served")
    return Result(
        name, HANGS, outcomes, note="no reply to the next event in %.0f s" % REPLY_TIMEOUT
    )


def import_activates() -> Tuple[bool, str]:
    """Does `import kong_pdk_fix` alone patch kong_pdk.server? Asked of a fresh interpreter
    started with -S, so that no .pth file runs, in this environment."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([package_parent] + [p for p in sys.path if p])
    )
    code = "import kong_pdk_fix, kong_pdk.server; print(kong_pdk_fix.is_installed())"
    try:
        done = subprocess.run(
            [sys.executable, "-S", "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as ex:
        return False, str(ex)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return False, lines[-1] if lines else "exit status %d" % done.returncode
    if done.stdout.strip() == "True":
        return True, "patches kong_pdk.server when imported first (in a plugin entrypoint)"
    return False, "kong_pdk.server stays unpatched after the import" + _why_unpatched()


def _why_unpatched() -> str:
    """': ' and the reason the shim refuses to patch here, or '' when it should patch."""
    if config.disabled():
        return ": %s is set" % DISABLE_VARIABLE
    problem = compat.version_problem(compat.installed_version())
    return ": " + problem if problem else ""


def pth_files() -> List[str]:
    directories = list(site.getsitepackages()) + [site.getusersitepackages()]
    return [
        os.path.join(d, "kong_pdk_fix.pth")
        for d in directories
        if os.path.isfile(os.path.join(d, "kong_pdk_fix.pth"))
    ]


# -- what is printed ----------------------------------------------------------------------------


def environment_text(version: Optional[str]) -> str:
    problem = compat.version_problem(version)
    disable = os.environ.get(DISABLE_VARIABLE)
    rows = [
        ("Python", "%s (%s)" % (sys.version.split()[0], sys.executable)),
        ("kong-pdk", problem or "%s, supported (%s)" % (version, compat.supported_range_text())),
        ("kong-pdk-fix", "%s (%s)" % (__version__, os.path.dirname(os.path.abspath(__file__)))),
        (
            DISABLE_VARIABLE,
            "not set"
            if disable is None
            else "%s (every activation is %s)" % (disable, "off" if config.disabled() else "on"),
        ),
    ]
    return "kong-pdk-fix check\n" + table(None, rows)


def activation_text(runs: Sequence[ServerRun], imported: Tuple[bool, str]) -> str:
    by_label = {r.server.label: r for r in runs}
    plain = by_label[PLAIN]
    pth = pth_files()
    if plain.error and not plain.patched:
        pth_row = ("not live", "%s %s" % (PLAIN, plain.error))
    elif plain.patched:
        pth_row = ("live", "%s runs patched (%s)" % (PLAIN, ", ".join(pth) or "via site"))
    else:
        pth_row = (
            "not live",
            "%s runs unpatched%s"
            % (
                PLAIN,
                ": no kong_pdk_fix.pth in site-packages"
                if not pth
                else " although %s is there%s" % (", ".join(pth), _why_unpatched()),
            ),
        )
    wrapper = by_label.get(WRAPPER)
    if wrapper is None:
        wrapper_row = ("missing", "%s not found next to %s" % (WRAPPER, sys.executable))
    elif wrapper.error and not wrapper.patched:
        wrapper_row = ("not live", "%s %s" % (WRAPPER, wrapper.error))
    elif not wrapper.patched:
        wrapper_row = ("not live", "%s runs unpatched%s" % (WRAPPER, _why_unpatched()))
    else:
        wrapper_row = ("live", wrapper.server.command[0])
    rows = [
        (".pth",) + pth_row,
        ("import kong_pdk_fix", "live" if imported[0] else "not live", imported[1]),
        ("wrapper script",) + wrapper_row,
    ]
    return "Activation\n" + table(None, rows)


def results_text(runs: Sequence[ServerRun]) -> str:
    rows = []
    scenarios: List[str] = []
    for run_ in runs:
        for result in run_.results:
            if result.scenario not in scenarios:
                scenarios.append(result.scenario)
    for scenario in scenarios:
        first = True
        for run_ in runs:
            label = server_label(run_)
            found = [r for r in run_.results if r.scenario == scenario]
            result = found[0] if found else Result(scenario, NOT_RUN)
            rows.append(
                (
                    scenario if first else "",
                    label,
                    result.outcomes,
                    result.objects,
                    result.threads,
                    result.live_events,
                    result.verdict + (": " + result.note if result.note else ""),
                )
            )
            first = False
    for run_ in runs:
        if run_.error:
            rows.append(("", server_label(run_), "", "", "", "", run_.error))
    header = ("scenario", "server", "outcomes", "queue objects", "threads", "live events", "result")
    legend = [
        "upstream: %s with %s=1; as installed: %s in this environment (the .pth); wrapper: %s"
        % (PLAIN, DISABLE_VARIABLE, PLAIN, WRAPPER),
        "queue objects: growth of the deque, Queue and Condition objects alive in the server "
        "(the original report's heap rows); live events: events left in the fix's table",
    ]
    return table(header, rows, right=(3, 4, 5)) + "\n" + "\n".join("  " + x for x in legend)


def server_label(run_: ServerRun) -> str:
    if run_.server.label == UPSTREAM:
        return UPSTREAM
    name = "as installed" if run_.server.label == PLAIN else "wrapper"
    return "%s (%s)" % (name, "patched" if run_.patched else "unpatched")


def verdict(version: Optional[str], runs: Sequence[ServerRun]) -> Tuple[bool, str]:
    """(the fix is active and holds, the one line that says so or why not)."""
    if config.disabled():
        return False, (
            "FAIL: the fix is off: %s=%s is set here, so kong-pdk runs unpatched"
            % (DISABLE_VARIABLE, os.environ.get(DISABLE_VARIABLE))
        )
    problem = compat.version_problem(version)
    if problem:
        return False, "FAIL: the fix is not active: %s; kong-pdk is left unpatched" % problem
    upstream = runs[0]
    if upstream.error:
        return False, "FAIL: upstream %s %s" % (PLAIN, upstream.error)
    patched = [r for r in runs[1:] if r.patched]
    if not patched:
        return False, (
            "FAIL: the fix is not active: neither %s nor %s runs patched (see "
            "Activation above)" % (PLAIN, WRAPPER)
        )
    for run_ in patched:
        if run_.error:
            return False, "FAIL: the fix is active but does not hold: %s %s" % (
                run_.server.label,
                run_.error,
            )
        for result in run_.results:
            if result.verdict not in (FLAT, ANSWERS):
                return False, (
                    "FAIL: the fix is active but does not hold: %s %s on %s%s"
                    % (
                        result.scenario,
                        result.verdict,
                        run_.server.label,
                        " (%s)" % result.note if result.note else "",
                    )
                )
    shown = [r for r in upstream.results if r.verdict in (LEAKS, HANGS)]
    if len(shown) < len(upstream.results):
        quiet = [r.scenario for r in upstream.results if r.verdict not in (LEAKS, HANGS)]
        return False, (
            "FAIL: inconclusive: upstream kong-pdk %s did not leak or hang in %s here, "
            "so the runs show nothing" % (version, ", ".join(quiet))
        )
    how = "through " + " and ".join(
        "the .pth" if r.server.label == PLAIN else "the wrapper" for r in patched
    )
    if not any(r.server.label == PLAIN for r in patched):
        how += " only: Kong's pluginserver_<name>_start_cmd must be %s" % WRAPPER
    return True, (
        "OK: the fix is active (%s) and holds: upstream leaks or hangs in %d "
        "scenarios, the patched server in none" % (how, len(shown))
    )


def _status(text: str) -> None:
    """A transient status line, on a terminal only."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + text)
        sys.stderr.flush()
