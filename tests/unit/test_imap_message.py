"""Unit tests of the IMAP message views and command syntax (no server): BODYSTRUCTURE,
ENVELOPE, sections and the tokenizer, on raw bytes including hostile inputs."""
from __future__ import annotations

import pytest

from mailsuite.imap import message as mime
from mailsuite.imap.parser import (Atom, ParseError, Str, date_time, fetch_atts, format_set,
                                   sequence_set, tokenize)
from mailsuite.imap.search import decode_header


def test_bodystructure_without_content_type_is_text_plain_us_ascii():
    """Twisted gave NIL NIL (docs/design/imap.md, "Headers from raw bytes")."""
    raw = b"Subject: x\r\n\r\nhello\r\nworld\r\n"
    bs = mime.serialize(mime.bodystructure(raw, mime.parse(raw)))
    assert bs == b'("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 14 2 NIL NIL NIL NIL)'


@pytest.mark.parametrize("ctype", [
    b"text/plain;", b"text/plain; charset", b'text/plain; name="a;b"; charset=utf-8',
    b"text/plain; charset=utf-8; charset=latin1", b"garbage", b"", b"/", b"text/",
])
def test_malformed_content_types_never_raise(ctype):
    raw = b"Content-Type: " + ctype + b"\r\n\r\nbody\r\n"
    root = mime.parse(raw)
    mime.serialize(mime.bodystructure(raw, root))
    mime.serialize(mime.envelope(raw, root))


def test_boundary_case_and_quoted_semicolon_kept():
    raw = (b'Content-Type: multipart/mixed; boundary="AbC;d"\r\n\r\n'
           b"--AbC;d\r\nContent-Type: text/plain\r\n\r\none\r\n--AbC;d--\r\n")
    root = mime.parse(raw)
    assert len(root.children) == 1
    bs = mime.serialize(mime.bodystructure(raw, root))
    assert b'"BOUNDARY" "AbC;d"' in bs
    assert mime.section(raw, root, [1], None) == (raw.index(b"one"), 3)


def test_nested_message_rfc822_sections():
    inner = b"Subject: inner\r\n\r\ninner body\r\n"
    raw = (b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\n'
           b"first\r\n--x\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"--x--\r\n")
    root = mime.parse(raw)

    def get(path, text=None, fields=None):
        piece = mime.section(raw, root, path, text, fields)
        return piece if isinstance(piece, bytes) else raw[piece[0]:piece[0] + piece[1]]

    # The CRLF before a boundary line belongs to the boundary (RFC 2046 §5.1.1).
    assert get([2]) == inner[:-2]
    assert get([2], b"HEADER") == b"Subject: inner\r\n\r\n"
    assert get([2], b"TEXT") == b"inner body"
    assert get([2, 1]) == b"inner body"
    assert get([2], b"MIME") == b"Content-Type: message/rfc822\r\n\r\n"
    assert get([], b"HEADER.FIELDS", [b"CONTENT-TYPE"]).startswith(b"Content-Type: multipart/mixed")
    with pytest.raises(mime.NoSuchPart):
        mime.section(raw, root, [3], None)
    bs = mime.serialize(mime.bodystructure(raw, root))
    assert b'"MESSAGE" "RFC822"' in bs and b'"inner"' in bs


def test_envelope_addresses_groups_and_8bit():
    raw = ("From: \"Jürgen X\" <j@example.org>\r\nTo: undisclosed-recipients:;\r\n"
           "Cc: a@example.org, B <b@example.org>\r\nSubject: =?UTF-8?Q?caf=C3=A9?=\r\n\r\n").encode()
    env = mime.serialize(mime.envelope(raw, mime.parse(raw)))
    assert "Jürgen X".encode() in env
    assert b'((NIL NIL "a" "example.org")("B" NIL "b" "example.org"))' in env.replace(b") (", b")(")
    assert b'"=?UTF-8?Q?caf=C3=A9?="' in env  # ENVELOPE strings are raw (RFC 3501 §7.4.2)


def test_decode_header_for_search():
    assert decode_header(b"=?UTF-8?Q?caf=C3=A9?= and =?ISO-8859-1?Q?na=EFve?=") == "café and naïve"
    assert decode_header("raw ü".encode()) == "raw ü"
    assert decode_header(b"=?x-unknown?Q?abc?=") in ("abc", "=?x-unknown?Q?abc?=")


def test_tokenizer_literals_quotes_and_sections():
    toks = tokenize([(b'a APPEND "Sent Items" (\\Seen) ', b"data"), (b"", None)])
    assert toks == [Atom(b"a"), Atom(b"APPEND"), Str(b"Sent Items"), [Atom(b"\\Seen")], Str(b"data")]
    toks = tokenize([(b"a FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.10>)", None)])
    assert toks[3] == [Atom(b"UID"), Atom(b"BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.10>")]
    assert tokenize([(b'a LOGIN "we\\"ird\\\\" x', None)])[2] == Str(b'we"ird\\')
    # Without a `]`, `[` is an ordinary atom character (RFC 3501 §9): a mailbox may be named
    # `a[b`; FETCH refuses such an attribute itself.
    assert tokenize([(b"a SELECT x[y", None)])[2] == Atom(b"x[y")
    with pytest.raises(ParseError):
        fetch_atts([Atom(b"BODY[1")])
    for bad in (b"a (", b"a )", b'a "x', b"a \x01"):
        with pytest.raises(ParseError):
            tokenize([(bad, None)])


def test_fetch_att_parsing():
    atts = fetch_atts([Atom(b"BODY.PEEK[1.2.MIME]"), Atom(b"body[header.fields.not (a b)]<5.7>"),
                       Atom(b"RFC822.SIZE")])
    assert atts[0].path == [1, 2] and atts[0].text == b"MIME" and atts[0].peek
    assert atts[1].text == b"HEADER.FIELDS.NOT" and atts[1].fields == [b"A", b"B"]
    assert atts[1].partial == (5, 7) and atts[1].response_name() == b"BODY[HEADER.FIELDS.NOT (A B)]<5>"
    for bad in (b"BODY[0]", b"BODY[MIME]", b"BODY[HEADER.FIELDS]", b"FOO", b"BODY[1.TEXT (X)]"):
        with pytest.raises(ParseError):
            fetch_atts(Atom(bad))


def test_sequence_sets():
    s = sequence_set(Atom(b"1:3,7,10:*"))
    assert s.select(list(range(1, 13)), 12) == [1, 2, 3, 7, 10, 11, 12]
    # RFC 3501: `*` is the largest value in use, so 20:* on max 12 means 12:20.
    assert sequence_set(Atom(b"20:*")).select([1, 5, 12], 12) == [12]
    for bad in (b"0", b"1:0", b"a", b"1,,2", b""):
        with pytest.raises(ParseError):
            sequence_set(Atom(bad))
    assert format_set([1, 2, 3, 5, 7, 8]) == b"1:3,5,7:8"


def test_append_date_time():
    assert date_time(Str(b"17-Jul-1996 02:44:25 -0700")) == 837596665.0
    with pytest.raises(ParseError):
        date_time(Str(b"31-Foo-1996 02:44:25 -0700"))


# -- fuzzing (hypothesis): hostile bytes never raise anything but ParseError -------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_IMAPISH = st.lists(st.sampled_from([b"a", b"FETCH", b" ", b"(", b")", b'"', b"\\", b"[", b"]", b"<",
                                     b">", b"1", b":", b"*", b",", b".", b"BODY[", b"HEADER.FIELDS",
                                     b"\xff", b"\x00", b"{3}", b"%"]), max_size=30).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(_IMAPISH, st.one_of(st.none(), st.binary(max_size=20)))
def test_tokenizer_and_fetch_parser_only_raise_parse_errors(line, literal):
    try:
        toks = tokenize([(line, literal)])
    except ParseError:
        return
    for t in toks:
        try:
            fetch_atts(t)
        except ParseError:
            pass
        try:
            sequence_set(t)
        except ParseError:
            pass


_MIMEISH = st.lists(st.sampled_from([
    b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: message/rfc822\r\n",
    b"Content-Type: text/plain;\r\n", b"\r\n", b"--b\r\n", b"--b--\r\n", b"Subject: x\r\n",
    b" folded\r\n", b"body\r\n", b"\xc3\xbc", b"\n", b"From: <a@b>, \"q\\\" <c>\r\n",
    b"Content-Disposition: attachment; filename=\"x;y\r\n"]), max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(_MIMEISH)
def test_mime_views_never_raise(raw):
    root = mime.parse(raw)
    mime.serialize(mime.bodystructure(raw, root))
    mime.serialize(mime.bodystructure(raw, root, extensible=False))
    mime.serialize(mime.envelope(raw, root))
    for path in ([], [1], [1, 1], [2], [1, 2, 1]):
        for text in (None, b"HEADER", b"TEXT", b"MIME", b"HEADER.FIELDS"):
            try:
                piece = mime.section(raw, root, path, text, [b"SUBJECT"])
            except mime.NoSuchPart:
                continue
            if isinstance(piece, tuple):
                assert 0 <= piece[0] and piece[0] + piece[1] <= len(raw)
