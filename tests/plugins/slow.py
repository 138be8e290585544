"""Blocks config["sleep"] seconds (default 0.2) before any PDK call, as an auth call would.
With config["report_peak"], it then tells Kong through kong.log.notice how many of its
handlers ran at once at the most."""

import threading
import time

LOCK = threading.Lock()
ACTIVE = {"now": 0, "peak": 0}


def sleep(seconds):
    # In gevent mode the handler is a greenlet: time.sleep would block the whole server.
    try:
        import gevent
    except ImportError:
        time.sleep(seconds)
        return
    if isinstance(gevent.getcurrent(), gevent.Greenlet):
        gevent.sleep(seconds)
    else:
        time.sleep(seconds)


class Plugin:
    def __init__(self, config):
        self.seconds = config.get("sleep", 0.2)
        self.report_peak = config.get("report_peak", False)

    def access(self, kong):
        with LOCK:
            ACTIVE["now"] += 1
            ACTIVE["peak"] = max(ACTIVE["peak"], ACTIVE["now"])
        try:
            sleep(self.seconds)
        finally:
            with LOCK:
                ACTIVE["now"] -= 1
                peak = ACTIVE["peak"]
        if self.report_peak:
            kong.log.notice("peak %d" % peak)
