"""The SORT and THREAD algorithms in memory (mailsuite/imap/sort.py, thread.py): base subject
extraction (RFC 5256 §2.1), header values, sort keys, ORDEREDSUBJECT and REFERENCES with their
edge cases (missing Date, duplicate Message-IDs, loops in References, list-tag subjects), and
the thread list syntax (RFC 5256 §5)."""
from __future__ import annotations

import pytest

from mailsuite.imap import sort as sortmod
from mailsuite.imap import thread as threadmod
from mailsuite.imap.parser import Atom, ParseError
from mailsuite.imap.sort import Item, base_subject, fields_of


@pytest.mark.parametrize("subject,base,reply", [
    ("hello", "hello", False),
    ("Re: hello", "hello", True),
    ("RE: Re: re: hello", "hello", True),
    ("Fwd: hello", "hello", True),
    ("Fw: hello", "hello", True),
    ("Re: [list] Fwd: hello", "hello", True),
    ("[list] Re: hello", "hello", True),
    ("[list] hello", "hello", False),
    ("Re[2]: hello", "hello", True),
    ("Re [list]: hello", "hello", True),
    ("hello (fwd)", "hello", True),
    ("hello (fwd) (FWD)  ", "hello", True),
    ("[Fwd: hello]", "hello", True),
    ("[fwd: Re: [list] hello (fwd)]", "hello", True),
    ("[list]", "[list]", False),  # a blob is kept when nothing would be left (step 4)
    ("[a][b] hello", "hello", False),
    ("  \thello\t  world  ", "hello world", False),
    ("", "", False),
    ("Re:", "", True),
    ("Reply: hello", "Reply: hello", False),
    ("Fwd hello", "Fwd hello", False),
])
def test_base_subject(subject, base, reply):
    assert base_subject(subject) == (base, reply)


def header(**fields: str) -> bytes:
    return "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in fields.items()).encode() + b"\r\n"


def test_fields_of_decodes_and_folds():
    f = fields_of(header(Subject="=?UTF-8?Q?Re=3A_Gr=C3=BC=C3=9Fe?=", From='"Zed" <zed@a.example>',
                         To="bob@b.example", Cc="grp: x@c.example;",
                         Date="Fri, 22 Feb 2008 02:00:00 +0200", Message_ID="<m1@x>",
                         References="<r1@x> <r2@x>", In_Reply_To="<other@x>"))
    assert f.subject == "GRÜSSE" and f.reply
    assert (f.from_, f.display_from, f.to, f.display_to, f.cc) == ("ZED", "ZED", "BOB", "BOB@B.EXAMPLE", "GRP")
    assert f.sent == 1203638400.0  # 2008-02-22T00:00:00Z
    assert f.message_id == "m1@x" and f.references == ("r1@x", "r2@x")


def test_fields_of_missing_and_bad_headers():
    f = fields_of(header(Date="not a date", In_Reply_To="junk <p@x> <q@x>"))
    assert f.sent is None and f.subject == "" and f.from_ == "" and f.message_id is None
    assert f.references == ("p@x",)  # only the first In-Reply-To id, without References
    assert fields_of(b"").subject == ""


def item(num: int, date: float | None = None, internal: float = 0.0, size: int = 0, **hdr: str) -> Item:
    if date is not None:
        import email.utils
        hdr["Date"] = email.utils.formatdate(date)
    return Item(num, num, size, internal, fields_of(header(**hdr)))


def test_parse_criteria():
    assert sortmod.parse_criteria([Atom(b"REVERSE"), Atom(b"date"), Atom(b"SIZE")]) == [
        (b"DATE", True), (b"SIZE", False)]
    for bad in ([], [Atom(b"REVERSE")], [Atom(b"NOPE")], [Atom(b"REVERSE"), Atom(b"REVERSE"), Atom(b"SIZE")],
                Atom(b"SIZE")):
        with pytest.raises(ParseError):
            sortmod.parse_criteria(bad)


def test_sort_keys_and_ties():
    items = [item(1, date=300, size=10, Subject="Re: b", From="c@x"),
             item(2, date=100, size=30, Subject="a", From="a@x"),
             item(3, date=None, internal=200, size=20, Subject="[l] B", From="b@x"),  # no Date
             item(4, date=100, size=10, Subject="A", From="a@y")]
    c = sortmod.parse_criteria
    assert sortmod.sort_items(items, c([Atom(b"DATE")])) == [2, 4, 3, 1]
    assert sortmod.sort_items(items, c([Atom(b"SUBJECT")])) == [2, 4, 1, 3]
    assert sortmod.sort_items(items, c([Atom(b"SUBJECT"), Atom(b"REVERSE"), Atom(b"DATE")])) == [2, 4, 1, 3]
    assert sortmod.sort_items(items, c([Atom(b"SIZE"), Atom(b"REVERSE"), Atom(b"DATE")])) == [1, 4, 3, 2]
    # REVERSE reverses the key; ties keep the sequence order (RFC 5256 §3).
    assert sortmod.sort_items(items, c([Atom(b"REVERSE"), Atom(b"FROM")])) == [1, 3, 2, 4]
    assert sortmod.sort_items(items, c([Atom(b"REVERSE"), Atom(b"SIZE")])) == [2, 3, 1, 4]


def refs(num: int, mid: str | None, references: str = "", subject: str = "", date: float | None = None,
         internal: float | None = None, **extra: str) -> Item:
    hdr = dict(extra)
    if mid:
        hdr["Message_ID"] = f"<{mid}>"
    if references:
        hdr["References"] = " ".join(f"<{r}>" for r in references.split())
    if subject:
        hdr["Subject"] = subject
    return item(num, date=date if date is not None else (None if internal is not None else num * 100),
                internal=internal or 0.0, **hdr)


def thread(items, algorithm=threadmod.references) -> bytes:
    return threadmod.format_threads(algorithm(items))


def test_references_rfc_example_shape():
    # The thread list of RFC 5256 §5: (2)(3 6 (4 23)(44 7 96))
    items = [refs(2, "m2"), refs(3, "m3"), refs(6, "m6", "m3"), refs(4, "m4", "m3 m6"),
             refs(23, "m23", "m3 m6 m4"), refs(44, "m44", "m3 m6"), refs(7, "m7", "m3 m6 m44"),
             refs(96, "m96", "m3 m6 m44 m7")]
    assert thread(items) == b"(2)(3 6 (4 23)(44 7 96))"


def test_references_dummy_parent_and_promotion():
    # Two replies to a message we do not have: a dummy root with two children.
    assert thread([refs(1, None, "a@b"), refs(2, None, "a@b")]) == b"((1)(2))"
    # One reply to a missing message: promoted to the root, then merged by subject.
    assert thread([refs(1, "a@b", subject="foo"), refs(2, "b@b", "c@b", subject="Re: foo")]) == b"(1 2)"
    # A missing message in the middle of a chain disappears; its child moves up.
    assert thread([refs(1, "a"), refs(2, "c", "a b")]) == b"(1 2)"


def test_references_duplicate_message_ids():
    assert thread([refs(1, "a@b"), refs(2, "a@b")]) == b"(1)(2)"
    # The first message keeps the id; the duplicate is a thread of its own.
    assert thread([refs(1, "a"), refs(2, "b", "a"), refs(3, "c", "b"), refs(4, "b", "a")]) == b"(1 (2 3)(4))"
    assert thread([refs(1, "a", subject="foo"), refs(2, "a", subject="Re: foo")]) == b"(1 2)"


def test_references_loops():
    # b's References claim a is below c; c says it is below b: no loop is ever linked.
    items = [refs(1, "a", internal=300), refs(2, "b", "a c", internal=100), refs(3, "c", "b", internal=200)]
    for it in items:
        object.__setattr__(it, "fields", fields_of(header(
            Message_ID=f"<{it.fields.message_id}>",
            **({"References": " ".join(f"<{r}>" for r in it.fields.references)} if it.fields.references else {}))))
    assert thread(items) == b"(3 2)(1)"
    # A message that references itself, and two that reference each other.
    assert thread([refs(1, "a", "a")]) == b"(1)"
    assert thread([refs(1, "a", "b"), refs(2, "b", "a")]) in (b"(1 2)", b"(2 1)")
    # A long References chain with a loop in the middle terminates.
    assert thread([refs(1, "x", "p q r p q x")]) == b"(1)"


def test_references_missing_date_uses_internaldate():
    items = [refs(1, "a", internal=500), refs(2, "b", internal=100), refs(3, "c", "a", date=50)]
    assert thread(items) == b"(2)(1 3)"


def test_references_subject_merging():
    # Same base subject, no references: the non-reply becomes the parent.
    assert thread([refs(1, "a", subject="Re: [list] Fwd: hello"), refs(2, "b", subject="hello")]) == b"(2 1)"
    # Neither is a reply: both under a dummy.
    assert thread([refs(1, "a", subject="hello"), refs(2, "b", subject="HELLO")]) == b"((1)(2))"
    # Empty subjects are never merged.
    assert thread([refs(1, "a"), refs(2, "b")]) == b"(1)(2)"


def test_orderedsubject():
    items = [refs(1, None, subject="b", date=100), refs(2, None, subject="a", date=300),
             refs(3, None, subject="Re: a", date=200), refs(4, None, subject="c", date=50),
             refs(5, None, subject="[x] Re: a", date=400), refs(6, None, subject="b", date=500)]
    assert thread(items, threadmod.orderedsubject) == b"(4)(1 6)(3 (2)(5))"


def test_format_deep_threads_iteratively():
    items = [refs(1, "m1")] + [refs(i, f"m{i}", f"m{i - 1}") for i in range(2, 3000)]
    out = thread(items)
    assert out.startswith(b"(1 2 3 ") and out.endswith(b" 2999)")
    # Branches nested deeply: every level has two children.
    items = [refs(1, "n1")]
    for i in range(2, 4001, 2):
        items.append(refs(i, f"n{i}", f"n{i - 2 if i > 2 else 1}"))
        items.append(refs(i + 1, f"n{i + 1}", f"n{i - 2 if i > 2 else 1}"))
    assert thread(items).count(b"(") == thread(items).count(b")")
