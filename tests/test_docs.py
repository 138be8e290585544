"""The documentation's examples and deployment files do what the pages say.

- Every fenced example in docs/*.md: `python` blocks run in a fresh interpreter; each line of a
  `sh` block runs in bash (a few are listed in NOT_RUN_HERE with the reason and where they run
  instead); `console` blocks are recorded runs whose commands must be listed in RECORDED; `ini`
  snippets use only kong.conf keys deploy/kong.conf defines. Any other language fails.
- deploy/Dockerfile: known instructions only, a pinned base image, COPY sources that exist,
  shell syntax of every RUN, the pins of its pip line, `kong-pdk-fix check` after it, and every
  path kong.conf runs made by the image. With DOCS_INSTALL_DOCKERFILE=1 (the docs tox env) its
  pip line is installed into a fresh venv, the wheel of this checkout standing in for PyPI's
  kong-pdk-fix, and `kong-pdk-fix check` must pass there.
- deploy/kong.conf: each plugin server has its keys, the query commands report exactly the
  plugins `plugins` names, and each start command serves a patched plugin server on the socket
  kong.conf names. deploy/values.yaml says the same as kong.conf.

No Docker, Helm or Kong here: paths of the image are mapped onto this checkout and this
interpreter's bin directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, child_env, explain, run

import kong_pdk_fix
from kong_pdk_fix import compat
from kong_pdk_fix.kongsim import Kong

DOCS = ROOT / "docs"
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
# Pages whose authors test their own examples (issues 6 and 8), and generated pages.
OTHER_OWNERS = {"testing.md", "reliability.md"}

# sh lines that cannot run in this test, why, and where they do run.
NOT_RUN_HERE = {
    "pip wheel --no-deps -w deploy/wheels .": "writes into the checkout; conftest.built_wheel "
    "builds the wheel the same way (pip wheel --no-deps) for the Dockerfile test",
    "docker build -t registry.example.com/kong-python:3.9.1-kpf0.1.0 deploy/": "no Docker here; "
    "the Dockerfile is checked by the tests below",
    "helm upgrade --install kong kong/kong -f deploy/values.yaml": "no Helm or cluster here; "
    "values.yaml is checked against kong.conf below",
    'python3 -m venv .ci-venv && .ci-venv/bin/python -m pip install -q "tox>=4.2,<5" && '
    ".ci-venv/bin/tox run-parallel -p 2 --parallel-no-spinner": "the whole test matrix: "
    ".ci/run runs it",
    ".ci-venv/bin/tox -e py311-kongpdk036 -- -k activation": "runs tests: tox itself",
    ".ci-venv/bin/tox -e lint,type": "runs the lint and type checks: tox itself",
    ".ci-venv/bin/tox -e docs": "builds this site: tox itself",
}
# Commands of console blocks: runs whose output the page shows as it was recorded, and the
# README's command that repeats them (run elsewhere, as said).
RECORDED = {
    "kong-pdk-fix soak --mix noop --duration 20 --plot soak-0.33-noop.svg": (
        "docs/_data/soak-thread-kongpdk033-noop.txt"
    ),
    "kong-pdk-fix soak --duration 20 --json /tmp/soak/soak.json --plot /tmp/soak/soak.svg": (
        "docs/_data/soak-thread-kongpdk036.txt"
    ),
    "kong-pdk-fix soak --run patched --duration 180 --no-plot --json p180.json": (
        "docs/_data/soak-patched-180s.txt"
    ),
    'pip install ".[check]" && kong-pdk-fix soak --duration 10': "README's first command; "
    "tox installs the same extra, and tests/test_soak.py runs soak in short runs",
}
# What some of the commands the pages show must print.
EXPECTED_OUTPUT = {
    'KONG_PDK_FIX_DISABLE=1 python -c "import kong_pdk_fix; print(kong_pdk_fix.install())"': (
        "False\n"
    ),
    'python -c "import kong_pdk_fix, kong_pdk.server; print(kong_pdk_fix.is_installed())"': (
        "True\n"
    ),
    "PYTHONSTARTUP=startup.py python -c 'print(\"a script ran, and nothing else did\")'": (
        "a script ran, and nothing else did\n"
    ),
}
KNOWN_LANGUAGES = {"python", "sh", "console", "ini", "text"}
DOCKERFILE_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


# -- the pages' examples ---------------------------------------------------------------------


def pages() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if p.name not in OTHER_OWNERS)


def code_blocks(page: Path) -> list[tuple[str, str, int]]:
    """(language, text, line) of each fenced block that is not a MyST directive."""
    blocks = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^(`{3,}|~{3,})(.*)$", lines[i])
        if not match:
            i += 1
            continue
        fence, info = match.group(1), match.group(2).strip()
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        if not info.startswith("{"):
            blocks.append((info.split()[0] if info else "", "\n".join(body) + "\n", start + 1))
    return blocks


def all_blocks(language: str) -> list:
    return [
        pytest.param(text, id="%s:%d" % (page.name, line))
        for page in pages()
        for lang, text, line in code_blocks(page)
        if lang == language
    ]


def commands(text: str) -> list[str]:
    """The command lines of a sh block, trailing comments dropped."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def test_every_example_has_a_known_language() -> None:
    unknown = [
        "%s:%d %r" % (page.name, line, lang)
        for page in pages()
        for lang, _, line in code_blocks(page)
        if lang not in KNOWN_LANGUAGES
    ]
    assert not unknown, "code blocks this test does not know how to check: %s" % unknown


@pytest.mark.parametrize("code", all_blocks("python"))
def test_python_example_runs(code: str) -> None:
    proc = run([sys.executable, "-c", code], cwd=ROOT, timeout=60)
    assert proc.returncode == 0, explain(proc)


def runnable(block: Any) -> bool:
    """A sh block with a line that runs here (the others are all in NOT_RUN_HERE)."""
    return any(c not in NOT_RUN_HERE for c in commands(block.values[0]))


@pytest.mark.parametrize("block", [b for b in all_blocks("sh") if runnable(b)])
def test_shell_example_runs(block: str, tmp_path: Path) -> None:
    """The block's lines in order, in one directory, each in bash; see NOT_RUN_HERE."""
    todo = [c for c in commands(block) if c not in NOT_RUN_HERE]
    (tmp_path / "deploy").symlink_to(DEPLOY)  # the pages' paths are relative to the checkout
    env = {"PATH": "%s%s%s" % (BIN, os.pathsep, os.environ.get("PATH", ""))}
    for command in todo:
        proc = run(["bash", "-euo", "pipefail", "-c", command], env=env, cwd=tmp_path, timeout=60)
        assert proc.returncode == 0, command + "\n" + explain(proc)
        if command in EXPECTED_OUTPUT:
            assert proc.stdout == EXPECTED_OUTPUT[command], command + "\n" + explain(proc)


def test_commands_not_run_here_are_in_the_docs() -> None:
    """NOT_RUN_HERE lists only commands some page shows, so no reason outlives its command."""
    shown = {c for page in pages() for lang, text, _ in code_blocks(page) for c in commands(text)}
    assert set(NOT_RUN_HERE) <= shown, set(NOT_RUN_HERE) - shown


def test_console_blocks_are_recorded_runs() -> None:
    unknown = []
    for page in pages():
        for lang, text, line in code_blocks(page):
            if lang != "console":
                continue
            for command in text.splitlines():
                if command.startswith("$ "):
                    command = re.sub(r"\s+#.*$", "", command[2:]).strip()
                    if command not in RECORDED:
                        unknown.append("%s:%d %s" % (page.name, line, command))
    assert not unknown, "console commands neither run nor listed as recorded: %s" % unknown


@pytest.mark.parametrize(
    "command", [c for c, where in RECORDED.items() if where.startswith("docs/_data/")]
)
def test_recorded_soak_output_is_that_commands(command: str) -> None:
    """The header of a recorded output says what the command line asked for."""
    text = (ROOT / RECORDED[command]).read_text()
    args = shlex.split(command)
    duration = args[args.index("--duration") + 1]
    (header,) = [line for line in text.splitlines() if line.startswith("kong-pdk-fix soak:")]
    assert "%s s per run" % duration in header
    mix = args[args.index("--mix") + 1] if "--mix" in args else "noop,exit"
    assert "(--mix %s)" % mix in text
    runs = args[args.index("--run") + 1] if "--run" in args else "both"
    assert ("Run unpatched:" in text) == (runs in ("both", "unpatched"))
    assert ("Run patched:" in text) == (runs in ("both", "patched"))
    for option in ("--json", "--plot"):
        if option in args:
            assert "written to %s" % args[args.index(option) + 1] in text


def test_ini_snippets_use_kong_conf_keys() -> None:
    keys = set(kong_conf()) | {"nginx_main_env"}
    for page in pages():
        for lang, text, line in code_blocks(page):
            if lang == "ini":
                for key in parse_conf(text):
                    assert key in keys, "%s:%d: %s is not a key of deploy/kong.conf" % (
                        page.name,
                        line,
                        key,
                    )


def test_literalincludes_exist() -> None:
    for page in pages():
        for target in re.findall(r"^```\{literalinclude\} (\S+)", page.read_text(), re.M):
            if not target.startswith("_generated/"):  # written by the docs build
                assert (page.parent / target).is_file(), "%s: %s" % (page.name, target)


# -- deploy/Dockerfile -----------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending: list[str] = []
    for number, raw in enumerate((DEPLOY / "Dockerfile").read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # Docker drops comments inside continuations
            continue
        pending.append(line[:-1].rstrip() if line.endswith("\\") else line)
        if line.endswith("\\"):
            continue
        text = " ".join(p for p in pending if p)
        pending = []
        word, _, args = text.partition(" ")
        assert word in DOCKERFILE_INSTRUCTIONS, "Dockerfile line %d: %r" % (number, word)
        out.append((word, args.strip()))
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


def pip_install(instructions: list[tuple[str, str]]) -> tuple[str, list[str], list[str]]:
    """(the venv, the requirements, the options) of the RUN that installs the packages."""
    (command,) = [args for word, args in instructions if word == "RUN" and "pip install" in args]
    words = shlex.split(command.partition("pip install")[2].partition("&&")[0])
    venv = re.search(r"python3 -m venv (\S+)", command).group(1)
    options, requirements = [], []
    takes_value = {"--find-links", "-f", "--index-url", "-i"}
    it = iter(words)
    for word in it:
        if word.startswith("-"):
            options.append(word)
            if word in takes_value:
                options.append(next(it))
        else:
            requirements.append(word)
    return venv, requirements, options


def pins(requirements: list[str]) -> dict[str, str]:
    out = {}
    for requirement in requirements:
        name, sep, version = requirement.partition("==")
        assert sep, "not pinned: %s" % requirement
        out[name] = version
    return out


def test_dockerfile_syntax_and_base_image() -> None:
    instructions = dockerfile()
    assert instructions[0][0] == "FROM", "the first instruction must be FROM"
    image = instructions[0][1].split()[0]
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and "/" not in tag, "FROM must pin a tag: %s" % image
    assert instructions[-1] == ("USER", "kong"), "the image must end as Kong's own user"
    for word, args in instructions:
        if word == "RUN":
            proc = subprocess.run(["sh", "-n", "-c", args], capture_output=True, text=True)
            assert proc.returncode == 0, "RUN %s\n%s" % (args, proc.stderr)
        if word == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (DEPLOY / source).exists(), "COPY source missing from deploy/: %s" % source


def test_dockerfile_pins_and_check_step() -> None:
    instructions = dockerfile()
    venv, requirements, _ = pip_install(instructions)
    pinned = pins(requirements)
    assert pinned["kong-pdk-fix"] == kong_pdk_fix.__version__
    assert compat.version_problem(pinned["kong-pdk"]) is None, pinned
    runs = [args for word, args in instructions if word == "RUN"]
    installs = next(i for i, args in enumerate(runs) if "pip install" in args)
    checks = [i for i, args in enumerate(runs) if args == venv + "/bin/kong-pdk-fix check"]
    assert checks and checks[0] > installs, "RUN %s/bin/kong-pdk-fix check must follow" % venv


def test_dockerfile_makes_every_path_kong_conf_runs() -> None:
    instructions = dockerfile()
    venv, _, _ = pip_install(instructions)
    copied = [args.split()[-1].rstrip("/") for word, args in instructions if word == "COPY"]
    assert "/etc/kong/kong.conf" in copied
    for key, value in kong_conf().items():
        if key.endswith("_cmd"):
            for word in shlex.split(value):
                if word.startswith("/"):
                    made = word.startswith(venv + "/bin/") or any(
                        word == c or word.startswith(c + "/") for c in copied
                    )
                    assert made, "%s: the image has no %s" % (key, word)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("DOCS_INSTALL_DOCKERFILE") != "1",
    reason="installs the Dockerfile's packages into a new venv: the docs tox env does that",
)
def test_dockerfile_install_line_and_check(built_wheel: Path, tmp_path: Path) -> None:
    _, requirements, options = pip_install(dockerfile())
    venv = tmp_path / "kong-python"
    proc = run([sys.executable, "-m", "venv", venv], timeout=180)
    assert proc.returncode == 0, explain(proc)
    # The image's --find-links directory holds the wheel; here the wheel of this checkout.
    options = [
        str(built_wheel.parent) if previous in ("--find-links", "-f") else option
        for previous, option in zip([None, *options], options)
    ]
    pip = [venv / "bin" / "pip", "install", "--disable-pip-version-check", *options]
    proc = run([*pip, *requirements], timeout=600)
    assert proc.returncode == 0, explain(proc)
    proc = run([venv / "bin" / "kong-pdk-fix", "check"], timeout=180)
    assert proc.returncode == 0, explain(proc)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("OK: the fix is active (through the .pth and the wrapper)"), last


# -- deploy/kong.conf, the dedicated entrypoint, deploy/values.yaml ---------------------------


def parse_conf(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, "not a kong.conf line: %r" % line
            out[key.strip()] = value.strip()
    return out


def kong_conf() -> dict[str, str]:
    return parse_conf((DEPLOY / "kong.conf").read_text())


def local_command(command: str) -> list[str]:
    """A kong.conf command with the image's paths mapped onto this checkout and interpreter."""
    image_paths = {
        "/usr/local/kong/python-plugins": str(DEPLOY / "python-plugins"),
        "/usr/local/kong/dedicated": str(DEPLOY / "dedicated"),
    }
    venv, _, _ = pip_install(dockerfile())
    words = []
    for word in shlex.split(command):
        if word.startswith(venv + "/bin/"):
            word = str(BIN / word[len(venv) + len("/bin/") :])
        for image, here in image_paths.items():
            if word == image or word.startswith(image + "/"):
                word = here + word[len(image) :]
        words.append(word)
    return words


def servers() -> list[str]:
    return [n.strip() for n in kong_conf()["pluginserver_names"].split(",")]


def test_kong_conf_has_every_key_of_each_plugin_server() -> None:
    conf = kong_conf()
    expected = {
        "pluginserver_%s_%s" % (name.replace("-", "_"), part)
        for name in servers()
        for part in ("socket", "start_cmd", "query_cmd")
    }
    given = {key for key in conf if key.startswith("pluginserver_")} - {"pluginserver_names"}
    assert given == expected


def test_kong_conf_plugins_are_what_the_query_commands_report() -> None:
    conf = kong_conf()
    reported: list[str] = []
    for name in servers():
        key = "pluginserver_%s_query_cmd" % name.replace("-", "_")
        proc = run(local_command(conf[key]), timeout=60)
        assert proc.returncode == 0, explain(proc)
        reported += [info["Name"] for info in json.loads(proc.stdout)]
    assert len(reported) == len(set(reported)), "a plugin served twice: %s" % reported
    listed = [p.strip() for p in conf["plugins"].split(",") if p.strip() != "bundled"]
    assert sorted(listed) == sorted(reported)


def wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the plugin server exited with %s" % proc.returncode
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise AssertionError("nothing listens on %s" % path)


@pytest.mark.parametrize("name", servers())
def test_kong_conf_start_command_serves_a_patched_server(name: str, tmp_path: Path) -> None:
    """Started as Kong starts it (with -p for Kong's prefix), on the socket kong.conf names."""
    conf = kong_conf()
    key = "pluginserver_%s_" % name.replace("-", "_")
    socket_path = Path(conf[key + "socket"])
    assert socket_path.parent == Path("/usr/local/kong"), "the socket must be in Kong's prefix"
    command = local_command(conf[key + "start_cmd"]) + ["-p", str(tmp_path)]
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env()
    )
    try:
        wait_for_socket(tmp_path / socket_path.name, proc)
        with Kong(str(tmp_path / socket_path.name), read_timeout=10) as kong:
            status = kong.call("plugin.GetStatus", None)
        assert "KongPdkFix" in status, "%s runs unpatched: %s" % (name, status)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_dedicated_entrypoint_imports_the_fix_first() -> None:
    first = (DEPLOY / "dedicated" / "hello_dedicated.py").read_text().splitlines()[0]
    assert first.split("#")[0].strip() == "import kong_pdk_fix"


def simple_yaml(text: str) -> dict:
    """The subset values.yaml uses: nested mappings of scalars, two-space indents."""
    root: dict = {}
    stack = [(-1, root)]
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        key, sep, value = line.strip().partition(":")
        assert sep, "not a mapping line: %r" % line
        while stack[-1][0] >= indent:
            stack.pop()
        value = value.strip()
        if value:
            if value[0] in "\"'" and value[-1] == value[0]:
                value = value[1:-1]
            stack[-1][1][key] = value
        else:
            stack[-1][1][key] = {}
            stack.append((indent, stack[-1][1][key]))
    return root


def test_helm_values_say_what_kong_conf_says() -> None:
    text = (DEPLOY / "values.yaml").read_text()
    values = simple_yaml(text)
    try:
        import yaml  # only to check the subset parser when PyYAML happens to be there
    except ImportError:
        pass
    else:
        assert yaml.safe_load(text) == values
    conf = {k: v for k, v in kong_conf().items() if not k.startswith("nginx_")}
    assert values["env"] == conf
    assert values["image"]["tag"]
