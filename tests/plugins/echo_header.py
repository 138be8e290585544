"""Echoes a request header back as a response header, as Kong gave it (any bytes: Kong sends
Lua strings as msgpack str even when they are not UTF-8)."""


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        value, _ = kong.request.get_header("x-raw")
        kong.response.set_header("x-echo", value)
