"""Throughput, latency, CPU and memory of kong-python-pluginserver: upstream vs patched vs floor.

    python benchmarks/perf.py            # 5 rounds of 3 s per measurement, 100,000 mixed events
    python benchmarks/perf.py --quick    # a smoke run: 2 short rounds, 5,000 mixed events

Three real servers run side by side on their unix sockets, driven by the Kong emulator
(kong_pdk_fix.kongsim) in one run, interleaved round by round in a rotating order, so that a
noisy machine hits all of them alike:
  floor     benchmarks/bare_rpc_server.py: the same messages on the same kind of socket with
            no plugin machinery at all; what it costs is the wire and the emulator (the
            emulator is Python too, so its own cost is part of every figure)
  upstream  kong-python-pluginserver with KONG_PDK_FIX_DISABLE=1
  patched   kong-python-pluginserver as installed (kong_pdk_fix.pth patches it)
It prints medians over the rounds and the ratios, checks them against the targets of issue 4,
and (unless --quick) writes docs/performance.md with the tables, the machine and the command.
Server CPU comes from /proc/<pid>/stat (utime + stime, pool processes included). Every
server is stopped on the way out, on errors and on SIGTERM too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import time
from collections import Counter
from importlib import metadata
from typing import Callable, Dict, List, Optional

from common import MIB, ROOT, ServerUnderTest, add_mode_option, checkout, machine, table

from kong_pdk_fix.kongsim import ScriptedPDK, drive

BARE_SERVER = os.path.join(ROOT, "benchmarks", "bare_rpc_server.py")
DOCS = os.path.join(ROOT, "docs", "performance.md")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

SERVERS = ("floor", "upstream", "patched")
# (key, plugin (benchmarks/plugins, else tests/plugins), connections, what it measures)
THROUGHPUT = [
    ("noop", "noop", 1, "no-op handler, 1 connection"),
    ("pdk5", "pdk5", 1, "5 PDK calls, 1 connection"),
    (
        "io_before",
        "io_then_pdk",
        20,
        "20 ms blocking I/O before the first PDK call, 20 connections",
    ),
    ("sleep_after", "pdk_then_sleep", 20, "20 ms sleep after a PDK call, 20 connections"),
]
# 20 connections each busy 20 ms per event at the least.
IDEAL_CONCURRENT = 1000.0
# The mixed run: no-op, PDK calls, exit, error, raise. Upstream never answers a raising
# handler and then hangs every event (KONG_PROTOCOL.md), so it runs the first four only.
MIXED = ["noop", "pdk5", "exit_first", "error_later", "raises"]
MIXED_UPSTREAM = ["noop", "pdk5", "exit_first", "error_later"]
READ_TIMEOUT = 5.0
# What each mixed plugin's events end as, seen from Kong (kongsim's Outcome.kind).
EXPECTED = {"ret", "exit", "error", "rpc_error"}
# Kong's answer to every PDK call of the benchmark plugins: nil, as for a missing header.
PDK = ScriptedPDK(record=False)


class Target(ServerUnderTest):
    """One server under test: floor, upstream or patched."""

    def __init__(self, kind: str, plugins: List[str], args: argparse.Namespace) -> None:
        super().__init__(
            plugins,
            mode=args.mode,
            patched=kind == "patched",
            # Kong waits 60 s; a lost reply here costs 5 s and shows as a timeout.
            read_timeout=READ_TIMEOUT,
            command=[sys.executable, BARE_SERVER] if kind == "floor" else None,
        )
        self.kind = kind

    def cpu(self) -> float:
        """CPU seconds the server used so far: utime + stime of /proc/<pid>/stat."""
        return self.total(cpu_ticks) / CLOCK_TICKS

    def rss(self) -> int:
        return self.total(self.process.rss)


def cpu_ticks(pid: int) -> int:
    with open("/proc/%d/stat" % pid) as f:
        # The name in parentheses may hold spaces; utime, stime are fields 14, 15.
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def percentile(ordered: List[float], q: float) -> float:
    """Nearest rank; 0 for no samples."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(target: Target, plugin: str, connections: int, args: argparse.Namespace) -> dict:
    scenario = [(plugin, "access", PDK, None)]
    # Not timed: starts the instance, fills the worker pool and the connection pool.
    drive(target.kong, scenario, duration=args.warm_up, concurrency=connections)
    server_cpu = target.cpu()
    client_cpu = time.process_time()
    result = drive(target.kong, scenario, duration=args.seconds, concurrency=connections)
    server_cpu = target.cpu() - server_cpu
    client_cpu = time.process_time() - client_cpu
    latencies = sorted(result.latencies)
    per_10k = 10000.0 / result.events if result.events else 0.0
    return {
        "events": result.events,
        "eps": result.events_per_s,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "cpu_10k": server_cpu * per_10k,
        "client_cpu_10k": client_cpu * per_10k,
        "kinds": dict(result.by_kind),
    }


def throughput(args: argparse.Namespace) -> Dict[str, Dict[str, List[dict]]]:
    """results[scenario][server] = one measurement per round."""
    plugins = sorted({t[1] for t in THROUGHPUT})
    results: Dict[str, Dict[str, List[dict]]] = {
        key: {kind: [] for kind in SERVERS} for key, _, _, _ in THROUGHPUT
    }
    with contextlib.ExitStack() as stack:
        targets = {kind: stack.enter_context(Target(kind, plugins, args)) for kind in SERVERS}
        for round_no in range(args.rounds):
            # A rotating order: no server always runs first, or right after another.
            order = SERVERS[round_no % 3 :] + SERVERS[: round_no % 3]
            for key, plugin, connections, _ in THROUGHPUT:
                for kind in order:
                    m = measure(targets[kind], plugin, connections, args)
                    results[key][kind].append(m)
                    odd = unexpected(m["kinds"], {"ret"})
                    print(
                        "round %d/%d  %-12s %-8s %8.0f events/s  p50 %6.2f ms  p99 %7.2f ms"
                        "  cpu %5.2f s/10k  %s"
                        % (
                            round_no + 1,
                            args.rounds,
                            key,
                            kind,
                            m["eps"],
                            m["p50_ms"],
                            m["p99_ms"],
                            m["cpu_10k"],
                            "UNEXPECTED %s" % odd if odd else "",
                        ),
                        flush=True,
                    )
    return results


def unexpected(kinds: Dict[str, int], expected: set) -> Dict[str, int]:
    """The outcomes (kongsim's Outcome.kind) that should not have happened."""
    return {k: n for k, n in kinds.items() if k not in expected}


def mixed(args: argparse.Namespace) -> Dict[str, dict]:
    """RSS after warm-up and after --mixed events of the mix, upstream and patched in
    alternating chunks (fresh servers: the throughput rounds do not count)."""
    mixes = {"upstream": MIXED_UPSTREAM, "patched": MIXED}
    out: Dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        targets = {kind: stack.enter_context(Target(kind, MIXED, args)) for kind in mixes}
        scenarios = {kind: [(p, "access", PDK, None) for p in mix] for kind, mix in mixes.items()}
        for kind, target in targets.items():
            drive(
                target.kong,
                scenarios[kind],
                count=args.mixed_warm_up,
                concurrency=args.mixed_connections,
            )
            out[kind] = {
                "rss_warm": target.rss(),
                "events": 0,
                "elapsed": 0.0,
                "cpu": 0.0,
                "kinds": Counter(),
                "mix": mixes[kind],
            }
        while any(out[kind]["events"] < args.mixed for kind in mixes):
            for kind, target in targets.items():
                n = min(args.mixed_chunk, args.mixed - out[kind]["events"])
                if n <= 0:
                    continue
                cpu = target.cpu()
                result = drive(
                    target.kong, scenarios[kind], count=n, concurrency=args.mixed_connections
                )
                out[kind]["cpu"] += target.cpu() - cpu
                out[kind]["events"] += result.events
                out[kind]["elapsed"] += result.elapsed
                out[kind]["kinds"].update(result.by_kind)
            print(
                "mixed: %s"
                % ", ".join(
                    "%s %s events" % (kind, "{:,d}".format(o["events"])) for kind, o in out.items()
                ),
                flush=True,
            )
        for kind, target in targets.items():
            out[kind]["rss_after"] = target.rss()
            out[kind]["kinds"] = dict(out[kind]["kinds"])
    return out


# -- summary --------------------------------------------------------------------------------


def med(rounds: List[dict], key: str) -> float:
    return statistics.median(m[key] for m in rounds)


def ratio(a: float, b: float) -> Optional[float]:
    return a / b if b else None


def fmt_ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else "%.2fx" % value


def tables(
    results: Dict[str, Dict[str, List[dict]]], memory: Dict[str, dict], args: argparse.Namespace
) -> str:
    rounds = "median of %d rounds of %g s" % (args.rounds, args.seconds)

    def per_scenario(
        heading: str, header: List[str], cells: Callable[[dict], List[str]], note: str = ""
    ) -> List[str]:
        """A section with a row per THROUGHPUT scenario: its title, then cells(its rounds)."""
        rows = [[title] + cells(results[key]) for key, _, _, title in THROUGHPUT]
        lines = ["### " + heading, ""] + ([note, ""] if note else [])
        return lines + table(["scenario"] + header, "l" + "r" * len(header), rows)

    def eps(r: dict) -> List[str]:
        floor, up, fix = (med(r[k], "eps") for k in SERVERS)
        share = "%.0f%%" % (100 * fix / floor) if floor else "n/a"
        return ["{:,.0f}".format(v) for v in (floor, up, fix)] + [fmt_ratio(ratio(fix, up)), share]

    def latency(r: dict) -> List[str]:
        return ["%.2f / %.2f" % (med(r[k], "p50_ms"), med(r[k], "p99_ms")) for k in SERVERS]

    def cpu(r: dict) -> List[str]:
        floor, up, fix = (med(r[k], "cpu_10k") for k in SERVERS)
        emulator = "%.2f" % med(r["floor"], "client_cpu_10k")
        return ["%.2f" % v for v in (floor, up, fix)] + [fmt_ratio(ratio(fix, up)), emulator]

    def where(r: dict) -> List[str]:
        floor, up, fix = (med(r[k], "cpu_10k") * 100 for k in SERVERS)  # s per 10k -> µs each
        return ["%.0f" % v for v in (floor, up, fix, fix - floor)]

    lines = per_scenario(
        "Events per second (%s)" % rounds,
        ["floor", "upstream", "patched", "patched ÷ upstream", "patched ÷ floor"],
        eps,
    )
    lines += [""] + per_scenario(
        "Latency per event, p50 / p99 ms (Kong's side, %s)" % rounds, list(SERVERS), latency
    )
    lines += [""] + per_scenario(
        "CPU seconds per 10,000 events (%s)" % rounds,
        ["floor server", "upstream server", "patched server", "patched ÷ upstream", "emulator"],
        cpu,
        note="Server: the plugin server process (utime + stime). Emulator: this benchmark's own"
        " process, the Kong side, during the floor run.",
    )
    lines += [""] + per_scenario(
        "Where the time goes: server CPU µs per event (%s)" % rounds,
        ["floor", "upstream", "patched", "patched − floor"],
        where,
        note="The floor's server only reads and writes the same messages. The patched server adds"
        " kong-pdk's PDK stubs, the checks of each request and one thread hand-off to the"
        " event's worker and one back per event, however many PDK calls the handler makes (the"
        " worker reads its Steps itself); upstream makes a hand-off each way per PDK call and"
        " starts a thread and two queues per event.",
    )
    rows = []
    for kind in ("upstream", "patched"):
        m = memory[kind]
        note = "" if kind == "patched" else " (raise skipped: it freezes upstream for good)"
        rows.append(
            [
                kind,
                ", ".join(m["mix"]) + note,
                "%.1f" % (m["rss_warm"] / MIB),
                "%.1f" % (m["rss_after"] / MIB),
                "%+.1f" % ((m["rss_after"] - m["rss_warm"]) / MIB),
                "{:,.0f}".format(m["events"] / m["elapsed"]) if m["elapsed"] else "n/a",
                "%.2f" % (m["cpu"] * 10000.0 / m["events"] if m["events"] else 0.0),
                ", ".join("%s %s" % ("{:,d}".format(n), k) for k, n in sorted(m["kinds"].items())),
            ]
        )
    lines += [
        "",
        "### Memory: %s mixed events after %s of warm-up (%d connections)"
        % ("{:,d}".format(args.mixed), "{:,d}".format(args.mixed_warm_up), args.mixed_connections),
        "",
    ] + table(
        [
            "server",
            "mix",
            "RSS after warm-up MiB",
            "RSS after MiB",
            "Δ MiB",
            "events/s",
            "server CPU s per 10k",
            "outcomes",
        ],
        "llrrrrrl",
        rows,
    )
    lines += ["", "### Targets (issue 4)", ""] + table(
        ["target", "measured", "result"],
        "lll",
        [[t, measured, "PASS" if ok else "FAIL"] for t, measured, ok in targets(results, memory)],
    )
    lines += ["", "### Events per second, every round", ""] + table(
        ["scenario", "server", "rounds"],
        "lll",
        [
            [key, kind, ", ".join("{:,.0f}".format(m["eps"]) for m in results[key][kind])]
            for key, _, _, _ in THROUGHPUT
            for kind in SERVERS
        ],
    )
    return "\n".join(lines)


def targets(results: Dict[str, Dict[str, List[dict]]], memory: Dict[str, dict]) -> list:
    def eps(key: str, kind: str) -> float:
        return med(results[key][kind], "eps")

    out = []
    for key, what in (("noop", "no-op"), ("pdk5", "5 PDK calls")):
        r = ratio(eps(key, "patched"), eps(key, "upstream")) or 0.0
        out.append(("%s events/s: patched ≥ 1.5x upstream (aim 2x)" % what, "%.2fx" % r, r >= 1.5))
    r = ratio(eps("io_before", "patched"), eps("io_before", "upstream")) or 0.0
    out.append(
        (
            "20 connections, 20 ms I/O before the first PDK call: patched ≥ 15x upstream",
            "%.1fx" % r,
            r >= 15,
        )
    )
    share = eps("io_before", "patched") / IDEAL_CONCURRENT
    out.append(
        (
            "the same: patched ≥ 90%% of the ideal %s events/s"
            % "{:,.0f}".format(IDEAL_CONCURRENT),
            "%.0f%%" % (100 * share),
            share >= 0.9,
        )
    )
    odd = []
    for key, by_kind in results.items():
        for kind, rounds in by_kind.items():
            for m in rounds:
                if unexpected(m["kinds"], {"ret"}):
                    odd.append("%s %s: %s" % (key, kind, unexpected(m["kinds"], {"ret"})))
    for kind, m in memory.items():
        if unexpected(m["kinds"], EXPECTED):
            odd.append("mixed %s: %s" % (kind, unexpected(m["kinds"], EXPECTED)))
    out.append(
        (
            "every event answered as Kong expects (no timeouts, no errors)",
            "; ".join(odd) or "yes",
            not odd,
        )
    )
    m = memory["patched"]
    grown = (m["rss_after"] - m["rss_warm"]) / MIB
    out.append(
        (
            "patched RSS after %s mixed events within 5 MiB of warm-up"
            % "{:,d}".format(m["events"]),
            "%+.1f MiB" % grown,
            abs(grown) <= 5,
        )
    )
    worse = []
    for key, _, _, _ in THROUGHPUT:
        r = ratio(med(results[key]["patched"], "cpu_10k"), med(results[key]["upstream"], "cpu_10k"))
        worse.append("%s %s" % (key, fmt_ratio(r)))
    cpu_ok = all(
        med(results[k]["patched"], "cpu_10k") <= med(results[k]["upstream"], "cpu_10k")
        for k, _, _, _ in THROUGHPUT
    )
    out.append(
        (
            "CPU per event: patched no worse than upstream (patched ÷ upstream)",
            ", ".join(worse),
            cpu_ok,
        )
    )
    return out


# -- the report -----------------------------------------------------------------------------


def report(body: str, args: argparse.Namespace, elapsed: float) -> str:
    command = ("python benchmarks/perf.py " + " ".join(sys.argv[1:])).strip()
    return "\n".join(
        [
            "# Performance: upstream kong-pdk vs kong-pdk-fix vs a bare RPC floor",
            "",
            "Written by `benchmarks/perf.py`; do not edit by hand.",
            "",
            "- command: `%s` (%.1f min)" % (command, elapsed / 60),
            "- machine: %s; shared and noisy: medians of interleaved rounds, compare ratios"
            % machine(),
            "- kong-pdk %s, kong-pdk-fix %s (checkout %s), %s mode"
            % (
                metadata.version("kong-pdk"),
                metadata.version("kong-pdk-fix"),
                checkout(),
                args.mode,
            ),
            "- floor: `benchmarks/bare_rpc_server.py`, the same messages over the same kind of"
            " socket with no plugin machinery; the Kong emulator driving all three is Python too,"
            " so the floor is mostly the emulator's own cost",
            "- upstream: `kong-python-pluginserver` with KONG_PDK_FIX_DISABLE=1; patched: the same"
            " command with the shim active",
            "",
            body,
            "",
        ]
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 2 rounds of 0.5 s, 5,000 mixed events, no docs",
    )
    parser.add_argument("--rounds", type=int, help="rounds per measurement (default 5)")
    parser.add_argument("--seconds", type=float, help="seconds per measurement (default 3)")
    parser.add_argument("--mixed", type=int, help="mixed events per server (default 100000)")
    parser.add_argument(
        "--mixed-connections", type=int, default=4, help="connections of the mixed run (default 4)"
    )
    add_mode_option(parser)
    parser.add_argument(
        "--output",
        help="where to write the report (default: docs/performance.md, none with --quick)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 5)
    args.seconds = args.seconds or (0.5 if quick else 3.0)
    args.warm_up = 0.2 if quick else 0.5  # seconds before each measurement
    args.mixed = args.mixed or (5000 if quick else 100000)
    args.mixed_warm_up = max(500, args.mixed // 20)
    args.mixed_chunk = max(1000, args.mixed // 10)
    output = args.output or (None if quick else DOCS)

    # SIGTERM unwinds like Ctrl-C, so every Target stops its server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    results = throughput(args)
    memory = mixed(args)
    body = tables(results, memory, args)
    print("\n" + body)
    if output:
        with open(output, "w") as f:
            f.write(report(body, args, time.monotonic() - started))
        print("\nwrote %s" % os.path.relpath(output, os.getcwd()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
