"""Kong emulator probe plugin: reports the plugin server's live per-event objects.

In ``access`` it runs ``gc.collect()``, counts live objects of the kinds kong-pdk creates per
event (keyed by class name; isinstance, so subclasses count too) and sends the report as JSON
in one PDK call, ``kong.log.notice(json_text)``. The counts include the probe's own event.
``upstream_events`` is the number of entries in kong-pdk's own event table
(``PluginServer.events``), less the probe's own event: upstream leaves an orphan there for each
event that never ends; the shim leaves it empty. It is None where no PluginServer is alive. In
-m mode it is the pool process's copy of the table as it was when that process was forked, not
the server's: do not use it there.
With config ``{"heap": true}`` and guppy3 importable, the report also holds guppy's
heap-by-type table.
Installed into a plugins directory by ``kong_pdk_fix.kongsim.install_probe``.
"""

import gc
import json
import os
import sys
import threading

version = "0.1.0"
priority = 0
Schema = ({"heap": {"type": "boolean", "default": False}},)

HEAP_ROWS = 15


def watched_types():
    import collections
    import multiprocessing.connection
    import queue

    types = [
        collections.deque,
        queue.Queue,
        threading.Condition,
        threading.Thread,
        threading.Event,
        multiprocessing.connection.Connection,
    ]
    try:
        import greenlet

        types.append(greenlet.greenlet)
    except ImportError:
        pass
    gevent_queue = sys.modules.get("gevent.queue")
    if gevent_queue is not None:
        types.append(gevent_queue.Channel)
    return {cls.__name__: cls for cls in types}


def heap_by_type():
    try:
        from guppy import hpy
    except ImportError:
        return None
    by_type = hpy().heap().bytype
    return [
        {"kind": str(by_type[i].kind), "count": by_type[i].count, "size": by_type[i].size}
        for i in range(min(HEAP_ROWS, len(by_type)))
    ]


def own_channel():
    """The channel of the probe's own event on an upstream server: kong-pdk runs every handler
    as _handler_event_func(cls_phase, ch, lua_style). None on a patched server."""
    frame = sys._getframe()
    while frame.f_code.co_name != "_handler_event_func":
        back = frame.f_back
        if back is None:
            return None
        frame = back
    return frame.f_locals.get("ch")


def is_own(entry, own):
    # kong-pdk 0.33/0.34 put an event in the table before its handler's first message, so the
    # probe's own event is there while it runs. Threading mode keeps the server's Queue, whose
    # get is the handler's Queue's; gevent and -m keep the channel the handler holds.
    if own is None:
        return False
    return entry is own or getattr(getattr(entry, "get", None), "__self__", None) is own


def report(heap):
    gc.collect()
    types = watched_types()
    counts = dict.fromkeys(types, 0)
    every = tuple(types.values())
    server_module = sys.modules.get("kong_pdk.server")
    server_class = server_module.PluginServer if server_module is not None else ()
    own = own_channel()
    upstream_events = None
    for obj in gc.get_objects():
        if isinstance(obj, every):
            for name, cls in types.items():
                if isinstance(obj, cls):
                    counts[name] += 1
        elif isinstance(obj, server_class):
            entries = list(obj.events.values())
            upstream_events = (upstream_events or 0) + sum(not is_own(e, own) for e in entries)
    result = dict(
        counts,
        pid=os.getpid(),
        active_count=threading.active_count(),
        upstream_events=upstream_events,
    )
    if heap:
        result["heap"] = heap_by_type()
    return result


class Plugin:
    def __init__(self, config):
        self.heap = bool(config.get("heap"))

    def access(self, kong):
        kong.log.notice(json.dumps(report(self.heap)))
