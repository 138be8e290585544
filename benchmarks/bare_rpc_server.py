"""The floor for benchmarks/perf.py: a bare MessagePack-RPC server on Kong's unix socket.

It speaks Kong's plugin protocol (KONG_PROTOCOL.md "Framing", "Methods Kong calls") with no
plugin machinery at all: no plugin code, no threads or queues per event, no PDK. Each
connection gets a thread, as kong-pdk's threading listener does, and that thread answers
HandleEvent and every Step itself. For the benchmark plugins it sends the same messages the
real plugin would (the same PDK calls, then "ret"; the 20 ms blocking I/O is a sleep in the
connection thread), so a run against it costs the wire and the Kong emulator only: what is
left of a patched or upstream run's time on top of this is the plugin server's own.

It takes kong-python-pluginserver's flags (-p, -d, --socket-name, --dump-all-plugins) and
ignores the rest (-g, -m, -v, --no-lua-style), so kongsim's PluginServerProcess can start it
as `command`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socketserver
import sys
import threading
import time

import msgpack

# The first PDK call of the benchmark plugins (benchmarks/plugins/*.py), as kong-pdk sends it.
GET_HOST = {"Method": "kong.request.get_header", "Args": ["host"]}
PDK5 = [
    GET_HOST,
    {"Method": "kong.request.get_method", "Args": []},
    {"Method": "kong.request.get_path", "Args": []},
    {"Method": "kong.request.get_header", "Args": ["x-request-id"]},
    {"Method": "kong.response.set_header", "Args": ["x-bench", "1"]},
]
BLOCKING_IO = 0.02  # seconds, as in io_then_pdk.py and pdk_then_sleep.py

# plugin name -> the replies of one event, in order: (seconds to block first, Data).
SCRIPTS = {
    "noop": [(0.0, "ret")],
    "pdk5": [(0.0, call) for call in PDK5] + [(0.0, "ret")],
    "io_then_pdk": [(BLOCKING_IO, GET_HOST), (0.0, "ret")],
    "pdk_then_sleep": [(0.0, GET_HOST), (BLOCKING_IO, "ret")],
}
ANY_OTHER = [(0.0, "ret")]
PHASES = ["access"]


class Plugins:
    """Instances and events, as little as the protocol needs. An event may move between
    connections (KONG_PROTOCOL.md), so its state is shared, under one short lock."""

    def __init__(self, names):
        self.names = sorted(names)
        self.lock = threading.Lock()
        self.instances = {}  # instance id -> plugin name
        self.events = {}  # event id -> [script, index of its next reply]
        self.instance_ids = itertools.count()
        self.event_ids = itertools.count()

    def start_instance(self, arg):
        with self.lock:
            iid = next(self.instance_ids)
            self.instances[iid] = arg["Name"]
        return {
            "Name": arg["Name"],
            "Id": iid,
            "Config": json.loads(arg["Config"]),
            "StartTime": time.time(),
        }

    def handle_event(self, arg):
        with self.lock:
            name = self.instances.get(arg["InstanceId"])
            if name is None:
                raise LookupError("no plugin instance #%s" % arg["InstanceId"])
            eid = next(self.event_ids)
            state = self.events[eid] = [SCRIPTS.get(name, ANY_OTHER), 0]
        return self._next(eid, state)

    def step(self, arg):
        eid = arg["EventId"]
        with self.lock:
            state = self.events.get(eid)
        if state is None:
            raise LookupError("event id %s not found" % eid)
        return self._next(eid, state)

    def _next(self, eid, state):
        script, index = state
        block, data = script[index]
        state[1] = index + 1
        if data == "ret":
            with self.lock:
                del self.events[eid]
        if block:
            time.sleep(block)
        return {"Data": data, "EventId": eid}

    def info(self, name):
        return {
            "Name": name,
            "Phases": PHASES,
            "Priority": 0,
            "Version": "0.0.0",
            "Schema": {"name": name, "fields": [{"config": {"type": "record", "fields": []}}]},
        }


def serve_connection(sock, plugins):
    # The same read loop as kong-pdk's listener: an Unpacker pulling from the socket.
    unpacker = msgpack.Unpacker(strict_map_key=False)
    methods = {
        "plugin.StartInstance": plugins.start_instance,
        "plugin.HandleEvent": plugins.handle_event,
        "plugin.GetPluginInfo": plugins.info,
        "plugin.CloseInstance": lambda iid: None,
        "plugin.GetStatus": lambda *_: {"Pid": os.getpid(), "Plugins": {}},
    }
    while True:
        data = sock.recv(65536)
        if not data:
            return
        unpacker.feed(data)
        for _, msgid, method, args in unpacker:
            fn = methods.get(method)
            if fn is None and method.startswith("plugin.Step"):
                fn = plugins.step
            try:
                if fn is None:
                    raise LookupError("method %s not supported" % method)
                reply = [1, msgid, None, fn(*args)]
            except Exception as ex:  # an error reply, as kong-pdk's listener sends
                reply = [1, msgid, str(ex), None]
            sock.sendall(msgpack.packb(reply))


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def exit_when_orphaned(parent):
    # As kong-pdk's watchdog: a benchmark killed hard must not leave this server behind.
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--kong-prefix", dest="prefix", default="/usr/local/kong/")
    parser.add_argument("-d", "--plugins-directory", dest="directory", default=None)
    parser.add_argument("--socket-name", default="python_pluginserver.sock")
    parser.add_argument("--dump-all-plugins", action="store_true")
    args, _ignored = parser.parse_known_args(argv)

    names = SCRIPTS.keys()
    if args.directory:
        names = [f[:-3] for f in os.listdir(args.directory) if f.endswith(".py")]
    plugins = Plugins(names)
    if args.dump_all_plugins:
        print(json.dumps([plugins.info(name) for name in plugins.names]))
        return 0

    path = os.path.join(args.prefix, args.socket_name)
    if os.path.exists(path):
        os.remove(path)
    threading.Thread(target=exit_when_orphaned, args=(os.getppid(),), daemon=True).start()

    def handle(request, _address, _server):
        try:
            serve_connection(request, plugins)
        except OSError:
            pass  # the client went away

    server = Server(path, handle, bind_and_activate=False)
    server.server_bind()
    server.socket.listen(4096)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
