"""Raises before its first PDK call (freezes an unpatched kong-pdk server for good)."""


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        raise RuntimeError("raises: handler failed")
