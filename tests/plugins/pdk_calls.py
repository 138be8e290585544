"""Two reads and one write through the PDK, echoing what Kong answered."""

import json


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        host, _ = kong.request.get_header("host")
        headers, _ = kong.request.get_headers()
        kong.response.set_header("x-echo", json.dumps([host, headers]))
