"""Raises after one PDK call."""


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        kong.request.get_header("host")
        raise RuntimeError("raises_later: handler failed")
