"""gevent: a PDK call interrupted by a gevent.Timeout the handler catches; it goes on for a
second after that."""

import gevent


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        try:
            with gevent.Timeout(0.3):
                kong.request.get_header("x")
        except gevent.Timeout:
            pass
        gevent.sleep(1.0)
