"""Bug 42, tested on the state that showed it: the real users table, not a guess at it."""

from __future__ import annotations

import pytest

import mobycounter


@pytest.mark.dotmesh_state("app", "bug-42", start="app_servers")
def test_a_user_who_signed_up_with_capitals_and_spaces_can_log_in(
        app_servers: mobycounter.App) -> None:
    user = mobycounter.login(app_servers, "bob@example.com")
    assert user is not None, "bug 42 is back"
    assert mobycounter.click(app_servers, user) == 1  # the state has no clicks of his yet
