"""The pytest plugin (entry point ``pytest11``, name ``kong_pdk_fix``): fixtures that run your
plugins in a real plugin server under an emulated Kong.

- ``kong_plugin_server``: a factory, ``kong_plugin_server(plugins, mode="thread", **options)``
  returns a started ``EmulatedKong``; every server it started is stopped after the test.
- ``kong``: an ``EmulatedKong`` for the plugins named by the test's
  ``@pytest.mark.kong_plugins(path, **options)`` marker, in ``kong_mode`` (a ``mode`` option
  of the marker wins).
- ``kong_mode``: ``"thread"``; parametrize it (``@pytest.mark.parametrize("kong_mode",
  MODES)``) or override it to run the same tests in ``gevent`` or ``process`` mode.

Relative plugin paths are read from the test file's directory. Nothing starts unless a test
asks for these fixtures, and this module imports only pytest when it is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Callable, Union

import pytest

if TYPE_CHECKING:
    from . import EmulatedKong

MARKER = "kong_plugins"
PluginPaths = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(path, **options): the plugin file(s) or directory the `kong` fixture serves; "
        "options as for kong_pdk_fix.testing.EmulatedKong (mode, patched, env, ...)",
    )


@pytest.fixture
def kong_mode() -> str:
    """The plugin server's mode for the ``kong`` fixture: ``thread``, ``gevent`` or
    ``process``."""
    return "thread"


@pytest.fixture
def kong_plugin_server(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., EmulatedKong]]:
    """A factory: ``kong_plugin_server(plugins, mode="thread", **options)`` starts a plugin
    server for ``plugins`` (paths relative to the test file) and returns its
    ``EmulatedKong``. Servers are stopped after the test; on failure their log is shown."""
    from . import EmulatedKong

    started: list[EmulatedKong] = []
    here = os.path.dirname(str(request.path))

    def start(plugins: PluginPaths, *, mode: str = "thread", **options: Any) -> EmulatedKong:
        paths = [plugins] if isinstance(plugins, (str, os.PathLike)) else list(plugins)
        kong = EmulatedKong([os.path.join(here, p) for p in paths], mode=mode, **options)
        started.append(kong)  # before start(): a server that fails half-way is cleaned up
        return kong.start()

    yield start
    for kong in started:
        kong.close()
        output = kong.output()
        if output:
            # Shown in the report of a failed test only, as captured output is.
            request.node.add_report_section("teardown", f"plugin server ({kong.mode})", output)


@pytest.fixture
def kong(
    request: pytest.FixtureRequest,
    kong_plugin_server: Callable[..., EmulatedKong],
    kong_mode: str,
) -> EmulatedKong:
    """An ``EmulatedKong`` serving the plugins of the closest ``kong_plugins`` marker."""
    marker = request.node.get_closest_marker(MARKER)
    if marker is None or not marker.args:
        pytest.fail(
            f"the `kong` fixture needs @pytest.mark.{MARKER}(path) on the test, its class or "
            "its module (pytestmark)",
            pytrace=False,
        )
    options = dict(marker.kwargs)
    options.setdefault("mode", kong_mode)
    plugins = marker.args[0] if len(marker.args) == 1 else list(marker.args)
    return kong_plugin_server(plugins, **options)
