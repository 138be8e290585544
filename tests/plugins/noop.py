"""Does nothing: the handler returns at once."""


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        pass
