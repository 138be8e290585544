"""Shared test set-up: the report header, and a built wheel installed in a venv of its own.

`pip install -e .` installs no kong_pdk_fix.pth, so whatever tests start-up activation runs in
subprocesses of a venv that has the real wheel in it (tests/test_activation.py).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV_PREFIX = "KONG_PDK_FIX_"
# Variables of the test run that would change what a child interpreter does at start-up.
UNSET_IN_CHILDREN = ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONNOUSERSITE")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def pytest_report_header(config: pytest.Config) -> str:
    # find_spec of a top-level package does not run it: no hook is registered here.
    spec = importlib.util.find_spec("kong_pdk_fix")
    where = spec.origin if spec is not None else "not importable"
    return f"kong-pdk {_version('kong-pdk')}, wrapt {_version('wrapt')}, kong_pdk_fix from {where}"


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test run's environment without any KONG_PDK_FIX_* setting, plus `extra`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(ENV_PREFIX) and key not in UNSET_IN_CHILDREN
    }
    env.update(extra or {})
    return env


def run(
    args: Sequence[object],
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args],
        check=False,
        env=child_env(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@dataclass(frozen=True)
class Venv:
    """A venv with the built wheel and the kong-pdk of this test run installed in it."""

    root: Path
    python: Path
    purelib: Path

    def script(self, name: str) -> Path:
        return self.root / "bin" / name

    def python_c(
        self,
        code: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        isolated: bool = False,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        """Run `python -c code args`. isolated: with -S and site-packages on PYTHONPATH, so
        everything is importable but no .pth file runs: only `code` can activate the shim."""
        return self.run_python(["-c", code, *args], env=env, isolated=isolated, timeout=timeout)

    def run_python(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        isolated: bool = False,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        return run(
            [self.python, *self.python_args(isolated), *args],
            env=self.python_env(env, isolated),
            timeout=timeout,
        )

    @staticmethod
    def python_args(isolated: bool) -> list[str]:
        return ["-S"] if isolated else []

    def python_env(self, extra: Mapping[str, str] | None, isolated: bool) -> dict[str, str]:
        env = dict(extra or {})
        if isolated:
            env["PYTHONPATH"] = str(self.purelib)
        return env


def _copy_source(destination: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git",
        ".tox",
        ".ci-venv",
        ".venv",
        "venv",
        "build",
        "dist",
        "*.egg-info",
        "__pycache__",
        ".*_cache",
        ".hypothesis",
        ".bench-venvs",
    )
    shutil.copytree(ROOT, destination, ignore=ignore)
    return destination


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel tox installed into this env (TOX_PACKAGE), else one built from this checkout."""
    for candidate in os.environ.get("TOX_PACKAGE", "").split(os.pathsep):
        if candidate.endswith(".whl") and Path(candidate).is_file():
            return Path(candidate)
    work = tmp_path_factory.mktemp("wheel")
    # Built from a copy: an in-tree build leaves build/ and *.egg-info behind, and a stale
    # build/lib can slip removed modules into the wheel.
    source = _copy_source(work / "src")
    proc = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist", source],
        timeout=300,
    )
    assert proc.returncode == 0, "building the wheel failed\n" + explain(proc)
    (wheel,) = (work / "dist").glob("kong_pdk_fix-*.whl")
    return wheel


@pytest.fixture(scope="session")
def wheel_venv(built_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """One venv per session: the built wheel, with this run's kong-pdk and wrapt pinned."""
    root = tmp_path_factory.mktemp("venv") / "v"
    proc = run([sys.executable, "-m", "venv", root], timeout=180)
    assert proc.returncode == 0, "creating the venv failed\n" + explain(proc)
    python = root / "bin" / "python"
    pins = []
    for distribution in ("kong-pdk", "wrapt"):
        version = _version(distribution)
        if version != "not installed":
            pins.append(f"{distribution}=={version}")
    proc = run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", built_wheel, *pins],
        timeout=600,
    )
    assert proc.returncode == 0, "installing the wheel failed\n" + explain(proc)
    # Without -S: before 3.11 only site.py points sys.prefix at the venv.
    proc = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    assert proc.returncode == 0, explain(proc)
    return Venv(root=root, python=python, purelib=Path(proc.stdout.strip()))
