"""Makes a PDK call after kong.response.exit (in a finally block)."""


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        try:
            kong.response.exit(403, "denied")
        finally:
            kong.log.notice("after exit")
