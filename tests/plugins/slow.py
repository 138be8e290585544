"""Sleeps config["sleep"] seconds (default 0.2), then returns without a PDK call."""

import time


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

    def access(self, kong):
        sleep(self.seconds)
