"""Kong emulator scenario plugin: what its access handler does is chosen by the instance's
config, so one file serves every scenario of `kong-pdk-fix check` and `kong-pdk-fix soak`.

config["do"]:
  noop        returns at once (the original report's ten plugins)
  exit        kong.response.exit as its first PDK call (an auth plugin rejecting a request)
  pdk         reads a header, then sets one
  after_exit  kong.response.exit, then a PDK call in a finally block
  raise       raises before its first PDK call

kong-pdk names a plugin after its file, so the commands copy this template under the names
they need (KONG_PROTOCOL.md "Start-up": Kong learns the plugins from that directory).
"""

version = "0.1.0"
priority = 0
Schema = ({"do": {"type": "string", "default": "noop"}},)


class Plugin:
    def __init__(self, config):
        self.do = config.get("do", "noop")

    def access(self, kong):
        if self.do == "exit":
            kong.response.exit(403, "denied")
        elif self.do == "pdk":
            kong.request.get_header("host")
            kong.response.set_header("x-kong-pdk-fix", "soak")
        elif self.do == "after_exit":
            try:
                kong.response.exit(403, "denied")
            finally:
                kong.log.notice("after exit")
        elif self.do == "raise":
            raise RuntimeError("kong_pdk_fix_scenario: handler failed")
