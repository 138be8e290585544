"""Sleeps one second, then makes one PDK call."""

import time


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        time.sleep(1.0)
        kong.request.get_header("x")
