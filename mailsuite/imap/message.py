"""IMAP views of one message, computed from its raw bytes: BODYSTRUCTURE, ENVELOPE, sections.

Everything here works on the original octets (a `bytes` or an `mmap`), and every section is
answered as a slice of them: headers are never re-synthesised (docs/design/imap.md, "Headers
from raw bytes").
A section that is a contiguous range of the file is returned as `(offset, length)` so a large
one can be streamed from disk instead of copied into memory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

Buffer = Union[bytes, memoryview, "mmap.mmap"]  # noqa: F821

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FIELD_START = re.compile(rb"^([^\s:]+)[ \t]*:", re.M)


@dataclass
class Part:
    """One MIME entity: header block [start, body_start), body [body_start, end)."""

    start: int
    body_start: int
    end: int
    headers: list[tuple[bytes, int, int]]  # (lower-case name, field start, field end)
    maintype: bytes = b"text"
    subtype: bytes = b"plain"
    params: list[tuple[bytes, bytes]] = field(default_factory=list)
    children: list["Part"] = field(default_factory=list)  # multipart parts
    message: Optional["Part"] = None  # the encapsulated message of a message/rfc822 part


# -- parsing ------------------------------------------------------------------------------------

def header_end(buf: Buffer, start: int = 0, end: Optional[int] = None) -> int:
    """Offset just past the blank line ending the header block (or `end` if there is none)."""
    if end is None:
        end = len(buf)
    # A message whose first line is empty has an empty header block.
    if buf[start:start + 2] == b"\r\n":
        return start + 2
    if buf[start:start + 1] == b"\n":
        return start + 1
    m = _HEADER_END.search(buf, start, end)
    return m.end() if m else end


def parse_headers(buf: Buffer, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """Header fields of the block [start, end) as (lower-case name, start, end incl. CRLF)."""
    block = bytes(buf[start:end])
    fields: list[tuple[bytes, int, int]] = []
    pos = 0
    n = len(block)
    while pos < n:
        nl = block.find(b"\n", pos)
        line_end = n if nl < 0 else nl + 1
        # Folded continuation lines (RFC 5322 §2.2.3) start with white space.
        while line_end < n and block[line_end:line_end + 1] in (b" ", b"\t"):
            nl = block.find(b"\n", line_end)
            line_end = n if nl < 0 else nl + 1
        line = block[pos:line_end]
        if line.strip() == b"":
            break
        colon = line.find(b":")
        if colon > 0:
            fields.append((line[:colon].strip().lower(), start + pos, start + line_end))
        pos = line_end
    return fields


# A hostile message may nest multiparts or message/rfc822 parts thousands deep, or hold
# millions of tiny parts: deeper or further parts stay opaque (docs/design/imap.md, "Limits").
MAX_DEPTH = 50
MAX_PARTS = 5000  # parts of one message


def parse(buf: Buffer, start: int = 0, end: Optional[int] = None, default_type: bytes = b"text/plain",
          depth: int = 0, budget: Optional[list[int]] = None) -> Part:
    """The MIME tree of the entity buf[start:end]."""
    if budget is None:
        budget = [MAX_PARTS]
    budget[0] -= 1
    if end is None:
        end = len(buf)
    hend = header_end(buf, start, end)
    part = Part(start=start, body_start=hend, end=end, headers=parse_headers(buf, start, hend))
    ctype = field_value(buf, part, b"content-type")
    maintype, subtype, params = parse_content_type(ctype, default_type)
    if maintype == b"text" and not param(params, b"charset"):
        # RFC 2045 §5.2: text without a charset is us-ascii (clients expect it in BODYSTRUCTURE).
        params = params + [(b"charset", b"us-ascii")]
    part.maintype, part.subtype, part.params = maintype, subtype, params
    if depth >= MAX_DEPTH or budget[0] <= 0:
        return part
    if maintype == b"multipart":
        boundary = param(params, b"boundary")
        if boundary:
            child_default = b"message/rfc822" if subtype == b"digest" else b"text/plain"
            for s, e in split_multipart(buf, hend, end, boundary, budget[0]):
                if budget[0] <= 0:
                    break
                part.children.append(parse(buf, s, e, child_default, depth + 1, budget))
    elif maintype == b"message" and subtype in (b"rfc822", b"global"):
        part.message = parse(buf, hend, end, b"text/plain", depth + 1, budget)
    return part


def split_multipart(buf: Buffer, start: int, end: int, boundary: bytes,
                    limit: int = MAX_PARTS) -> list[tuple[int, int]]:
    """Body ranges of the parts between boundary lines (RFC 2046 §5.1.1).

    The CRLF before a delimiter line belongs to the delimiter, not to the preceding part.
    """
    parts: list[tuple[int, int]] = []
    current: Optional[int] = None
    # bytes.find, not a regex with a line-start alternation: a part nested 50 deep is scanned
    # 50 times, so this runs over the message that often (docs/design/imap.md, "Limits").
    for dstart, dend, closing in _delimiters(buf, start, end, b"--" + boundary):
        if len(parts) >= limit:
            current = None
            break
        if current is not None:
            stop = dstart
            if stop > current and buf[stop - 1:stop] == b"\n":
                stop -= 1
                if stop > current and buf[stop - 1:stop] == b"\r":
                    stop -= 1
            parts.append((current, max(stop, current)))
        if closing:
            current = None
            break
        current = dend
    if current is not None:  # no closing delimiter: the last part runs to the end
        parts.append((current, end))
    return parts


def _delimiters(buf: Buffer, start: int, end: int, needle: bytes):
    """(start, end, closing?) of each boundary line `--boundary[--][ \t]*` + line end."""
    pos = start
    while True:
        p = buf.find(needle, pos, end)
        if p < 0:
            return
        pos = p + 1
        if p != 0 and buf[p - 1:p] != b"\n":
            continue
        q = p + len(needle)
        closing = q + 2 <= end and buf[q:q + 2] == b"--"
        if closing:
            q += 2
        while q < end and buf[q:q + 1] in (b" ", b"\t"):
            q += 1
        if q >= end:
            line_end = end
        elif buf[q:q + 1] == b"\n":
            line_end = q + 1
        elif q + 2 <= end and buf[q:q + 2] == b"\r\n":
            line_end = q + 2
        else:
            continue
        yield p, line_end, closing
        pos = line_end


def field_value(buf: Buffer, part: Part, name: bytes) -> Optional[bytes]:
    """The unfolded value of the first field `name` (lower case), or None."""
    for n, s, e in part.headers:
        if n == name:
            raw = bytes(buf[s:e])
            value = raw.split(b":", 1)[1]
            return re.sub(rb"\r?\n(?=[ \t])", b"", value).strip()
    return None


_TOKEN = rb"[^\s()<>@,;:\\\"/\[\]?=]+"
_PARAM = re.compile(rb";\s*(" + _TOKEN + rb")\s*=\s*(\"(?:[^\"\\]|\\.)*\"|[^;\s]*)", re.S)


def parse_content_type(value: Optional[bytes], default: bytes = b"text/plain"
                       ) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """(type, subtype, params) in lower case (values keep their case: the boundary is
    case-sensitive, RFC 2046 §5.1.1). Malformed values fall back to the default type."""
    maintype, _, subtype = default.partition(b"/")
    if not value:
        return maintype, subtype, []
    m = re.match(rb"\s*(" + _TOKEN + rb")\s*/\s*(" + _TOKEN + rb")", value)
    if not m:
        return maintype, subtype, []
    return m.group(1).lower(), m.group(2).lower(), parse_params(value[m.end():])


def parse_params(rest: bytes) -> list[tuple[bytes, bytes]]:
    params = []
    for m in _PARAM.finditer(rest):
        v = m.group(2)
        if v.startswith(b'"') and v.endswith(b'"') and len(v) >= 2:
            v = re.sub(rb"\\(.)", rb"\1", v[1:-1])
        params.append((m.group(1).lower(), v))
    return params


def param(params: list[tuple[bytes, bytes]], name: bytes) -> Optional[bytes]:
    for k, v in params:
        if k == name:
            return v
    return None


# -- sections -----------------------------------------------------------------------------------

class NoSuchPart(Exception):
    pass


def find_part(root: Part, path: list[int]) -> Part:
    """The part a section path like [2, 1] names (RFC 3501 §6.4.5 BODY[<section>])."""
    part = root
    for i, n in enumerate(path):
        # Below a message/rfc822 part, numbering continues in the encapsulated message's body.
        # Not at the top: the root is the message itself, and its part 1 (when it is not
        # multipart) is its whole body, an encapsulated message included (RFC 3501 §6.4.5).
        if i and part.message is not None:
            part = part.message
        if part.maintype == b"multipart":
            if not 1 <= n <= len(part.children):
                raise NoSuchPart(n)
            part = part.children[n - 1]
        elif n == 1:
            pass  # part 1 of a single-part entity is its body
        else:
            raise NoSuchPart(n)
    return part


Piece = Union[bytes, tuple[int, int]]  # literal bytes, or (offset, length) of the source


def section(buf: Buffer, root: Part, path: list[int], text: Optional[bytes],
            names: Optional[list[bytes]] = None) -> Piece:
    """BODY[path.text] as bytes or a file range; text is None, HEADER, HEADER.FIELDS[.NOT],
    TEXT or MIME (upper case)."""
    part = find_part(root, path) if path else root
    if text is None:
        if not path:
            return (root.start, root.end - root.start)
        return (part.body_start, part.end - part.body_start)
    if text == b"MIME":
        if not path:
            raise NoSuchPart("MIME")
        return (part.start, part.body_start - part.start)
    # HEADER/TEXT of a part number refer to the encapsulated message of a message/rfc822 part.
    msg = part if not path else part.message
    if msg is None:
        raise NoSuchPart(text)
    if text == b"HEADER":
        return (msg.start, msg.body_start - msg.start)
    if text == b"TEXT":
        return (msg.body_start, msg.end - msg.body_start)
    if text in (b"HEADER.FIELDS", b"HEADER.FIELDS.NOT"):
        wanted = {n.lower() for n in names or []}
        negate = text.endswith(b".NOT")
        out = [bytes(buf[s:e]) for n, s, e in msg.headers if (n in wanted) != negate]
        # The result ends with the blank line that ends a header block (RFC 3501 §6.4.5 example).
        return b"".join(_crlf(f) for f in out) + b"\r\n"
    raise NoSuchPart(text)


def _crlf(field_bytes: bytes) -> bytes:
    return field_bytes if field_bytes.endswith(b"\n") else field_bytes + b"\r\n"


# -- ENVELOPE and BODYSTRUCTURE -----------------------------------------------------------------

class Literal(bytes):
    """Marks a value the serialiser must send as a literal/quoted string, never as an atom."""


NIL = None


def envelope(buf: Buffer, msg: Part) -> list:
    """RFC 3501 §7.4.2 ENVELOPE, as a nested list for `serialize`."""
    def f(name: bytes) -> Optional[bytes]:
        return field_value(buf, msg, name)

    frm = addresses(f(b"from"))
    sender = addresses(f(b"sender")) or frm
    reply_to = addresses(f(b"reply-to")) or frm
    return [Literal(v) if v is not None else None for v in (f(b"date"), f(b"subject"))] + [
        frm or None, sender or None, reply_to or None,
        addresses(f(b"to")) or None, addresses(f(b"cc")) or None, addresses(f(b"bcc")) or None,
    ] + [Literal(v) if v is not None else None for v in (f(b"in-reply-to"), f(b"message-id"))]


def addresses(value: Optional[bytes]) -> list:
    """An ENVELOPE address list (RFC 3501 §7.4.2): (name adl mailbox host) per address; a
    group is (NIL NIL "group name" NIL), its members, then (NIL NIL NIL NIL)."""
    if not value:
        return []
    def enc(b: Optional[bytes]) -> Optional[Literal]:
        return Literal(b) if b else None
    out: list = []
    for item in parse_address_list(value):
        if item[0] == "group":
            out.append([None, None, enc(item[1]) or Literal(b""), None])
        elif item[0] == "end":
            out.append([None, None, None, None])
        else:
            _, name, route, local, domain = item
            out.append([enc(name), enc(route), enc(local), enc(domain)])
    return out


_ADDR_TOKEN = re.compile(rb'''
    (?P<ws>[ \t\r\n]+)
  | (?P<qs>"(?:[^"\\]|\\.)*"?)
  | (?P<dl>\[(?:[^\]\\]|\\.)*\]?)
  | (?P<sp>[<>:;@,.])
  | (?P<atom>[^ \t\r\n"()<>\[\]:;@,.\\]+|\\.?)
''', re.X | re.S)


def _address_tokens(value: bytes) -> list[tuple[str, bytes]]:
    """(kind, text) tokens of an address header: atom, qs (unquoted), dl, sp, comment."""
    out: list[tuple[str, bytes]] = []
    pos, n = 0, len(value)
    while pos < n:
        if value[pos:pos + 1] == b"(":
            # A comment, nested comments and quoted pairs inside (RFC 5322 §3.2.2).
            depth, q, text = 0, pos, bytearray()
            while q < n:
                c = value[q:q + 1]
                if c == b"\\" and q + 1 < n:
                    text += value[q + 1:q + 2]
                    q += 2
                    continue
                if c == b"(":
                    depth += 1
                    if depth > 1:
                        text += c
                elif c == b")":
                    depth -= 1
                    if depth == 0:
                        q += 1
                        break
                    text += c
                else:
                    text += c
                q += 1
            out.append(("comment", bytes(text).strip()))
            pos = q
            continue
        if value[pos:pos + 1] == b")":
            pos += 1  # a stray closing parenthesis: ignore it
            continue
        m = _ADDR_TOKEN.match(value, pos)
        if m is None:  # cannot happen: every octet matches one alternative
            pos += 1
            continue
        kind = m.lastgroup or "atom"
        text = m.group()
        pos = m.end()
        if kind == "ws":
            continue
        if kind == "qs":
            text = re.sub(rb"\\(.)", rb"\1", text[1:-1] if text.endswith(b'"') and len(text) > 1
                          else text[1:])
        out.append((kind, text))
    return out


def parse_address_list(value: bytes) -> list[tuple]:
    """An RFC 5322 §3.4 address list, leniently: ("addr", name, route, mailbox, host) for
    each address, ("group", name) and ("end",) around the members of a group. Comments are
    dropped, except that an address without a display name takes its comment as the name
    (`user@domain (Real Name)`), as Dovecot does."""
    toks = _address_tokens(value)
    out: list[tuple] = []
    in_group = False
    words: list[tuple[str, bytes]] = []  # tokens of the current address, comments included
    angle: Optional[list[tuple[str, bytes]]] = None  # tokens inside <...>

    def phrase(ts: list[tuple[str, bytes]]) -> Optional[bytes]:
        parts = [t for k, t in ts if k in ("atom", "qs") or (k == "sp" and t == b".")]
        text = b" ".join(parts).replace(b" . ", b".") if parts else b""
        return text or None

    def flush() -> None:
        nonlocal words, angle
        if angle is not None:
            spec = [t for t in angle if t[0] != "comment"]
            route = None
            colon = next((i for i, t in enumerate(spec) if t == ("sp", b":")), -1)
            if colon >= 0 and spec and spec[0] == ("sp", b"@"):
                route = b"".join(t for _, t in spec[:colon])
                spec = spec[colon + 1:]
            local, domain = _split_spec(spec)
            name = phrase([t for t in words if t[0] != "comment"])
            if local is not None or domain is not None or name is not None:
                out.append(("addr", name, route, local, domain))
        else:
            spec = [t for t in words if t[0] != "comment"]
            if spec:
                local, domain = _split_spec(spec)
                comments = [t for k, t in words if k == "comment" and t]
                out.append(("addr", comments[0] if comments else None, None, local, domain))
        words, angle = [], None

    i = 0
    while i < len(toks):
        kind, text = toks[i]
        i += 1
        if kind == "sp" and text == b"<":
            angle = []
            while i < len(toks) and toks[i] != ("sp", b">"):
                angle.append(toks[i])
                i += 1
            i += 1  # the ">"
        elif kind == "sp" and text == b":" and not in_group and angle is None:
            out.append(("group", phrase(words)))
            words, in_group = [], True
        elif kind == "sp" and text == b";" and in_group:
            flush()
            out.append(("end",))
            in_group = False
        elif kind == "sp" and text == b",":
            flush()
        elif angle is None:
            words.append((kind, text))
    flush()
    if in_group:
        out.append(("end",))
    return out


def _split_spec(spec: list[tuple[str, bytes]]) -> tuple[Optional[bytes], Optional[bytes]]:
    """(local part, domain) of addr-spec tokens; the local part is everything before the
    last "@"."""
    at = max((i for i, t in enumerate(spec) if t == ("sp", b"@")), default=-1)
    def join(ts: list[tuple[str, bytes]]) -> Optional[bytes]:
        text = b"".join(t for _, t in ts)
        return text or None
    if at < 0:
        return join(spec), None
    return join(spec[:at]), join(spec[at + 1:])


def address_strings(value: bytes) -> list[bytes]:
    """`mailbox@host` and `name <mailbox@host>` of each address in a header value, the
    forms SEARCH FROM/TO/CC/BCC also match against (comments removed)."""
    out = []
    for item in parse_address_list(value):
        if item[0] != "addr":
            continue
        _, name, _route, local, domain = item
        addr = (local or b"") + (b"@" + domain if domain else b"")
        out.append(addr)
        if name:
            out.append(name + b" <" + addr + b">")
    return out


def bodystructure(buf: Buffer, part: Part, extensible: bool = True) -> list:
    """RFC 3501 §7.4.2 BODYSTRUCTURE (extensible=True) or BODY."""
    if part.maintype == b"multipart":
        out: list = [bodystructure(buf, c, extensible) for c in part.children]
        if not part.children:  # RFC 3501 requires at least one part: describe an empty one
            out = [[Literal(b"TEXT"), Literal(b"PLAIN"), None, None, None, Literal(b"7BIT"), 0, 0]]
        out.append(Literal(part.subtype.upper()))
        if extensible:
            out += [_params(part.params), _disposition(buf, part), _nstr(buf, part, b"content-language"),
                    _nstr(buf, part, b"content-location")]
        group = _Group(out)
        group.nparts = max(1, len(part.children))
        return group
    size = part.end - part.body_start
    encoding = field_value(buf, part, b"content-transfer-encoding") or b"7BIT"
    out = [Literal(part.maintype.upper()), Literal(part.subtype.upper()), _params(part.params),
           _nstr(buf, part, b"content-id"), _nstr(buf, part, b"content-description"),
           Literal(encoding.upper()), size]
    if part.message is not None:
        out += [envelope(buf, part.message), bodystructure(buf, part.message, extensible),
                _lines(buf, part)]
    elif part.maintype == b"text":
        out.append(_lines(buf, part))
    if extensible:
        out += [_nstr(buf, part, b"content-md5"), _disposition(buf, part),
                _nstr(buf, part, b"content-language"), _nstr(buf, part, b"content-location")]
    return out


class _Group(list):
    """A multipart body: its parts are written without separating spaces (RFC 3501 §9
    body-type-mpart = 1*body SP media-subtype)."""

    nparts = 0


def _lines(buf: Buffer, part: Part) -> int:
    n = count_newlines(buf, part.body_start, part.end)
    if part.end > part.body_start and buf[part.end - 1:part.end] != b"\n":
        n += 1
    return n


def count_newlines(buf: Buffer, start: int, end: int) -> int:
    """LF count in buf[start:end], in 1 MiB steps so an mmap is never copied whole."""
    n = 0
    for pos in range(start, end, 1 << 20):
        n += bytes(buf[pos:min(end, pos + (1 << 20))]).count(b"\n")
    return n


def _params(params: list[tuple[bytes, bytes]]) -> Optional[list]:
    if not params:
        return None
    out: list = []
    for k, v in params:
        out += [Literal(k.upper()), Literal(v)]
    return out


def _nstr(buf: Buffer, part: Part, name: bytes) -> Optional[Literal]:
    v = field_value(buf, part, name)
    return Literal(v) if v is not None else None


def _disposition(buf: Buffer, part: Part) -> Optional[list]:
    v = field_value(buf, part, b"content-disposition")
    if not v:
        return None
    m = re.match(rb"\s*(" + _TOKEN + rb")", v)
    if not m:
        return None
    return [Literal(m.group(1).upper()), _params(parse_params(v[m.end():]))]


# -- serialisation ------------------------------------------------------------------------------

_SAFE_QUOTED = re.compile(rb"^[\x20-\x7e]*$")


def string(value: Optional[bytes]) -> bytes:
    """An IMAP nstring: NIL, a quoted string, or a literal for 8-bit bytes and CR/LF."""
    if value is None:
        return b"NIL"
    if _SAFE_QUOTED.match(value) and len(value) < 1024:
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(value) + value


def serialize(value: object) -> bytes:
    """Nested lists/None/int/bytes as an IMAP parenthesised list (bytes are strings)."""
    if value is None:
        return b"NIL"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, bytes):
        return string(value)
    if isinstance(value, _Group):
        parts = value[:value.nparts]
        rest = value[value.nparts:]
        return b"(" + b"".join(serialize(p) for p in parts) + (
            b" " + b" ".join(serialize(v) for v in rest) if rest else b"") + b")"
    if isinstance(value, list):
        return b"(" + b" ".join(serialize(v) for v in value) + b")"
    raise TypeError(type(value))
