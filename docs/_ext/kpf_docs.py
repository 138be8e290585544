"""Pages written at every build, so what they say cannot drift from what the code does.

Into docs/_generated/ (git-ignored; the pages pull the files in with MyST's include):

- settings.md: every setting of kong_pdk_fix.config.Settings, with its default, type, wrapper
  flag (kong_pdk_fix.cli._FLAGS), environment variable, allowed values and the comment above
  it in config.py; then the kill switch, whose accepted values are found by asking
  config.disabled() itself.
- help-*.txt: the --help of kong-python-pluginserver-fixed and kong-pdk-fix (check, soak).
- compatibility.md: kong-pdk x Python x mode, from the JUnit XML files the test envs of tox
  write into {toxworkdir}/results (DOCS_TOX_RESULTS, else <checkout>/.tox/results).
  No files there: the page says so and shows no matrix.

A build fails (an exception, not a warning) when config.py has a setting without a wrapper
flag, so a new setting cannot go undocumented.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import io
import logging
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import MISSING, dataclass, field, fields
from typing import Dict, List, Optional, Tuple

DOCS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(DOCS)
OUT = os.path.join(DOCS, "_generated")
RESULTS_VARIABLE = "DOCS_TOX_RESULTS"
MODES = ("thread", "gevent", "process")  # tests/servers.py MODES: the test ids' mode part
MODE_TITLES = {
    "thread": "threading (the default)",
    "gevent": "gevent (`-g`)",
    "process": "multiprocessing (`-m`)",
    None: "tests that do not depend on the mode",
}
ENV_NAME = re.compile(r"^py3(\d+)-kongpdk(\d)(\d\d)$")
# The page benchmarks/perf.py writes goes from "#" to "###", which MyST warns about.
GENERATED_BENCHMARK_PAGES = ("performance",)
# What config.disabled() is asked about, to list what it accepts.
KILL_SWITCH_CANDIDATES = ("1", "true", "yes", "on", "0", "false", "no", "off", "")


def write(name: str, text: str) -> None:
    path = os.path.join(OUT, name)
    old = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    if old != text:  # unchanged files keep their mtime: Sphinx then rebuilds nothing
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# -- configuration reference ---------------------------------------------------------------


def field_comments(source: str, class_name: str) -> Dict[str, str]:
    """The comment lines right above each field of `class_name` in `source`."""
    tree = ast.parse(source)
    lines = source.splitlines()
    out: Dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    comment: List[str] = []
                    i = stmt.lineno - 2
                    while i >= 0 and lines[i].strip().startswith("#"):
                        comment.insert(0, lines[i].strip().lstrip("#").strip())
                        i -= 1
                    out[stmt.target.id] = " ".join(comment)
    return out


def settings_page() -> str:
    from kong_pdk_fix import cli, config

    flags = {dest: (flag, text) for flag, dest, text in cli._FLAGS}
    choices = {"on_error": config.ON_ERROR_CHOICES, "log_level": config.LOG_LEVELS}
    with open(config.__file__, encoding="utf-8") as f:
        comments = field_comments(f.read(), "Settings")
    rows = []
    for f_ in fields(config.Settings):
        if f_.name not in flags:
            raise RuntimeError(
                "kong_pdk_fix.config.Settings.%s has no wrapper flag in kong_pdk_fix.cli._FLAGS"
                % f_.name
            )
        flag, text = flags[f_.name]
        default = f_.default if f_.default is not MISSING else "(required)"
        kind = config._CONVERTERS[f_.name].__name__
        # Choices where config.py names them; otherwise the type its converter parses.
        allowed = ", ".join("`%s`" % c for c in choices.get(f_.name, ())) or "`%s`" % kind
        rows.append(
            "| `%s` | %s | `%s` | %s | `%s` | `%s` | %s |"
            % (
                f_.name,
                cell(text),
                default,
                allowed,
                flag,
                config.ENV_PREFIX + f_.name.upper(),
                cell(comments.get(f_.name, "")),
            )
        )
    accepted = [v for v in KILL_SWITCH_CANDIDATES if config.disabled({"KONG_PDK_FIX_DISABLE": v})]
    return "\n".join(
        [
            "| Setting | What it does | Default | Values | Wrapper flag | Environment variable "
            "| Notes (the comment in config.py) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            "The kill switch, `KONG_PDK_FIX_DISABLE`, is an environment variable only. "
            "It counts as set for the values %s (case and surrounding spaces ignored); "
            "anything else, or no variable, leaves the fix on."
            % ", ".join("`%s`" % v for v in accepted),
            "",
        ]
    )


def help_texts() -> Dict[str, str]:
    """--help of the commands, as a user sees it at 100 columns."""
    env = dict(os.environ, COLUMNS="100", PYTHONPATH=ROOT)
    env.pop("KONG_PDK_FIX_DISABLE", None)
    texts = {}
    wrapper = (
        "import sys; sys.argv[0] = 'kong-python-pluginserver-fixed'; "
        "from kong_pdk_fix.cli import pluginserver_main; pluginserver_main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    texts["kong-python-pluginserver-fixed"] = done.stdout
    from kong_pdk_fix import cli

    old_columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        for args in ([], ["check"], ["soak"]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                cli.main(args + ["--help"])
            texts[" ".join(["kong-pdk-fix"] + args)] = out.getvalue().replace(
                "usage: " + os.path.basename(sys.argv[0]), "usage: kong-pdk-fix"
            )
    finally:
        if old_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_columns
    return texts


# -- compatibility matrix ------------------------------------------------------------------


@dataclass
class Counts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: List[str] = field(default_factory=list)

    def add(self, outcome: str, name: str) -> None:
        if outcome == "passed":
            self.passed += 1
        elif outcome == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
            self.failures.append(name)

    @property
    def ran(self) -> int:
        return self.passed + self.failed

    def text(self) -> str:
        if not self.ran and not self.skipped:
            return "not run"
        word = "**FAIL** %d of %d" % (self.failed, self.ran) if self.failed else "pass"
        if not self.failed:
            word += " (%d)" % self.passed
        if self.skipped:
            word += ", %d skipped" % self.skipped
        return word


@dataclass
class EnvResult:
    env: str
    python: str
    kong_pdk: str
    path: str
    timestamp: str
    time: float
    by_mode: Dict[Optional[str], Counts]

    def total(self) -> Counts:
        total = Counts()
        for c in self.by_mode.values():
            total.passed += c.passed
            total.failed += c.failed
            total.skipped += c.skipped
            total.failures += c.failures
        return total


def mode_of(test_name: str) -> Optional[str]:
    """The mode in a test id like `test_x[exit_first-thread]`, None when it has none."""
    params = test_name.partition("[")[2].rstrip("]")
    parts = set(re.split(r"[-_ ]", params)) if params else set()
    found = [m for m in MODES if m in parts]
    return found[0] if len(found) == 1 else None


def read_results(directory: str) -> Tuple[List[EnvResult], List[str]]:
    """(the results of each tox test env found, the files that could not be read)."""
    results: List[EnvResult] = []
    unreadable: List[str] = []
    if not os.path.isdir(directory):
        return results, unreadable
    for name in sorted(os.listdir(directory)):
        stem, ext = os.path.splitext(name)
        match = ENV_NAME.match(stem)
        if ext != ".xml" or not match:
            continue
        path = os.path.join(directory, name)
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError):
            unreadable.append(name)
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        by_mode: Dict[Optional[str], Counts] = {}
        timestamp, seconds = "", 0.0
        for suite in suites:
            timestamp = timestamp or suite.get("timestamp", "")
            seconds += float(suite.get("time", 0) or 0)
            for case in suite.iter("testcase"):
                test = "%s::%s" % (case.get("classname", ""), case.get("name", ""))
                if case.find("failure") is not None or case.find("error") is not None:
                    outcome = "failed"
                elif case.find("skipped") is not None:
                    outcome = "skipped"
                else:
                    outcome = "passed"
                by_mode.setdefault(mode_of(case.get("name", "")), Counts()).add(outcome, test)
        results.append(
            EnvResult(
                env=stem,
                python="3.%s" % match.group(1),
                kong_pdk="%s.%s" % (match.group(2), match.group(3)),
                path=path,
                timestamp=timestamp,
                time=seconds,
                by_mode=by_mode,
            )
        )
    return results, unreadable


def expand(entry: str) -> List[str]:
    """tox's generative names: `py3{9,10}-kongpdk{033,034}` -> four env names."""
    match = re.search(r"\{([^{}]*)\}", entry)
    if not match:
        return [entry]
    return [
        name
        for choice in match.group(1).split(",")
        for name in expand(entry[: match.start()] + choice.strip() + entry[match.end() :])
    ]


def planned_envs() -> List[Tuple[str, str]]:
    """(kong-pdk, Python) of every test env in tox.ini's env_list."""
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(ROOT, "tox.ini"), encoding="utf-8")
    entries = parser.get("tox", "env_list", fallback="").split()
    out = []
    for entry in entries:
        for name in expand(entry):
            match = ENV_NAME.match(name)
            if match:
                out.append(("%s.%s" % (match.group(2), match.group(3)), "3.%s" % match.group(1)))
    return out


def version_key(version: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def compatibility_page(directory: str) -> str:
    results, unreadable = read_results(directory)
    shown = os.path.relpath(directory, ROOT) if directory.startswith(ROOT) else directory
    lines: List[str] = []
    if not results:
        lines += [
            "```{important}",
            "No test results were found when this site was built (looked in `%s`), so this "
            "page shows no matrix: it is never typed by hand. Build the docs after the tests, "
            "for instance with `tox run-parallel` (the `docs` env runs last) or "
            "`tox -e py311-kongpdk036,docs`." % shown,
            "```",
            "",
        ]
        if unreadable:
            lines += ["Unreadable result files: %s." % ", ".join(unreadable), ""]
        return "\n".join(lines)

    planned = planned_envs()
    pythons = sorted({r.python for r in results} | {py for _, py in planned}, key=version_key)
    pdks = sorted({r.kong_pdk for r in results} | {pdk for pdk, _ in planned}, key=version_key)
    index = {(r.kong_pdk, r.python): r for r in results}
    failing = [r for r in results if r.total().failed]
    lines += [
        "Read from %d result file%s in `%s` when this site was built; %s."
        % (
            len(results),
            "" if len(results) == 1 else "s",
            shown,
            "none had failures"
            if not failing
            else "**%d env%s had failures**" % (len(failing), "" if len(failing) == 1 else "s"),
        ),
        "A cell counts the test cases of that mode in that env: `pass (N)`, or "
        "`FAIL F of N`; `not run` means the env ran no test of that mode (a partial run, "
        "e.g. `tox -e ... -- tests/test_units.py`); `no result`, no result file for that "
        "env (not run, or its interpreter missing: tox skips those unless told not to).",
        "",
    ]
    for mode in (*MODES, None):
        lines += ["### %s" % MODE_TITLES[mode], ""]
        lines.append("| kong-pdk | " + " | ".join("Python %s" % p for p in pythons) + " |")
        lines.append("| --- |" + " --- |" * len(pythons))
        for pdk in pdks:
            cells = []
            for py in pythons:
                r = index.get((pdk, py))
                cells.append(r.by_mode.get(mode, Counts()).text() if r else "no result")
            lines.append("| %s | %s |" % (pdk, " | ".join(cells)))
        lines.append("")
    lines += [
        "### The result files",
        "",
        "| tox env | test cases | passed | failed | skipped | pytest time s | started (UTC) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in sorted(results, key=lambda r: (version_key(r.kong_pdk), version_key(r.python))):
        t = r.total()
        lines.append(
            "| `%s` | %d | %d | %d | %d | %.0f | %s |"
            % (r.env, t.ran + t.skipped, t.passed, t.failed, t.skipped, r.time, started(r))
        )
    lines.append("")
    for r in failing:
        lines += ["Failed in `%s`:" % r.env, ""]
        lines += ["- `%s`" % name for name in r.total().failures[:30]]
        lines.append("")
    if unreadable:
        lines += ["Unreadable result files: %s." % ", ".join(unreadable), ""]
    return "\n".join(lines)


def started(r: EnvResult) -> str:
    try:
        when = datetime.datetime.fromisoformat(r.timestamp)
    except ValueError:
        return r.timestamp or "?"
    if when.tzinfo is not None:
        when = when.astimezone(datetime.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M")


def results_directory() -> str:
    return os.environ.get(RESULTS_VARIABLE) or os.path.join(ROOT, ".tox", "results")


# -- Sphinx ----------------------------------------------------------------------------------


class BenchmarkHeadingFilter(logging.Filter):
    """Drops MyST's non-consecutive heading warning for the benchmark pages only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "type", None) != "myst" or getattr(record, "subtype", None) != "header":
            return True
        location = getattr(record, "location", None)
        docname = location[0] if isinstance(location, tuple) and location else str(location)
        docname = str(docname).split(":")[0]
        base = os.path.splitext(os.path.basename(docname))[0]
        return base not in GENERATED_BENCHMARK_PAGES


def generate(app) -> None:
    os.makedirs(OUT, exist_ok=True)
    write("settings.md", settings_page())
    for command, text in help_texts().items():
        write("help-%s.txt" % command.replace(" ", "-"), text)
    write("compatibility.md", compatibility_page(results_directory()))


def setup(app):
    for handler in logging.getLogger("sphinx").handlers:
        handler.filters.insert(0, BenchmarkHeadingFilter())
    app.connect("builder-inited", generate)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
