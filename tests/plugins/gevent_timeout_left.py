"""gevent: starts a Timeout and never cancels it (it fires in the worker after the handler)."""

import gevent


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        gevent.Timeout(0.3).start()
