"""Writes one audit line per request from the log phase.

Access puts the caller's consumer name in `kong.ctx.shared`; log, which Kong runs after the
response was sent, reads it back with the response status and writes the audit line.
"""

import json

version = "0.1.0"
priority = 10


class Plugin:
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        consumer, _ = kong.client.get_consumer()
        name = consumer["username"] if consumer else "anonymous"
        kong.ctx.shared.set("audit_consumer", name)

    def log(self, kong):
        consumer, _ = kong.ctx.shared.get("audit_consumer")
        status, _ = kong.response.get_status()
        serialized, _ = kong.log.serialize()
        entry = json.loads(serialized)
        line = {"consumer": consumer, "status": status, "uri": entry["request"]["uri"]}
        kong.log.notice("audit " + json.dumps(line, sort_keys=True))
