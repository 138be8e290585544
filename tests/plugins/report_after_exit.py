"""Calls the PDK after kong.response.exit, and reports on its next event what that call got
(a call after exit never reaches Kong, so it cannot be reported in the same event)."""

LAST = {}


class Plugin:
    def __init__(self, config):
        pass

    def access(self, kong):
        if "result" in LAST:
            kong.log.notice(LAST.pop("result"))
        kong.response.exit(403, "stop")
        try:
            LAST["result"] = "returned %r" % (kong.request.get_header("x"),)
        except Exception as ex:  # Python-style PDK raises instead
            LAST["result"] = "%s: %s" % (type(ex).__name__, ex)
