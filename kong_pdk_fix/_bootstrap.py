"""What the wheel's kong_pdk_fix.pth (and .start) runs at every interpreter start, and what
`import kong_pdk_fix` runs: register a post-import hook that patches kong_pdk.server when it
is imported. It never raises and never imports kong_pdk itself, so interpreters that never
use kong-pdk pay only for importing wrapt. In a venv the .pth runs twice (CPython issue
75723); registering twice is harmless because install() is idempotent.
"""

from __future__ import annotations

import logging

log = logging.getLogger("kong_pdk_fix")

TARGET = "kong_pdk.server"
_registered = False


def activate() -> None:
    global _registered
    try:
        from .config import disabled

        if _registered or disabled():
            return
        import wrapt

        wrapt.register_post_import_hook(_on_import, TARGET)
        _registered = True
    except BaseException as ex:  # noqa: B036 - start-up code must never stop the interpreter
        _report(ex)


def _on_import(module: object) -> None:
    # A hook that raises breaks the import of kong_pdk.server (wrapt docs, "Pitfalls").
    try:
        from .patch import install

        install()
    except BaseException as ex:  # noqa: B036
        _report(ex)


def _report(ex: BaseException) -> None:
    try:
        log.warning("kong-pdk-fix: not activated: %r", ex)
    except BaseException:  # noqa: B036, S110 - logging itself may be half torn down
        pass
