"""Renames request headers on their way upstream and tags the response.

Config: `rename` maps a request header to its new name; `tag` is sent back in `X-Rewritten-By`.
"""

version = "0.1.0"
priority = 800
Schema = (
    {"rename": {"type": "map", "keys": {"type": "string"}, "values": {"type": "string"}}},
    {"tag": {"type": "string", "default": "header_rewrite"}},
)


class Plugin:
    def __init__(self, config):
        self.rename = config.get("rename", {})
        self.tag = config.get("tag", "header_rewrite")

    def access(self, kong):
        for old, new in self.rename.items():
            value, _ = kong.request.get_header(old)
            if value is not None:
                kong.service.request.set_header(new, value)
                kong.service.request.clear_header(old)
        kong.response.set_header("X-Rewritten-By", self.tag)
