"""Reads a header, then ends the request with kong.response.error."""


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        kong.request.get_header("authorization")
        kong.response.error(401, "unauthorized")
