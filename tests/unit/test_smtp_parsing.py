"""MAIL/RCPT argument parsing (mailsuite.smtp.address), with hypothesis for arbitrary input."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.smtp.address import PathError, parse_path_argument
from mailsuite.smtp.replies import Reply


@pytest.mark.parametrize("arg,address,params", [
    ("FROM:<alice@example.org>", "alice@example.org", {}),
    ("FROM: <alice@example.org>", "alice@example.org", {}),  # common client quirk
    ("from:<a@b.example> size=10 body=8bitmime", "a@b.example", {"SIZE": "10", "BODY": "8bitmime"}),
    ("FROM:<>", "", {}),
    ("FROM:<@relay.example:a@b.example>", "a@b.example", {}),  # source route ignored
    ('FROM:<"john doe"@example.org>', '"john doe"@example.org', {}),
    ('FROM:<"a>b"@example.org>', '"a>b"@example.org', {}),
    ("FROM:<x@[192.0.2.1]>", "x@[192.0.2.1]", {}),
    ("FROM:<jörg@exämple.org> SMTPUTF8", "jörg@exämple.org", {"SMTPUTF8": None}),
])
def test_valid_paths(arg, address, params):
    parsed = parse_path_argument(arg, "FROM:", allow_utf8=True, allow_null=True)
    assert parsed.address == address and parsed.params == params


@pytest.mark.parametrize("arg", [
    "FROM:<a@>", "FROM:<@b.example>", "FROM:<ab>", "FROM:<a b@c.example>", "FROM:<a@b..c>",
    "FROM:<a@b.example", "FROM:<a@b.example>x", "FROM:", "TO:<a@b.example>",
    "FROM:<a@b.example> =x", "FROM:<a@b.example> K=a=b=", "FROM:<" + "a" * 65 + "@b.example>",
    "FROM:<a@-b.example>", "FROM:<a\x00@b.example>",
])
def test_invalid_paths(arg):
    with pytest.raises(PathError):
        parse_path_argument(arg, "FROM:", allow_utf8=True, allow_null=True)


def test_null_path_only_where_allowed():
    with pytest.raises(PathError):
        parse_path_argument("TO:<>", "TO:")


def test_utf8_needs_permission():
    with pytest.raises(PathError) as e:
        parse_path_argument("TO:<jörg@example.org>", "TO:", allow_utf8=False)
    assert e.value.non_ascii


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=120))
def test_parser_never_raises_anything_but_path_error(text):
    for prefix in ("FROM:", "TO:"):
        try:
            parsed = parse_path_argument(prefix + text, prefix, allow_utf8=True,
                                         allow_null=True)
        except PathError:
            continue
        # Whatever is accepted is safe to put in a header or a file name component.
        assert "\r" not in parsed.address and "\n" not in parsed.address
        assert "\x00" not in parsed.address and parsed.address.isprintable()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.sampled_from([250, 451, 550]))
def test_reply_lines_are_always_well_formed(text, code):
    data = Reply(code, "5.0.0", text).lines()
    lines = data.split(b"\r\n")
    assert lines[-1] == b""
    for i, line in enumerate(lines[:-1]):
        assert line[:3] == str(code).encode()
        assert line[3:4] == (b" " if i == len(lines) - 2 else b"-")
        assert b"\r" not in line and b"\n" not in line
        assert line.isascii()
