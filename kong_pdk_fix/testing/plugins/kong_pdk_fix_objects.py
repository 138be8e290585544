"""Leak-guard probe plugin: the plugin server's live objects by type, and containers that grew.

In ``access`` it runs ``gc.collect()`` and sends one PDK call, ``kong.log.notice(json_text)``,
with ``pid``, ``objects`` (the number of gc-tracked objects of each type, keyed
``module.qualname``, bare for builtins) and ``grown``. Counting by type misses what gc does
not track (strings, numbers, and dicts and tuples holding only those), so the probe also
remembers the length of every list, dict, set and deque. An instance with no ``limit`` in its
config takes that baseline; one with ``config["limit"]`` lists in ``grown`` the containers
that grew by that many items or more since the baseline of the same process, as ``{type,
length, growth, owner}``, where ``owner`` names the module or class attribute holding the
container, if one does.
In -m mode the handler runs in a pool process, so the report is that process's.
Copied into the plugins directory by ``kong_pdk_fix.testing.EmulatedKong``.
"""

import collections
import gc
import json
import os
import sys

version = "0.1.0"
priority = 0
Schema = ({"limit": {"type": "integer"}},)

CONTAINERS = (list, dict, set, collections.deque)
_baseline: dict = {}  # id -> (type, length) of every container when the baseline was taken


def type_name(cls):
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return "%s.%s" % (cls.__module__, cls.__qualname__)


def owner(container):
    """ "module.name" or "module.Class.attribute" for the first holder found, else None."""
    modules = {id(vars(m)): m.__name__ for m in list(sys.modules.values()) if m is not None}
    for holder in gc.get_referrers(container):
        if isinstance(holder, dict):
            name = attribute(holder, container)
            if name is None:
                continue
            if id(holder) in modules:
                return "%s.%s" % (modules[id(holder)], name)
            for obj in gc.get_referrers(holder):
                if getattr(obj, "__dict__", None) is holder:
                    return "%s.%s" % (type_name(type(obj)), name)
        else:
            # Python 3.11+ keeps most instances' attributes inline: the instance refers to
            # the container directly.
            attributes = getattr(holder, "__dict__", None)
            name = attribute(attributes, container) if isinstance(attributes, dict) else None
            if name is not None:
                return "%s.%s" % (type_name(type(holder)), name)
    return None


def attribute(namespace, value):
    for key, item in list(namespace.items()):
        if item is value and isinstance(key, str):
            return key
    return None


def report(limit):
    global _baseline
    gc.collect()
    objects: collections.Counter = collections.Counter()
    lengths: dict = {}
    grown: list = []
    # The probe's own containers change size while it counts.
    own = {id(_baseline), id(objects), id(lengths), id(grown)}
    for obj in gc.get_objects():
        objects[type_name(type(obj))] += 1
        if isinstance(obj, CONTAINERS) and id(obj) not in own:
            lengths[id(obj)] = (type(obj), len(obj))
            was = _baseline.get(id(obj))
            # Same id and type: taken as the same container (an id is reused only once freed).
            if limit and was is not None and was[0] is type(obj) and len(obj) - was[1] >= limit:
                grown.append((obj, len(obj) - was[1]))
    if not limit:
        _baseline = lengths
    return {
        "pid": os.getpid(),
        "objects": objects,
        "grown": [
            {"type": type_name(type(c)), "length": len(c), "growth": n, "owner": owner(c)}
            for c, n in grown
        ],
    }


class Plugin:
    def __init__(self, config):
        self.limit = config.get("limit")

    def access(self, kong):
        kong.log.notice(json.dumps(report(self.limit)))
