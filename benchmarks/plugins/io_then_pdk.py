"""20 ms of blocking I/O (an auth service, say) before its first PDK call.
Upstream holds its server-wide lock until a handler's first message, so this serialises
every event of the server there."""

import time


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        time.sleep(0.02)  # blocking, as a plain socket or requests call would be
        kong.request.get_header("host")
