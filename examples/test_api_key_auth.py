"""Tests of plugins/api_key_auth.py, written with kong-pdk-fix's testing kit."""

import pytest

from kong_pdk_fix.testing import MODES, Request

pytestmark = pytest.mark.kong_plugins("plugins/api_key_auth.py")

CONFIG = {"keys": {"s3cr3t": "alice"}}


def test_a_request_without_a_key_gets_a_401(kong):
    auth = kong.start_instance("api_key_auth", CONFIG)

    outcome = kong.run("access", auth, Request(headers={"Host": "example.com"}))

    assert outcome.exit
    assert outcome.status == 401
    assert outcome.body == {"message": "Unauthorized"}
    assert outcome.headers == {"WWW-Authenticate": 'Key realm="kong"'}


def test_a_known_key_goes_upstream_as_the_consumer(kong):
    auth = kong.start_instance("api_key_auth", CONFIG)

    outcome = kong.run("access", auth, Request(headers={"apikey": "s3cr3t"}))

    assert outcome.ret
    assert outcome.calls == [
        ("kong.request.get_header", ["apikey"]),
        ("kong.service.request.set_header", ["X-Consumer-Username", "alice"]),
        ("kong.service.request.clear_header", ["apikey"]),
    ]


@pytest.mark.parametrize("kong_mode", MODES)
def test_rejecting_requests_leaks_nothing(kong):
    auth = kong.start_instance("api_key_auth", CONFIG)

    report = kong.assert_no_leaks(auth, "access", Request(headers={"apikey": "wrong"}))

    assert report.outcomes == {"exit": 200}
