"""Command-line entry points.

`kong-python-pluginserver-fixed`: a drop-in for upstream's `kong-python-pluginserver` (every
upstream flag, including `--dump-all-plugins` for Kong's query command) plus the shim's own
settings as flags, which unlike environment variables survive nginx clearing the environment.

`kong-pdk-fix`: the diagnostics, `check` (is the fix active here, does it hold) and `soak`.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import config
from .patch import install

# The shim's own flags; everything else on the command line is upstream's.
_FLAGS = (
    ("--event-ttl", "event_ttl", "seconds an event may wait for Kong's Step before it is reaped"),
    (
        "--handler-timeout",
        "handler_timeout",
        "seconds a handler may run before the waiting Kong call gets an error reply",
    ),
    ("--max-workers", "max_workers", "most handlers running at once"),
    (
        "--max-message-size",
        "max_message_size",
        "bytes; a larger message from Kong closes its connection",
    ),
    (
        "--overload-timeout",
        "overload_timeout",
        "seconds a HandleEvent waits for a free worker before answering 'overloaded'",
    ),
    ("--on-error", "on_error", "what Kong is told when a handler raises: fail-open or fail-closed"),
    ("--fix-log-level", "log_level", "kong-pdk-fix's own log level"),
)


def _shim_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    for flag, dest, text in _FLAGS:
        parser.add_argument(flag, dest=dest, help=text)
    return parser


def split_args(argv: List[str]) -> "tuple[dict, List[str]]":
    """(the shim's settings given as flags, the remaining upstream arguments)."""
    known, rest = _shim_parser().parse_known_args(argv)
    given = {k: v for k, v in vars(known).items() if v is not None}
    return config.coerce(given), rest


def pluginserver_main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print("kong-pdk-fix options (besides kong-python-pluginserver's, listed below):")
        for flag, _, text in _FLAGS:
            print("  %-20s %s" % (flag + " VALUE", text))
        print()
    try:
        settings, rest = split_args(argv)
        if settings:
            config.configure(**settings)
    except (TypeError, ValueError) as ex:
        sys.exit("kong-python-pluginserver-fixed: %s" % ex)
    install()  # a refusal is logged; the server then runs as upstream's

    from kong_pdk.cli import start_server

    sys.argv = [sys.argv[0]] + rest  # upstream's argparse reads sys.argv
    start_server()


def main(argv: Optional[List[str]] = None) -> int:
    """`kong-pdk-fix check` and `kong-pdk-fix soak`."""
    from . import __version__, check, soak

    parser = argparse.ArgumentParser(
        prog="kong-pdk-fix",
        description="Diagnostics for kong-pdk-fix, run against the installed "
        "kong-python-pluginserver through an emulated Kong.",
    )
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name, module in (("check", check), ("soak", soak)):
        sub = commands.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
    options = parser.parse_args(argv)
    return int(options.func(options))
