"""Makes a PDK call from a helper thread while its own thread makes another."""

import threading
import time


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        helper = threading.Thread(target=lambda: kong.request.get_header("from-thread"))
        helper.start()
        time.sleep(0.3)
        kong.request.get_header("from-handler")
        helper.join()
