"""Leaves a thread running that calls the PDK half a second after the handler returned."""

import threading
import time


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        def later():
            time.sleep(0.5)
            kong.response.set_header("x-from-an-old-event", "1")

        threading.Thread(target=later).start()
