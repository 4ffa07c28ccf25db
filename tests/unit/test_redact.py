"""redact(): no part of a password survives, whatever characters it holds."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from memshift.redact import redact

# Passwords as people paste them: unencoded, with the URL's own delimiters in them.
URL_PASSWORDS = st.text(
    alphabet=st.sampled_from("abcXYZ019-_.~!$*+,;=@:/?#%[]'\""), min_size=1, max_size=24
)
KV_PASSWORDS = st.text(
    alphabet=st.sampled_from("abcXYZ019 -_.@:/?#%&='\"\\"), min_size=1, max_size=24
)


@given(password=URL_PASSWORDS)
@example(password="Secret1@127.0.0.1")
@example(password="a@b:c/d?e#f%g")
def test_a_url_password_is_hidden_whole(password: str) -> None:
    for url, shown in (
        (f"postgresql://postgres:{password}@127.0.0.1:5432/app",
         "postgresql://postgres:***@127.0.0.1:5432/app"),
        (f"redis://:{password}@cache.internal:6379/0", "redis://:***@cache.internal:6379/0"),
        (f"rediss://default:{password}@cache/1", "rediss://default:***@cache/1"),
    ):
        assert redact(url) == shown
        assert redact(f"cannot connect to {url}: refused") == f"cannot connect to {shown}: refused"
        assert redact(f'connection to "{url}" failed') == f'connection to "{shown}" failed'


@given(password=KV_PASSWORDS)
@example(password="a b")
@example(password="x@y")
def test_a_quoted_key_value_password_is_hidden_whole(password: str) -> None:
    quoted = "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"
    dsn = f"host=db.internal dbname=app user=app password={quoted} sslmode=require"

    assert redact(dsn) == "host=db.internal dbname=app user=app password=*** sslmode=require"


@given(password=st.text(alphabet=st.sampled_from("abc019@:/?#%'-"), min_size=1, max_size=24)
       .filter(lambda p: not p.startswith("'")))  # a leading quote makes it a quoted one
def test_an_unquoted_key_value_password_is_hidden_whole(password: str) -> None:
    dsn = f"host=db user=app password={password} port=5432"

    assert redact(dsn) == "host=db user=app password=*** port=5432"


@given(password=st.text(alphabet=st.sampled_from("abcXYZ019-_.~%@:/?'"), min_size=1,
                        max_size=24))
def test_a_password_query_parameter_is_hidden_whole(password: str) -> None:
    url = f"postgresql://app@db/app?sslmode=require&password={password}&connect_timeout=3"

    assert redact(url) == (
        "postgresql://app@db/app?sslmode=require&password=***&connect_timeout=3"
    )


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://postgres@/postgres?host=/tmp",
        "postgresql://app@db.internal:5432/memory",
        "redis://localhost:6379/0",
        "unix:///var/run/redis.sock",
        "set it to a URL such as postgresql://app@db.example:5432/memory",
        "user:password@ with special characters percent-encoded",
    ],
)
def test_text_without_a_password_is_left_alone(text: str) -> None:
    assert redact(text) == text


def test_every_password_in_a_text_is_hidden() -> None:
    text = ("from redis://:r3d!s@cache:6379/0 to postgresql://app:p@g@db/app "
            "or host=db password='s3 cr3t'")

    shown = redact(text)

    assert shown == ("from redis://:***@cache:6379/0 to postgresql://app:***@db/app "
                     "or host=db password=***")
