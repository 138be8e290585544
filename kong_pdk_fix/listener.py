"""One Kong connection: read a request, check it, call the PluginServer method, write the reply.

Replaces upstream's connection handler (`kong_pdk.listener.Server.handle`, run by its
threading or gevent socket server for each connection Kong opens). Upstream's handler dies on
the first message it cannot unpack or split into four (a non-UTF-8 `str`, which Kong sends,
included), calls any PluginServer attribute a method name spells, formats two debug lines per
call even when they are not printed, and may write half a reply (`send`, not `sendall`).

Here:
- `str` is decoded with surrogateescape, so bytes that are not UTF-8 reach the plugin and go
  back to Kong unchanged;
- a stream that cannot be resynchronised (not MessagePack, truncated, over max_message_size)
  is closed with one log line saying why; a well-framed message that is not a valid request
  gets an error reply and the connection goes on;
- only Kong's methods can be called, with their parameters checked first;
- the first reply on a connection is preceded by the `serverPid` notification, so a Kong
  worker that still holds instance ids from an earlier server process forgets them
  (KONG_PROTOCOL.md, "Framing").
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Dict, Optional, Tuple

import msgpack
from kong_pdk.exception import PDKException, PluginServerException

from . import compat, config

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
READ_SIZE = 65536


def _kong_name(python_name: str) -> str:
    return "".join(part.capitalize() for part in python_name.split("_"))


# Kong's method names (after "plugin.") -> the PluginServer method that serves each.
METHODS: Dict[str, str] = {
    _kong_name(name): name
    for name in (
        "get_status",
        "get_plugin_info",
        "start_instance",
        "instance_status",
        "close_instance",
        "handle_event",
        compat.ERROR_STEP_METHOD,
    )
    + compat.STEP_METHODS
}

# What the one parameter of each method must be: a type, or a map with these typed keys.
_EVENT_KEYS = {"InstanceId": int, "EventName": str}
_STEP_KEYS = {"EventId": int}
PARAMS: Dict[str, Any] = {
    "GetPluginInfo": str,
    "StartInstance": {"Name": str, "Config": str},
    "InstanceStatus": int,
    "CloseInstance": int,
    "HandleEvent": _EVENT_KEYS,
}
STEP_NAMES = frozenset(kong for kong, name in METHODS.items() if name.startswith("step"))
PARAMS.update((kong, _STEP_KEYS) for kong in STEP_NAMES)


class BadRequest(Exception):
    """A well-framed message that is not a request this server serves: an error reply."""


class BadStream(Exception):
    """The byte stream cannot be read on from here: the connection is closed."""


def check_request(message: Any) -> Tuple[int, str, list]:
    """(msgid, Kong method name, params) of a request; BadRequest names what is wrong.
    A message with no usable msgid cannot be answered: BadStream."""
    if not isinstance(message, list) or len(message) < 2 or not isinstance(message[1], int):
        raise BadStream("not a MessagePack-RPC request (no msgid): %s" % _short(message))
    if len(message) != 4 or message[0] != REQUEST:
        raise BadRequest("not a request [0, msgid, method, params]: %s" % _short(message))
    _, msgid, method, params = message
    if not isinstance(method, str) or not isinstance(params, list):
        raise BadRequest("method must be a str and params an array: %s" % _short(message))
    namespace, _, name = method.partition(".")
    if namespace != "plugin":
        raise BadRequest("RPC for %s is not supported" % namespace)  # upstream's text
    if name not in METHODS:
        raise BadRequest("unknown method %s" % method)
    expected = PARAMS.get(name)
    if expected is not None and not _params_match(params, expected):
        raise BadRequest("%s expects %s, got %s" % (method, _describe(expected), _short(params)))
    return msgid, name, params


def _params_match(params: list, expected: Any) -> bool:
    if len(params) != 1:
        return False
    (param,) = params
    if not isinstance(expected, dict):
        return isinstance(param, expected)
    if not isinstance(param, dict):
        return False
    for key, kind in expected.items():
        if not isinstance(param.get(key), kind):
            return False
    return True


def _describe(expected: Any) -> str:
    if isinstance(expected, dict):
        keys = ", ".join("%s (%s)" % (key, kind.__name__) for key, kind in expected.items())
        return "one map with " + keys
    return "one %s" % expected.__name__


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# What a worker leaves in KongConnection.returned when Kong closed the connection.
EOF = object()
# No message read ahead (serve's `message`).
NOTHING = object()


class KongConnection:
    """One Kong connection: its reader and writer, and who holds it. The listener thread (or
    greenlet) serving it lends it to an event's worker from a HandleEvent or Step until the
    worker gives it back (engine.py); only the holder reads or writes it."""

    def __init__(self, sock: Any, logger: Any, returned: Any) -> None:
        self.sock = sock
        self.logger = logger
        self.debug = _debug_enabled(logger)
        self.max_message_size = config.current().max_message_size
        self.unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=False,
            unicode_errors="surrogateescape",
            max_buffer_size=self.max_message_size,
        )
        self.packer = msgpack.Packer(unicode_errors="surrogateescape")
        # Bytes fed to the unpacker, and up to the end of the last whole message (the
        # unpacker's own tell() also counts a message it has only begun to parse).
        self.fed = self.consumed = 0
        self.pid_sent = False
        self.owed = 0  # msgid of the request read last: the next reply answers it
        self.holder: Any = None  # the event whose worker holds it (guarded by the engine lock)
        # The worker gives it back through this one-slot mailbox with None (read on), a
        # message it read that is not for its event, EOF or a BadStream.
        self.returned = returned

    def read(self) -> Any:
        """The next message; EOF when Kong closed the connection between messages."""
        while True:
            if self.fed != self.consumed:  # bytes buffered: maybe a whole message
                try:
                    message = self.unpacker.unpack()
                except msgpack.OutOfData:
                    pass
                except (
                    ValueError,
                    TypeError,
                ) as ex:  # FormatError, StackError, limits, unhashable key
                    raise BadStream(
                        "not MessagePack (%s) at byte %d"
                        % (str(ex) or type(ex).__name__, self.consumed)
                    ) from None
                else:
                    self.consumed = self.unpacker.tell()
                    return message
            try:
                data = self.sock.recv(READ_SIZE)
            except OSError:  # reset by Kong: the same as a close
                data = b""
            if not data:
                pending = self.fed - self.consumed
                if pending:
                    raise BadStream("truncated message: closed after %d bytes of it" % pending)
                return EOF
            try:
                self.unpacker.feed(data)
            except msgpack.BufferFull:
                raise BadStream(
                    "message larger than max_message_size (%d bytes)" % self.max_message_size
                ) from None
            self.fed += len(data)

    def read_quietly(self) -> Any:
        """read(), with a BadStream returned instead of raised (for a worker to hand on)."""
        try:
            return self.read()
        except BadStream as ex:
            return ex

    def log_request(self, msgid: int, name: str, params: list) -> None:
        if self.debug:
            self.logger.debug("rpc: #%d method: plugin.%s args: %s" % (msgid, name, params))

    def reply(self, msgid: int, error: Optional[str], result: Any) -> None:
        if self.debug:
            self.logger.debug("rpc: #%d return: %s" % (msgid, error or result))
        try:
            payload = self.packer.pack([RESPONSE, msgid, error, result])
        except Exception as ex:  # a result MessagePack cannot carry
            payload = self.packer.pack([RESPONSE, msgid, "reply cannot be packed: %s" % ex, None])
        if not self.pid_sent:
            self.pid_sent = True
            payload = self.packer.pack([NOTIFICATION, "serverPid", os.getpid()]) + payload
        try:
            self.sock.sendall(payload)
        except OSError as ex:  # Kong went away; its next read on this connection sees EOF
            self.logger.info("kong-pdk-fix: reply #%d not delivered: %s" % (msgid, ex))


def serve(server: Any, engine: Any, sock: Any) -> None:
    """Serve Kong's requests on `sock` until Kong closes it or its stream is unreadable."""
    conn = KongConnection(sock, server.logger, engine.backend.mailbox())
    message: Any = NOTHING
    try:
        while True:
            if message is NOTHING:
                message = conn.read()
            if message is EOF:
                return
            if isinstance(message, BadStream):
                raise message
            request: Any = message
            message = NOTHING
            try:
                msgid, name, params = check_request(request)
            except BadRequest as ex:
                server.logger.warn("kong-pdk-fix: bad request: %s" % ex)
                conn.reply(request[1], "bad request: %s" % ex, None)
                continue
            conn.owed = msgid
            conn.log_request(msgid, name, params)
            if name == "HandleEvent" or name in STEP_NAMES:
                try:
                    if name == "HandleEvent":
                        engine.handle_event(params[0], conn)
                    else:
                        engine.step(params[0], conn, is_error=name == "StepError")
                except Exception as ex:
                    conn.reply(msgid, *_failed(server.logger, msgid, name, ex))
                    continue
                # The event's worker answers and may read on; it gives back what it read.
                returned = engine.wait_for_return(conn)
                if returned is not None:
                    message = returned
                continue
            try:
                result = getattr(server, METHODS[name])(*params)
            except Exception as ex:
                conn.reply(msgid, *_failed(server.logger, msgid, name, ex))
                continue
            conn.reply(msgid, None, result)
    except BadStream as ex:
        server.logger.error("kong-pdk-fix: closing connection: %s" % ex)


def _failed(logger: Any, msgid: int, name: str, ex: Exception) -> Tuple[str, None]:
    """The error reply for a call that raised, logged as upstream's listener logs it."""
    if isinstance(ex, (PluginServerException, PDKException)):
        logger.warn("rpc: #%d error: %s" % (msgid, ex))
        return str(ex), None
    logger.error("rpc: #%d exception: %s" % (msgid, traceback.format_exc()))
    return "plugin.%s failed: %s: %s" % (name, type(ex).__name__, ex), None


def _debug_enabled(logger: Any) -> bool:
    # kong-pdk's Logger.set_level replaces the methods below the level with `dummy`.
    return getattr(logger.debug, "__name__", "") != "dummy"
