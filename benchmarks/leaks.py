"""What an upstream and a patched kong-python-pluginserver leave behind, side by side.

    python benchmarks/leaks.py [--events 20000] [--mode thread|gevent|process]
    python benchmarks/leaks.py --all-versions [--mode ...]   # kong-pdk 0.33 to 0.36, writes docs/

For each event ending of KONG_PROTOCOL.md's leak table it starts a real plugin server twice,
upstream (KONG_PDK_FIX_DISABLE=1) and patched, drives it through the Kong emulator
(kong_pdk_fix.kongsim) with warm-up events and then `--events` sequential events, and prints
what grew: live deque + Queue + Condition objects, threads, fds, RSS, greenlets (-g), pool
processes (-m), and the events still in the server's table, with PASS/FAIL against the
acceptance criterion (both rows are judged by the same numbers). Then two more: a handler
that raises, and Kong going silent mid-event.

It measures the kong-pdk installed in the python that runs it. --all-versions makes one venv
per kong-pdk version under .bench-venvs/ (kept, ignored by git), installs this checkout into
it as a wheel (so its kong_pdk_fix.pth is installed, as users get it), runs itself there and
writes docs/leaks.md (thread mode), docs/leaks-gevent.md or docs/leaks-process.md.
Every server is stopped on the way out, on errors and on SIGTERM too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import Any, Dict, List, Optional, Sequence

from common import MIB, ROOT, ServerUnderTest, add_mode_option, checkout, git, machine, table

from kong_pdk_fix.kongsim import STALL, Kong, LuaError, ScriptedPDK, install_probe, probe_heap

VENVS = os.path.join(ROOT, ".bench-venvs")
DOCS = {
    mode: os.path.join(ROOT, "docs", name)
    for mode, name in (
        ("thread", "leaks.md"),
        ("gevent", "leaks-gevent.md"),
        ("process", "leaks-process.md"),
    )
}
VERSIONS = ("0.33", "0.34", "0.35", "0.36")

# The acceptance criterion's numbers.
MAX_OBJECTS_GROWTH = 100  # deque + Queue + Condition; in -g greenlets too
MAX_RSS_GROWTH_MIB = 5.0
THREADS_OVER_MAX_WORKERS = 10
# Not in the criterion's text but in the leak tests': -m upstream leaks pipes, not objects.
MAX_FDS_GROWTH = 10
MAX_RAISE_REPLY_S = 0.1  # median
REAPED_WITHIN_S = 3.0  # with KONG_PDK_FIX_EVENT_TTL=1
QUEUE_KINDS = ("deque", "Queue", "Condition")  # keys of the probe's report

# (key, plugin in tests/plugins, how Kong sees each event end, what the criterion calls it)
SCENARIOS = [
    ("noop", "noop", "ret", "no-op handler"),
    ("pdk_calls", "pdk_calls", "ret", "handler with PDK calls"),
    ("exit_first", "exit_first", "exit", "exit as first call"),
    ("error_later", "error_later", "error", "error after a PDK call"),
    ("finally_after_exit", "finally_after_exit", "exit", "a PDK call in `finally` after exit"),
]
# A server that timed out this many events in a row hangs (upstream after a raise, or -m
# with every pool process pinned): it is sent nothing more, so every run is bounded.
FROZEN_AFTER = 2
# -m upstream leaks a pipe (an fd) per event that never ends: 20,000 of them would run into
# the fd limit (ulimit -n, often 1024), so its runs are this short.
UPSTREAM_PROCESS_WARM_UP = 100
UPSTREAM_PROCESS_EVENTS = 500
# In -m any free pool process takes the probe: it is run again (up to this many times) until
# the one of the first sample answers, so that objects Δ compares one process with itself.
PROBE_TRIES = 8


# -- a server under test --------------------------------------------------------------------


class Server(ServerUnderTest):
    """A real kong-python-pluginserver serving `plugins` (stems in tests/plugins) and kongsim's
    probe plugin, with an emulated Kong worker. It counts the events sent and notices when it
    hangs (FROZEN_AFTER timeouts in a row); from then on it is sent no more events."""

    def __init__(
        self,
        plugins: List[str],
        patched: bool,
        args: argparse.Namespace,
        env: Optional[Dict[str, Optional[str]]] = None,
        read_timeout: float = 10.0,
    ) -> None:
        # Upstream ignores it; for the patched server it makes "threads < max_workers + 10"
        # a real bound rather than the default 128's.
        server_env: Dict[str, Optional[str]] = {"KONG_PDK_FIX_MAX_WORKERS": str(args.max_workers)}
        server_env.update(env or {})
        super().__init__(
            plugins, mode=args.mode, patched=patched, read_timeout=read_timeout, env=server_env
        )
        install_probe(self.dir)
        self.sent = 0
        self.timeouts_in_a_row = 0
        self.hung_after: Optional[int] = None  # events sent before the timeouts that showed it

    def run_events(self, plugin: str, n: int, pdks: Sequence[ScriptedPDK]) -> Counter:
        """n sequential events of `plugin`, the i-th answered by pdks[i % len(pdks)]."""
        assert self.kong is not None
        kinds: Counter = Counter()
        for i in range(n):
            if self.hung_after is not None:
                kinds["not sent (server hangs)"] += n - i
                break
            kind = self.kong.run_event(plugin, "access", pdks[i % len(pdks)]).kind
            kinds[kind] += 1
            self.sent += 1
            self.timeouts_in_a_row = self.timeouts_in_a_row + 1 if kind == "timeout" else 0
            if self.timeouts_in_a_row >= FROZEN_AFTER:
                self.hung_after = self.sent - self.timeouts_in_a_row
        return kinds

    def sample(self, like: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """What the server holds now; None for what a hung server cannot tell. `like`, an
        earlier sample: count the objects of the process that probe ran in (-m)."""
        # The probe first: in -m its first run may bring a second pool process into use.
        probe = self.probe(None if like is None else like["probe_pid"])
        out: Dict[str, Any] = {
            "rss": self.total(self.process.rss),
            "threads": self.total(self.process.threads),
            "fds": self.total(self.process.fds),
            "pool": len(self.process.children()),
        }
        out["probe_pid"] = None if probe is None else probe["pid"]
        out["objects"] = None if probe is None else sum(probe.get(k, 0) for k in QUEUE_KINDS)
        out["greenlets"] = None if probe is None else probe.get("greenlet", 0)
        stats = self.shim_stats()
        out["shim"] = stats
        if stats is not None and "events" in stats:
            out["events"] = sum(stats["events"].values())
            out["busy"] = stats["workers"]["busy"]
        elif probe is not None and probe["pid"] == self.process.pid:
            out["events"] = probe["upstream_events"]  # kong-pdk's PluginServer.events
            out["busy"] = None
        else:
            out["events"] = out["busy"] = None  # -m: the probe ran in a pool process
        return out

    def probe(self, pid: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """The probe's report; with `pid`, only that process's (see PROBE_TRIES)."""
        if self.hung_after is not None:
            return None
        # In -m, as many probes at once as there are pool processes, so that each of them
        # is likely to take one: the shim reuses its last idle worker, and with it its pool
        # process, so probes one after the other may never reach the process wanted.
        at_once = max(1, len(self.process.children())) if self.process.mode == "process" else 1
        for _ in range(PROBE_TRIES):
            with ThreadPoolExecutor(at_once) as pool:
                reports = list(pool.map(lambda _: self.probe_once(), range(at_once)))
            for report in reports:
                if report is None:
                    return None  # no reply
                if pid is None or report["pid"] == pid:
                    return report
        return None

    def probe_once(self) -> Optional[Dict[str, Any]]:
        assert self.kong is not None
        try:
            return probe_heap(self.kong)
        except RuntimeError:  # no reply
            return None

    def shim_stats(self) -> Optional[Dict[str, Any]]:
        """The KongPdkFix part of GetStatus (None on an upstream or hung server)."""
        assert self.kong is not None
        try:
            return self.kong.call("plugin.GetStatus", None, timeout=5.0).get("KongPdkFix")
        except Exception:  # noqa: BLE001 - a hung server answers nothing
            return None


def label(patched: bool) -> str:
    return "patched" if patched else "upstream"


def shim_check(patched: bool, sample: Dict[str, Any]) -> List[str]:
    """The run must measure what it says: the shim active exactly on the patched server."""
    if patched and sample["shim"] is None:
        return ["shim not active"]
    if not patched and sample["shim"] is not None:
        return ["shim active on the upstream server"]
    return []


# -- the five event endings -----------------------------------------------------------------


def leak_run(plugin: str, expected: str, patched: bool, args: argparse.Namespace) -> dict:
    pdk = [ScriptedPDK({"kong.request.get_header": "value"}, record=False)]
    warm_up, events = args.warm_up, args.events
    capped = args.mode == "process" and not patched
    if capped:
        warm_up = min(warm_up, UPSTREAM_PROCESS_WARM_UP)
        events = min(events, args.upstream_process_events)
    with Server([plugin], patched, args) as srv:
        srv.run_events(plugin, warm_up, pdk)
        before = srv.sample()
        started = time.monotonic()
        kinds = srv.run_events(plugin, events, pdk)
        elapsed = time.monotonic() - started
        after = srv.sample(like=before)

    row = {
        "server": label(patched),
        "warm_up": warm_up,
        "events": events,
        "capped": capped,
        "kinds": dict(kinds),
        "hung_after": srv.hung_after,
        "elapsed": elapsed,
        "threads_before": before["threads"],
        "threads_after": after["threads"],
        "fds": after["fds"] - before["fds"],
        "rss_mib": (after["rss"] - before["rss"]) / MIB,
        "objects": delta(before["objects"], after["objects"]),
        "greenlets": delta(before["greenlets"], after["greenlets"]),
        "pool_before": before["pool"],
        "pool_after": after["pool"],
        "events_left": after["events"],
    }
    failed = shim_check(patched, after)
    if kinds.get(expected, 0) != events:
        failed.append("answers")
    if row["objects"] is None:
        failed.append("objects n/a")
    elif row["objects"] >= MAX_OBJECTS_GROWTH:
        failed.append("objects")
    if args.mode == "gevent" and (
        row["greenlets"] is None or row["greenlets"] >= MAX_OBJECTS_GROWTH
    ):
        failed.append("greenlets")
    if row["rss_mib"] >= MAX_RSS_GROWTH_MIB:
        failed.append("rss")
    if row["threads_after"] >= args.max_workers + THREADS_OVER_MAX_WORKERS:
        failed.append("threads")
    if row["fds"] >= MAX_FDS_GROWTH:
        failed.append("fds")
    if row["pool_after"] != row["pool_before"]:
        failed.append("pool processes")
    # None: -m upstream, whose table the probe (run in a pool process) cannot see.
    if row["events_left"] is not None and row["events_left"] != 0:
        failed.append("events left")
    row["verdict"] = verdict(failed)
    return row


def delta(before: Optional[int], after: Optional[int]) -> Optional[int]:
    return None if before is None or after is None else after - before


def verdict(failed: List[str]) -> str:
    return "FAIL: " + ", ".join(failed) if failed else "PASS"


# -- a handler that raises ------------------------------------------------------------------


def raise_run(patched: bool, args: argparse.Namespace) -> dict:
    """A raising handler, then a noop event of another plugin on a new connection, repeated.
    Upstream never answers the first and then holds its lock for good, so it gets one try
    with a short read timeout."""
    tries = args.raise_events if patched else 1
    with Server(["raises", "noop"], patched, args, read_timeout=10.0 if patched else 2.0) as srv:
        assert srv.kong is not None
        other = Kong(
            srv.process.socket_path,
            read_timeout=srv.read_timeout,
            event_connection_policy="fresh",
            plugins_info=srv.process.dump_all_plugins(),
        )
        kinds: Counter = Counter()
        next_kinds: Counter = Counter()
        latencies = []
        try:
            for _ in range(tries):
                outcome = srv.kong.run_event("raises", "access")
                kinds[outcome.kind] += 1
                if outcome.kind != "timeout":  # a timeout is no reply, not a slow one
                    latencies.append(outcome.latency)
                next_kinds[other.run_event("noop", "access").kind] += 1
        finally:
            other.close()
        after = srv.sample() if patched else {"shim": None}
    median = statistics.median(latencies) if latencies else None
    failed = shim_check(patched, after)
    if kinds.get("rpc_error", 0) != tries:
        failed.append("no error reply")
    if median is not None and median >= MAX_RAISE_REPLY_S:
        failed.append("slow reply")
    if next_kinds.get("ret", 0) != tries:
        failed.append("next event not answered")
    return {
        "server": label(patched),
        "tries": tries,
        "kinds": dict(kinds),
        "median_ms": None if median is None else median * 1000,
        "read_timeout": srv.read_timeout,
        "next_kinds": dict(next_kinds),
        "verdict": verdict(failed),
    }


# -- Kong goes silent mid-event -------------------------------------------------------------


def silent_run(patched: bool, args: argparse.Namespace) -> dict:
    """Events whose first PDK call Kong never answers (half stalled: Kong's timeout or a
    reload; half a Lua error in the call), with KONG_PDK_FIX_EVENT_TTL=1. Timed from the
    last of them (Kong silent from then on) until the table is empty and every worker idle;
    upstream is looked at once the same 3 s have passed. With more silent events than
    max_workers, the later ones wait for a worker the reaper frees: "sent in" shows it."""
    silent = [
        ScriptedPDK({"kong.request.get_header": STALL}, record=False),
        ScriptedPDK({"kong.request.get_header": LuaError("bad argument #1")}, record=False),
    ]
    with Server(["pdk_calls"], patched, args, env={"KONG_PDK_FIX_EVENT_TTL": "1"}) as srv:
        srv.run_events("pdk_calls", 10, [ScriptedPDK(record=False)])
        before = srv.sample()
        first = time.monotonic()
        kinds = srv.run_events("pdk_calls", args.silent_events, silent)
        last = time.monotonic()
        idle_at = None
        if patched:
            # Polled a little past the bound, so a slow reaper shows its real time.
            while time.monotonic() < last + REAPED_WITHIN_S + 2.0:
                stats = srv.shim_stats() or {}
                if (
                    "events" in stats
                    and sum(stats["events"].values()) == 0
                    and stats["workers"]["busy"] == 0
                ):
                    idle_at = time.monotonic()
                    break
                time.sleep(0.01)
        else:
            time.sleep(max(0.0, last + REAPED_WITHIN_S - time.monotonic()))
        after = srv.sample(like=before)

    failed = shim_check(patched, after)
    if idle_at is None or idle_at - last > REAPED_WITHIN_S:
        failed.append("not reaped within %.0f s" % REAPED_WITHIN_S)
    if after["events"] is not None and after["events"] != 0:
        failed.append("events left")
    return {
        "server": label(patched),
        "kinds": dict(kinds),
        "hung_after": srv.hung_after,
        "sent_s": last - first,
        "idle_after_s": None if idle_at is None else idle_at - last,
        "events_left": after["events"],
        "busy": after["busy"],
        "threads": after["threads"] - before["threads"],
        "objects": delta(before["objects"], after["objects"]),
        "verdict": verdict(failed),
    }


# -- one version: all scenarios -------------------------------------------------------------


def run_all(args: argparse.Namespace) -> dict:
    result: Dict[str, Any] = {
        "kong_pdk": metadata.version("kong-pdk"),
        "kong_pdk_fix": metadata.version("kong-pdk-fix"),
        "python": platform.python_version(),
        "mode": args.mode,
        "events": args.events,
        "warm_up": args.warm_up,
        "max_workers": args.max_workers,
        "leaks": [],
        "raise": [],
        "silent": [],
    }
    print(
        "kong-pdk %s, kong-pdk-fix %s, Python %s, %s mode: %d events per run after %d "
        "warm-up\n"
        % (
            result["kong_pdk"],
            result["kong_pdk_fix"],
            result["python"],
            args.mode,
            args.events,
            args.warm_up,
        ),
        flush=True,
    )
    for key, plugin, expected, title in SCENARIOS:
        # Upstream then patched, one right after the other, for each scenario.
        rows = [leak_run(plugin, expected, patched, args) for patched in (False, True)]
        scenario = {"key": key, "title": title, "expected": expected, "rows": rows}
        result["leaks"].append(scenario)
        print(leak_table(scenario, args.mode) + "\n", flush=True)
    result["raise"] = [raise_run(patched, args) for patched in (False, True)]
    print(raise_table(result) + "\n", flush=True)
    result["silent"] = [silent_run(patched, args) for patched in (False, True)]
    print(silent_table(result) + "\n", flush=True)
    return result


# -- tables ---------------------------------------------------------------------------------


def figure(value: Optional[float], fmt: str = "{:+,d}", missing: str = "n/a") -> str:
    return missing if value is None else fmt.format(value)


def count(n: int) -> str:
    return "{:,d}".format(n)


def kinds_text(kinds: Dict[str, int], hung_after: Optional[int] = None) -> str:
    text = (
        ", ".join(
            "%s %s" % (count(n), kind) for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1])
        )
        or "none"
    )
    return text if hung_after is None else "hangs after %s events: %s" % (count(hung_after), text)


def leak_table(scenario: dict, mode: str) -> str:
    header = ["server", "events sent", "outcomes", "objects Δ", "threads before → after"]
    header += ["fds Δ", "RSS Δ MiB", "events left"]
    header += {"thread": [], "gevent": ["greenlets Δ"], "process": ["pool processes"]}[mode]
    rows = []
    for row in scenario["rows"]:
        cells = [
            row["server"],
            "%s + %s%s"
            % (count(row["warm_up"]), count(row["events"]), " (capped)" * row["capped"]),
            kinds_text(row["kinds"], row["hung_after"]),
            figure(row["objects"]),
            "%s → %s" % (count(row["threads_before"]), count(row["threads_after"])),
            figure(row["fds"]),
            figure(row["rss_mib"], "{:+.1f}"),
            figure(row["events_left"], "{:,d}"),
        ]
        if mode == "gevent":
            cells.append(figure(row["greenlets"]))
        if mode == "process":
            cells.append("%d → %d" % (row["pool_before"], row["pool_after"]))
        rows.append(cells + ["%.1f" % row["elapsed"], row["verdict"]])
    header += ["time s", "criteria"]
    align = "lrl" + "r" * (len(header) - 4) + "l"
    return "\n".join(
        ["### %s (`%s`)" % (scenario["title"], scenario["key"]), ""] + table(header, align, rows)
    )


def raise_table(result: dict) -> str:
    rows = [
        [
            row["server"],
            "%d" % row["tries"],
            kinds_text(row["kinds"]),
            figure(row["median_ms"], "{:.1f}", "no reply within %g s" % row["read_timeout"]),
            kinds_text(row["next_kinds"]),
            row["verdict"],
        ]
        for row in result["raise"]
    ]
    header = ["server", "tries", "raising event", "median reply ms", "next event", "criteria"]
    return "\n".join(
        ["### a handler that raises (`raises`), then a `noop` event on another connection", ""]
        + table(header, "lrlrll", rows)
    )


def silent_table(result: dict) -> str:
    rows = [
        [
            row["server"],
            kinds_text(row["kinds"], row["hung_after"]),
            "%.2f" % row["sent_s"],
            figure(row["idle_after_s"], "{:.2f}", "not within %.0f s" % REAPED_WITHIN_S),
            figure(row["events_left"], "{:,d}"),
            figure(row["busy"], "{:d}"),
            figure(row["threads"]),
            figure(row["objects"]),
            row["verdict"],
        ]
        for row in result["silent"]
    ]
    header = ["server", "events", "sent in s", "empty and idle, s after the last"]
    header += ["events left", "busy workers", "threads Δ", "objects Δ", "criteria"]
    return "\n".join(
        ["### Kong goes silent mid-event (`pdk_calls`, KONG_PDK_FIX_EVENT_TTL=1)", ""]
        + table(header, "llrrrrrrl", rows)
    )


def criteria_text(args: argparse.Namespace) -> str:
    text = (
        "Criteria, applied to both rows: every event answered as Kong expects; deque + Queue"
        " + Condition objects grow by less than %d; RSS by less than %.0f MiB after warm-up;"
        " threads stay under max_workers + %d = %d (KONG_PDK_FIX_MAX_WORKERS=%d); fds grow"
        " by less than %d (the leak tests' bound: -m upstream leaks pipes); no event"
        " left in the server's table (the shim's, or kong-pdk's `PluginServer.events`"
        " upstream). A raising handler: an error reply in under %d ms (median) and the next"
        " event of another plugin on another connection answered. Kong silent"
        " (KONG_PDK_FIX_EVENT_TTL=1): the table empty and every worker idle within %.0f s"
        " of its last silent event."
        % (
            MAX_OBJECTS_GROWTH,
            MAX_RSS_GROWTH_MIB,
            THREADS_OVER_MAX_WORKERS,
            args.max_workers + THREADS_OVER_MAX_WORKERS,
            args.max_workers,
            MAX_FDS_GROWTH,
            MAX_RAISE_REPLY_S * 1000,
            REAPED_WITHIN_S,
        )
    )
    if args.mode == "gevent":
        text += (
            " In -g mode greenlets grow by less than %d too (upstream leaves"
            " a greenlet blocked for good on each event that never ends)." % MAX_OBJECTS_GROWTH
        )
    if args.mode == "process":
        text += (
            " In -m mode the pool processes (os.cpu_count() of them) stay as many, threads, fds and"
            " RSS are summed over the server and its pool processes, and the probe runs in a"
            " pool process: objects Δ is that pool process's (the one of the first sample),"
            " the main process's objects are not seen, and upstream's event table reads n/a."
            " Upstream is sent %s warm-up and %s events (capped): it leaks a pipe per event"
            " that never ends, and 20,000 would reach the fd limit (ulimit -n); a PDK call"
            " after exit pins a pool process for good, and once all are pinned every"
            " HandleEvent hangs: such a run stops after %d timeouts in a row (10 s each) and"
            " says after how many events it hung."
            % (
                count(UPSTREAM_PROCESS_WARM_UP),
                count(args.upstream_process_events),
                FROZEN_AFTER,
            )
        )
    return text


# -- --all-versions -------------------------------------------------------------------------


def build_wheel(work: str) -> str:
    """A wheel of this checkout, built from a copy of the files git sees (tracked, or new and
    not ignored, as they are in the working tree): an in-tree build leaves build/ behind, and
    a stale build/lib can slip removed modules into the wheel."""
    source = os.path.join(work, "src")
    for path in git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0"):
        if path and os.path.isfile(os.path.join(ROOT, path)):  # not deleted in the worktree
            os.makedirs(os.path.dirname(os.path.join(source, path)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, path), os.path.join(source, path))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "--disable-pip-version-check",
            "-w",
            os.path.join(work, "dist"),
            source,
        ],
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    (wheel,) = [f for f in os.listdir(os.path.join(work, "dist")) if f.endswith(".whl")]
    return os.path.join(work, "dist", wheel)


def venv_for(version: str, wheel: str) -> str:
    """The venv for kong-pdk `version`, made once; this checkout's wheel is put in again every
    time, so the venv never measures an older shim than the source."""
    os.makedirs(VENVS, exist_ok=True)
    with open(os.path.join(VENVS, ".gitignore"), "w") as f:
        f.write("# made by benchmarks/leaks.py --all-versions; nothing here belongs in git\n*\n")
    root = os.path.join(VENVS, "py%d.%d-kong-pdk-%s" % (sys.version_info[:2] + (version,)))
    python = os.path.join(root, "bin", "python")
    marker = os.path.join(root, "kong-pdk-installed")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if not os.path.exists(marker):
        print("creating %s" % os.path.relpath(root, ROOT), flush=True)
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", root], check=True, timeout=300)
        subprocess.run(pip + [wheel, "kong-pdk==%s" % version], check=True, timeout=900)
        with open(marker, "w") as f:
            f.write(version + "\n")
    else:
        subprocess.run(pip + ["--no-deps", "--force-reinstall", wheel], check=True, timeout=300)
    return python


# The options a run in another venv gets from this one.
FORWARDED = (
    "events",
    "mode",
    "warm_up",
    "max_workers",
    "raise_events",
    "silent_events",
    "upstream_process_events",
)


def run_child(python: str, args: argparse.Namespace, out: str) -> None:
    """This script in another venv; on a timeout or our own end, it is asked to stop (SIGTERM)
    so that it stops its servers."""
    cmd = [python, os.path.abspath(__file__), "--json", out]
    for name in FORWARDED:
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    # The venv's own packages only: a PYTHONPATH could bring back the dev install.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    child = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    try:
        code = child.wait(timeout=args.child_timeout)
    except BaseException:
        child.terminate()
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise
    if code != 0:
        raise RuntimeError("%s exited with %d" % (" ".join(cmd), code))


def all_versions(args: argparse.Namespace) -> int:
    versions = args.versions.split(",")
    output = args.output or DOCS[args.mode]
    results = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kpf-leaks-wheel-") as work:
        wheel = build_wheel(work)
        for version in versions:
            python = venv_for(version, wheel)
            out = os.path.join(work, "leaks-%s.json" % version)
            print("\n## kong-pdk %s\n" % version, flush=True)
            run_child(python, args, out)
            with open(out) as f:
                results.append(json.load(f))
    elapsed = time.monotonic() - started
    with open(output, "w") as f:
        f.write(leaks_markdown(results, args, elapsed))
    print("\n" + "\n".join(summary(results, args.mode)))
    print("\nwrote %s (%.0f s in all)" % (os.path.relpath(output, ROOT), elapsed))
    return 0


def upstream_cell(row: dict, mode: str) -> str:
    """The summary's word on an upstream row: what grew, by the figure that shows the mode's
    leak, or where it hung."""
    if row["hung_after"] is not None:
        return "upstream hangs after %s events" % count(row["hung_after"])
    grew = ["%s objects" % figure(row["objects"])]
    if mode == "thread":
        grew.append("%s threads" % figure(row["threads_after"] - row["threads_before"]))
    elif mode == "gevent":
        grew.append("%s greenlets" % figure(row["greenlets"]))
    else:
        grew.append("%s fds in %s events" % (figure(row["fds"]), count(row["events"])))
    return "upstream " + ", ".join(grew)


def summary(results: List[dict], mode: str) -> List[str]:
    header = ["kong-pdk"] + [s[3] for s in SCENARIOS] + ["raise", "silent Kong"]
    rows = []
    for result in results:
        cells = [result["kong_pdk"]]
        for scenario in result["leaks"]:
            up, fix = scenario["rows"]
            cells.append("%s; patched %s" % (upstream_cell(up, mode), fix["verdict"]))
        for key in ("raise", "silent"):
            up, fix = result[key]
            cells.append("upstream %s; patched %s" % (up["verdict"].split(":")[0], fix["verdict"]))
        rows.append(cells)
    return table(header, "l" * len(header), rows)


def leaks_markdown(results: List[dict], args: argparse.Namespace, elapsed: float) -> str:
    command = "python benchmarks/leaks.py " + " ".join(sys.argv[1:])
    others = ", ".join(
        "`%s` (%s)" % (os.path.relpath(path, ROOT), mode)
        for mode, path in DOCS.items()
        if mode != args.mode
    )
    parts = [
        "# Leaks: upstream kong-pdk vs kong-pdk-fix, %s mode" % args.mode,
        "",
        "Written by `benchmarks/leaks.py --all-versions`; do not edit by hand. The other modes:"
        " %s." % others,
        "",
        "- command: `%s` (%.0f min in all)" % (command.strip(), elapsed / 60),
        "- machine: %s; shared and noisy, so times are rough" % machine(),
        "- checkout: %s, installed as a wheel in one venv per kong-pdk version" % checkout(),
        "- %s mode; per scenario and server: %s warm-up events, then %s sequential events,"
        " each through the Kong emulator (`kong_pdk_fix.kongsim`) over the server's unix"
        " socket; upstream is the same server with KONG_PDK_FIX_DISABLE=1"
        % (args.mode, count(args.warm_up), count(args.events)),
        "",
        criteria_text(args),
        "",
        "## Summary",
        "",
    ]
    parts += summary(results, args.mode)
    for result in results:
        parts += [
            "",
            "## kong-pdk %s (Python %s, %s mode)"
            % (result["kong_pdk"], result["python"], result["mode"]),
            "",
        ]
        for scenario in result["leaks"]:
            parts += [leak_table(scenario, result["mode"]), ""]
        parts += [raise_table(result), "", silent_table(result)]
    return "\n".join(parts) + "\n"


# -- command line ---------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--events", type=int, default=20000, help="events per scenario and server (%(default)s)")
    add_mode_option(parser)
    add("--warm-up", type=int, default=1000, help="events before the first sample (%(default)s)")
    add("--max-workers", type=int, default=16, help="KONG_PDK_FIX_MAX_WORKERS (%(default)s)")
    add("--raise-events", type=int, default=100, help="raising events to patched (%(default)s)")
    add("--silent-events", type=int, default=40, help="events Kong is silent on (%(default)s)")
    add(
        "--upstream-process-events",
        type=int,
        default=UPSTREAM_PROCESS_EVENTS,
        help="in -m, events sent to upstream, which leaks an fd per event that never ends"
        " (%%(default)s, after %d warm-up events)" % UPSTREAM_PROCESS_WARM_UP,
    )
    add("--json", metavar="PATH", help="also write the results as JSON")
    add(
        "--all-versions",
        action="store_true",
        help="run for each kong-pdk in --versions, each in its own venv under"
        " .bench-venvs/, and write --output",
    )
    add("--versions", default=",".join(VERSIONS), help="for --all-versions (%(default)s)")
    add(
        "--output",
        help="for --all-versions; by --mode: docs/leaks.md, docs/leaks-gevent.md or"
        " docs/leaks-process.md",
    )
    add("--child-timeout", type=float, default=3600, help="--all-versions: s a version may take")
    args = parser.parse_args(argv)

    # SIGTERM unwinds like Ctrl-C, so every `with Server` stops its server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.all_versions:
        return all_versions(args)
    result = run_all(args)
    print(criteria_text(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
