"""Five PDK calls, each a round trip to Kong: four reads and one write.
benchmarks/bare_rpc_server.py sends the same calls (PDK5); keep the two in step."""


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        kong.request.get_header("host")
        kong.request.get_method()
        kong.request.get_path()
        kong.request.get_header("x-request-id")
        kong.response.set_header("x-bench", "1")
