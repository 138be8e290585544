"""Runs the steps of config["script"] in order (tests/test_properties.py):

  get    kong.request.get_header("x") (a PDK call Kong answers)
  set    kong.response.set_header("x", "y")
  exit   kong.response.exit(403)
  error  kong.response.error(500)
  raise  raises RuntimeError

Steps after exit or error go on: their PDK calls never reach Kong and fail fast (Lua style:
they return (None, err)), and a raise after them raises out of an event that already ended.
"""


class Plugin:
    def __init__(self, config):
        self.script = list(config.get("script", []))

    def access(self, kong):
        for step in self.script:
            if step == "get":
                kong.request.get_header("x")
            elif step == "set":
                kong.response.set_header("x", "y")
            elif step == "exit":
                kong.response.exit(403)
            elif step == "error":
                kong.response.error(500)
            elif step == "raise":
                raise RuntimeError("scripted: raise step")
