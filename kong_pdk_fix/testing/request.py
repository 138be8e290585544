"""The request a test runs a phase for: what Kong's PDK answers about it.

A ``Request`` turns into a ``ScriptedPDK`` (``kong_pdk_fix.kongsim``) answering the getters a
plugin calls (headers, query, body, consumer, route, service, ``kong.ctx.shared``) the way Kong
would, including how Kong packs them (header and query maps of arrays, raw bodies as bytes:
KONG_PROTOCOL.md "Framing"). Every other PDK call answers nil unless ``answers`` says otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union
from urllib.parse import urlencode

from ..kongsim import ScriptedPDK
from ..kongsim.pdk import answered_in_log_phase

# A header or query value as Kong gives it: a string, a list of them, or True (a flag
# with no value, e.g. ``?debug``).
Value = Union[str, list[str], bool]


@dataclass
class Request:
    """One request as Kong sees it; pass it to ``EmulatedKong.run``.

    ``headers`` and ``query`` map names to a string, a list of strings or ``True``; header
    names are matched as Kong does (case does not matter, ``_`` stands for ``-``). ``body`` is
    the raw body (``str`` or ``bytes``); ``kong.request.get_body`` answers it parsed when it
    is JSON. ``consumer``, ``credential``, ``route`` and ``service`` are the entities Kong
    would answer (``None``: nil). ``shared`` is ``kong.ctx.shared``: ``kong.ctx.shared.set``
    writes into it, so running access then log with the same ``Request`` carries values
    across phases as Kong does. ``response_status`` and ``response_headers`` answer
    ``kong.response.get_status`` / ``get_header(s)`` (response and log phases).

    ``answers`` maps any PDK method to an answer, and wins over everything above: a value, a
    callable given the call's arguments, a ``LuaError`` (the Lua method raises: Kong sends
    nothing more for the event) or ``STALL`` (Kong goes silent).
    """

    headers: Mapping[str, Value] = field(default_factory=dict)
    query: Mapping[str, Value] = field(default_factory=dict)
    body: str | bytes = b""
    method: str = "GET"
    scheme: str = "http"
    host: str = "localhost"
    port: int = 8000
    path: str = "/"
    client_ip: str = "127.0.0.1"
    consumer: dict[str, Any] | None = None
    credential: dict[str, Any] | None = None
    route: dict[str, Any] | None = None
    service: dict[str, Any] | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    response_status: int = 200
    response_headers: Mapping[str, Value] = field(default_factory=dict)
    answers: Mapping[str, Any] = field(default_factory=dict)

    def pdk(self, phase: str) -> ScriptedPDK:
        """The scripted PDK for one event of ``phase``.

        In the log phase only the calls Kong's log timer answers are available; the others
        raise in Lua, as in Kong (KONG_PROTOCOL.md "The log phase").
        """
        answers = dict(self._answers())
        answers.update(self.answers)
        allowed = answered_in_log_phase if phase == "log" else None
        return ScriptedPDK(answers, allowed=allowed)

    def _answers(self) -> dict[str, Any]:
        headers = _lowered(self.headers)
        response_headers = _lowered(self.response_headers)
        raw = (
            self.body.encode("utf-8", "surrogateescape")
            if isinstance(self.body, str)
            else self.body
        )
        raw_query = urlencode(
            [(k, v) for k, vs in self.query.items() for v in _values(vs)], safe="/"
        )
        return {
            "kong.request.get_header": lambda name, *_: _first(headers.get(_header_key(name))),
            "kong.request.get_headers": lambda *_: headers,
            "kong.request.get_query": lambda *_: dict(self.query),
            "kong.request.get_query_arg": lambda name, *_: _first(self.query.get(name)),
            "kong.request.get_raw_query": raw_query,
            "kong.request.get_raw_body": raw,
            "kong.request.get_body": lambda *_: _parsed(raw),
            "kong.request.get_method": self.method,
            "kong.request.get_scheme": self.scheme,
            "kong.request.get_host": self.host,
            "kong.request.get_port": self.port,
            "kong.request.get_path": self.path,
            "kong.request.get_path_with_query": self.path + ("?" + raw_query if raw_query else ""),
            "kong.client.get_ip": self.client_ip,
            "kong.client.get_forwarded_ip": self.client_ip,
            "kong.client.get_consumer": self.consumer,
            "kong.client.get_credential": self.credential,
            "kong.router.get_route": self.route,
            "kong.router.get_service": self.service,
            "kong.ctx.shared.get": lambda key, *_: self.shared.get(key),
            "kong.ctx.shared.set": self.shared.__setitem__,
            "kong.response.get_status": self.response_status,
            "kong.response.get_header": lambda name, *_: _first(
                response_headers.get(_header_key(name))
            ),
            "kong.response.get_headers": lambda *_: response_headers,
            "kong.log.serialize": lambda *_: json.dumps(self._serialized(headers, raw_query)),
        }

    def _serialized(self, headers: dict[str, Value], raw_query: str) -> dict[str, Any]:
        # The fields of Kong's basic serializer (kong/pdk/log.lua) a log plugin usually reads.
        entry: dict[str, Any] = {
            "request": {
                "method": self.method,
                "uri": self.path + ("?" + raw_query if raw_query else ""),
                "url": "%s://%s:%d%s" % (self.scheme, self.host, self.port, self.path),
                "headers": headers,
                "querystring": dict(self.query),
            },
            "response": {
                "status": self.response_status,
                "headers": _lowered(self.response_headers),
            },
            "client_ip": self.client_ip,
        }
        for name in ("consumer", "route", "service"):
            if getattr(self, name) is not None:
                entry[name] = getattr(self, name)
        return entry


def _header_key(name: str) -> str:
    return name.lower().replace("_", "-")


def _lowered(headers: Mapping[str, Value]) -> dict[str, Value]:
    return {_header_key(k): v for k, v in headers.items()}


def _values(value: Value) -> list[str]:
    if value is True:
        return [""]
    if value is False:
        return []
    return [value] if isinstance(value, str) else list(value)


def _first(value: Value | None) -> Any:
    # Kong's single getters answer the first of repeated values; True stays True.
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _parsed(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return (None, "unsupported content type")
