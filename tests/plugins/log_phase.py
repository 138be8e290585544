"""Exits in access; its log phase reads the response status and logs it."""


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        kong.response.exit(403, "denied")

    def log(self, kong):
        status, _ = kong.response.get_status()
        kong.log.notice(f"status {status}")
