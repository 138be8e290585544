"""Short-circuits with kong.response.exit as its first PDK call."""


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        kong.response.exit(403, {"message": "denied"}, {"x-plugin": "exit_first"})
