"""A PDK call first, then 20 ms of blocking I/O: upstream's lock is released by then."""

import time


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        kong.request.get_header("host")
        time.sleep(0.02)
