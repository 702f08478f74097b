"""kold.output.redact_url: what the CLI prints of a Redis URL (start lines, errors) never holds its password."""

from __future__ import annotations

import pytest

from kold.output import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cretpw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://kold:s3cretpw@redis.example:6379/0", "redis://kold:***@redis.example:6379/0"),
        ("rediss://:p%40ss%3Aw@h:6380", "rediss://:***@h:6380"),
        ("redis://:s3cretpw@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("redis://:s3c:ret@host/1", "redis://:***@host/1"),
        ("unix://:s3cretpw@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        ("unix:///run/redis.sock?db=0&password=s3cretpw", "unix:///run/redis.sock?db=0&password=***"),
        ("redis://h:6379/0?Password=s3cretpw&db=2", "redis://h:6379/0?Password=***&db=2"),
    ],
)
def test_a_password_is_shown_as_stars_and_the_rest_as_given(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "redis://[::1]:6379/0", "redis://kold@h:6379", "unix:///run/redis.sock?db=0"],
)
def test_a_url_without_a_password_is_left_as_it_is(url: str) -> None:
    assert redact_url(url) == url


def test_a_url_too_malformed_to_split_keeps_only_its_scheme() -> None:
    assert redact_url("redis://:s3cretpw@[::1:6379/0") == "redis://***"
