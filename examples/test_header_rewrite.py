"""Tests of plugins/header_rewrite.py, written with kong-pdk-fix's testing kit."""

import pytest

from kong_pdk_fix.testing import LuaError, Request

pytestmark = pytest.mark.kong_plugins("plugins/header_rewrite.py")

CONFIG = {"rename": {"X-Old-Token": "Authorization"}, "tag": "edge"}


def test_renames_a_header_on_its_way_upstream(kong):
    rewrite = kong.start_instance("header_rewrite", CONFIG)

    outcome = kong.run("access", rewrite, Request(headers={"x-old-token": "Bearer abc"}))

    assert outcome.ret
    assert outcome.calls_to("kong.service.request.set_header") == [["Authorization", "Bearer abc"]]
    assert outcome.calls_to("kong.service.request.clear_header") == [["X-Old-Token"]]
    assert outcome.calls_to("kong.response.set_header") == [["X-Rewritten-By", "edge"]]


def test_leaves_requests_without_the_header_alone(kong):
    rewrite = kong.start_instance("header_rewrite", CONFIG)

    outcome = kong.run("access", rewrite, Request())

    assert outcome.ret
    assert outcome.calls_to("kong.service.request.set_header") == []


def test_a_pdk_call_that_fails_in_kong_ends_the_event(kong):
    rewrite = kong.start_instance("header_rewrite", CONFIG)
    request = Request(answers={"kong.request.get_header": LuaError("headers already sent")})

    outcome = kong.run("access", rewrite, request)

    assert outcome.kind == "lua_error"
    assert outcome.error == "headers already sent"


def test_rewriting_leaks_nothing(kong):
    rewrite = kong.start_instance("header_rewrite", CONFIG)

    kong.assert_no_leaks(rewrite, "access", Request(headers={"x-old-token": "Bearer abc"}))
