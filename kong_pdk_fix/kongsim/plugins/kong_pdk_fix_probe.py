"""Kong emulator probe plugin: reports the plugin server's live per-event objects.

In ``access`` it runs ``gc.collect()``, counts live objects of the kinds kong-pdk creates per
event (keyed by class name; isinstance, so subclasses count too) and sends the report as JSON
in one PDK call, ``kong.log.notice(json_text)``. The counts include the probe's own event.
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


def report(heap):
    gc.collect()
    types = watched_types()
    counts = dict.fromkeys(types, 0)
    every = tuple(types.values())
    for obj in gc.get_objects():
        if isinstance(obj, every):
            for name, cls in types.items():
                if isinstance(obj, cls):
                    counts[name] += 1
    result = dict(counts, pid=os.getpid(), active_count=threading.active_count())
    if heap:
        result["heap"] = heap_by_type()
    return result


class Plugin:
    def __init__(self, config):
        self.heap = bool(config.get("heap"))

    def access(self, kong):
        kong.log.notice(json.dumps(report(self.heap)))
