"""kong-pdk-fix: makes kong-pdk's Python plugin server end every Kong event, in constant
memory, without forking it.

`import kong_pdk_fix` is enough: it registers a post-import hook that patches
`kong_pdk.server` as soon as it is (or if it already was) imported. KONG_PDK_FIX_DISABLE=1
turns every activation off.

PYTEST_DONT_REWRITE: the wheel's .pth imports this package at interpreter start, before pytest
loads the package's pytest plugin (kong_pdk_fix.testing.plugin); without this marker pytest
warns that it cannot rewrite an already imported package, an error under `-W error`.
"""

from __future__ import annotations

from typing import Any, Dict

from ._bootstrap import activate
from .config import Settings, configure
from .patch import install, is_installed, uninstall

__version__ = "0.1.0"
__all__ = ["install", "uninstall", "is_installed", "configure", "stats", "Settings", "__version__"]


def stats() -> Dict[str, Any]:
    """Live events by state, workers busy/idle/stuck, events started and ended by cause.

    Empty until a patched plugin server in this process has served its first event."""
    if not is_installed():
        return {}
    from .engine import all_stats

    return all_stats()


activate()
