"""An example plugin for the wrapper's plugins directory: greets in a response header, and
turns away requests without an `x-user` header with kong.response.exit (the call after
which upstream kong-pdk keeps every event for ever)."""

Schema = ({"greeting": {"type": "string", "default": "hello"}},)
version = "0.1.0"
priority = 0


class Plugin(object):
    def __init__(self, config):
        self.greeting = config.get("greeting", "hello")

    def access(self, kong):
        user, err = kong.request.get_header("x-user")
        if not user:
            return kong.response.exit(401, {"message": "who are you?"})
        kong.response.set_header("x-greeting", "%s, %s" % (self.greeting, user))
