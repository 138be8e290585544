"""Forks a child that outlives it, then kills the process its handler runs in (in -m mode: a
pool process). The child keeps a copy of every fd, so the pool process's death closes no pipe."""

import os
import time


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        if os.fork() == 0:
            time.sleep(15)  # longer than the test waits for a reply
            os._exit(0)
        os._exit(1)
