"""Tests of plugins/audit_log.py, written with kong-pdk-fix's testing kit."""

import json

import pytest

from kong_pdk_fix.testing import Request

pytestmark = pytest.mark.kong_plugins("plugins/audit_log.py")


def test_the_log_phase_writes_what_access_saw(kong):
    audit = kong.start_instance("audit_log")
    request = Request(path="/orders", consumer={"username": "alice"}, response_status=201)

    assert kong.run("access", audit, request).ret
    outcome = kong.run("log", audit, request)

    assert outcome.ret
    assert request.shared == {"audit_consumer": "alice"}
    (notice,) = outcome.calls_to("kong.log.notice")
    assert json.loads(notice[0].removeprefix("audit ")) == {
        "consumer": "alice",
        "status": 201,
        "uri": "/orders",
    }


def test_an_anonymous_request_is_logged_as_such(kong):
    audit = kong.start_instance("audit_log")
    request = Request()

    kong.run("access", audit, request)
    outcome = kong.run("log", audit, request)

    (notice,) = outcome.calls_to("kong.log.notice")
    assert '"consumer": "anonymous"' in notice[0]


def test_logging_leaks_nothing(kong):
    audit = kong.start_instance("audit_log")

    kong.assert_no_leaks(audit, "log", Request(shared={"audit_consumer": "alice"}))


def test_a_rejected_request_is_still_audited(kong_plugin_server):
    kong = kong_plugin_server(["plugins/api_key_auth.py", "plugins/audit_log.py"], mode="gevent")
    auth = kong.start_instance("api_key_auth", {"keys": {}})
    audit = kong.start_instance("audit_log")
    request = Request(headers={"apikey": "nope"}, response_status=401)

    assert kong.run("access", auth, request).status == 401
    # Kong skips the other plugins' access after an exit, but runs every log phase.
    outcome = kong.run("log", audit, request)

    (notice,) = outcome.calls_to("kong.log.notice")
    assert '"status": 401' in notice[0]
