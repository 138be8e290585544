"""Tells Kong which plugin it is: kong.response.set_header("x-plugin", <its name>).
kong-pdk names a plugin after its file, so copies of this file under other names answer
with those names (the restart tests)."""


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        kong.response.set_header("x-plugin", __name__)
