"""Lets a request through only with a known API key in the `apikey` header.

Config: `keys` maps each key to the consumer name sent upstream in `X-Consumer-Username`.
A request without a known key gets a 401 from `kong.response.exit`.
"""

version = "0.1.0"
priority = 1000
Schema = ({"keys": {"type": "map", "keys": {"type": "string"}, "values": {"type": "string"}}},)


class Plugin:
    def __init__(self, config):
        self.keys = config.get("keys", {})

    def access(self, kong):
        key, _ = kong.request.get_header("apikey")
        consumer = self.keys.get(key)
        if consumer is None:
            kong.response.exit(
                401, {"message": "Unauthorized"}, {"WWW-Authenticate": 'Key realm="kong"'}
            )
            return
        kong.service.request.set_header("X-Consumer-Username", consumer)
        kong.service.request.clear_header("apikey")
