import kong_pdk_fix  # noqa: F401 - first line: patches kong_pdk.server before anything uses it

# A dedicated-server plugin: one file that is its own plugin server. Kong starts it with
# `python3 hello_dedicated.py` (start_cmd), asks it for its plugin info with `--dump`
# (query_cmd), and talks to it over <prefix>/hello_dedicated.sock.

from kong_pdk.cli import start_dedicated_server  # noqa: E402

Schema = ({"header": {"type": "string", "default": "x-hello"}},)
version = "0.1.0"
priority = 0


class Plugin(object):
    def __init__(self, config):
        self.header = config.get("header", "x-hello")

    def access(self, kong):
        kong.response.set_header(self.header, "from a dedicated server")


if __name__ == "__main__":
    start_dedicated_server("hello_dedicated", Plugin, version, priority, Schema)
