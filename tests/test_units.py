"""Pure logic: settings, version checks, the wrapper's argument split."""

from __future__ import annotations

import os

import pytest

from kong_pdk_fix import cli, compat, config
from kong_pdk_fix.backends import STOP, ThreadBackend, WorkerPool


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch):
    for name in list(os.environ):
        if name.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)
    config.reset()
    yield
    config.reset()


def test_defaults_follow_kongs_timeouts():
    settings = config.current()
    assert settings.event_ttl == 60.0  # nginx's read timeout: Kong's last chance to Step
    assert settings.handler_timeout < 60.0  # answer before Kong drops the connection
    assert settings.on_error == "fail-open"


def test_environment_then_configure_win_in_order(monkeypatch):
    monkeypatch.setenv("KONG_PDK_FIX_EVENT_TTL", "5")
    monkeypatch.setenv("KONG_PDK_FIX_MAX_WORKERS", "7")
    config.reset()
    assert config.current().event_ttl == 5.0
    assert config.configure(event_ttl=2).event_ttl == 2.0
    assert config.current().max_workers == 7
    assert config.configure(max_workers="3").max_workers == 3


def test_a_bad_variable_is_ignored_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("KONG_PDK_FIX_EVENT_TTL", "banana")
    monkeypatch.setenv("KONG_PDK_FIX_ON_ERROR", "explode")
    config.reset()
    settings = config.current()
    assert settings.event_ttl == 60.0 and settings.on_error == "fail-open"
    assert "KONG_PDK_FIX_EVENT_TTL" in caplog.text and "KONG_PDK_FIX_ON_ERROR" in caplog.text


@pytest.mark.parametrize(
    "bad",
    [
        {"event_ttl": 0},
        {"max_workers": 0},
        {"on_error": "maybe"},
        {"handler_timeout": "soon"},
        {"colour": "blue"},
    ],
)
def test_configure_refuses_bad_values(bad):
    with pytest.raises((TypeError, ValueError)):
        config.configure(**bad)
    assert config.current() == config.Settings()


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_the_kill_switch(value):
    assert config.disabled({"KONG_PDK_FIX_DISABLE": value})


def test_the_kill_switch_is_off_by_default():
    assert not config.disabled({}) and not config.disabled({"KONG_PDK_FIX_DISABLE": "0"})


@pytest.mark.parametrize(
    "version,ok",
    [
        ("0.32", False),
        ("0.33", True),
        ("0.36", True),
        ("0.36.post1", True),
        ("0.37", False),
        ("1.0", False),
        (None, False),
    ],
)
def test_supported_versions(version, ok):
    assert (compat.version_problem(version) is None) == ok


def test_the_installed_kong_pdk_has_the_expected_shape():
    import kong_pdk.server

    assert compat.shape_problem(kong_pdk.server) is None


def test_the_wrapper_splits_its_flags_from_upstreams():
    settings, rest = cli.split_args(
        ["-d", "/plugins", "--event-ttl", "3", "-g", "--on-error=fail-closed", "--dump-all-plugins"]
    )
    assert settings == {"event_ttl": 3.0, "on_error": "fail-closed"}
    assert rest == ["-d", "/plugins", "-g", "--dump-all-plugins"]


def test_a_worker_that_cannot_start_gives_back_its_slot_and_fds():
    """Thread or fd exhaustion is when the pool matters most: a failed start must not shrink
    it for good (found by review; the pool of c09f7db kept the slot and both pipe fds)."""

    class Exhausted(ThreadBackend):
        fail = True

        def spawn(self, fn, name):
            if self.fail:
                self.fail = False
                raise RuntimeError("can't start new thread")
            return super().spawn(fn, name)

    pool = WorkerPool(lambda worker, job: None, 1, Exhausted())
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError):
        pool.acquire(timeout=0.1)
    assert len(os.listdir("/proc/self/fd")) == fds
    worker = pool.acquire(timeout=0.1)  # the one slot is still there
    assert worker is not None
    worker.inbox.put(STOP)
