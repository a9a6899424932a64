"""THREAD (RFC 5256 §4): ORDEREDSUBJECT and REFERENCES, and the thread list syntax.

Both work on sort.Item (number, UID, INTERNALDATE, header Fields); no I/O here. Siblings and
threads are ordered by sent date (INTERNALDATE when there is none, §2.2), ties by UID.
"""
from __future__ import annotations

from typing import Optional

from mailsuite.imap.sort import Item


class Node:
    """A thread container: a message (item) or a dummy (item None) for a Message-ID that was
    only referenced."""

    __slots__ = ("item", "parent", "children", "reply")

    def __init__(self, item: Optional[Item] = None):
        self.item = item
        self.parent: Optional[Node] = None
        self.children: list[Node] = []
        self.reply = False

    def is_ancestor_of(self, other: "Node") -> bool:
        n: Optional[Node] = other
        while n is not None:
            if n is self:
                return True
            n = n.parent
        return False

    def unlink(self) -> None:
        if self.parent is not None:
            self.parent.children.remove(self)
            self.parent = None

    def add(self, child: "Node") -> None:
        child.unlink()
        child.parent = self
        self.children.append(child)


def _key(item: Item) -> tuple[float, int]:
    return (item.date, item.uid)


def _first(node: Node) -> Item:
    """The message a container is dated and named by: itself, or a dummy's oldest child."""
    if node.item is not None:
        return node.item
    return min((_first(c) for c in node.children), key=_key)


def _sort(nodes: list[Node]) -> None:
    nodes.sort(key=lambda n: _key(_first(n)))


# -- ORDEREDSUBJECT -----------------------------------------------------------------------------

def orderedsubject(items: list[Item]) -> list[Node]:
    """RFC 5256 §4, ORDEREDSUBJECT: sorted by (base subject, sent date); each run of one base
    subject is a thread, its first message the parent of all the others."""
    ordered = sorted(items, key=lambda it: (it.fields.subject if it.fields else "",) + _key(it))
    roots: list[Node] = []
    current: Optional[Node] = None
    subject: Optional[str] = None
    for it in ordered:
        s = it.fields.subject if it.fields else ""
        if current is None or s != subject:
            current, subject = Node(it), s
            roots.append(current)
        else:
            current.add(Node(it))
    _sort(roots)
    return roots


# -- REFERENCES ---------------------------------------------------------------------------------

def references(items: list[Item]) -> list[Node]:
    """RFC 5256 §4, REFERENCES, steps 1-6."""
    table: dict[str, Node] = {}
    nodes: list[Node] = []
    # (1) link messages by Message-ID, References / In-Reply-To.
    for it in sorted(items, key=lambda i: i.uid):
        f = it.fields
        mid = f.message_id if f else None
        node = table.get(mid) if mid is not None else None
        if node is not None and node.item is None:
            node.item = it  # (1A) a container created by an earlier reference
        else:
            node = Node(it)
            if mid is not None and mid not in table:
                table[mid] = node
            # else: no Message-ID, or a duplicate: a unique one of its own (not in the table)
        nodes.append(node)
        refs = [table.setdefault(r, Node()) for r in (f.references if f else ())]
        # (1B) link the references in order, never changing an existing link or making a loop.
        for parent, child in zip(refs, refs[1:]):
            if child.parent is None and parent is not child and not child.is_ancestor_of(parent):
                parent.add(child)
        # (1C) the last reference is the parent, none: a root. An existing parent (presumed
        # from another message's References) goes first, even when the new link would loop.
        node.unlink()
        parent = refs[-1] if refs else None
        if parent is not None and not node.is_ancestor_of(parent):
            parent.add(node)
    # (2) the root set; (3) the ID table is no longer needed.
    roots = [n for n in table.values() if n.parent is None]
    in_table = _set(roots)
    roots += [n for n in nodes if n.parent is None and n not in in_table]
    # (4) prune dummies: a dummy without children goes; a dummy's children move up to its
    # parent, except under a root dummy with more than one child.
    roots = _prune_roots(roots)
    _sort(roots)
    # (5) gather threads with the same base subject.
    roots = _gather_subjects(roots)
    # (6) sort every set of siblings.
    _sort(roots)
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n.children:
            _sort(n.children)
            stack.extend(n.children)
    return roots


class _IdSet:
    def __init__(self, nodes: list[Node]):
        self.ids = {id(n) for n in nodes}

    def __contains__(self, n: Node) -> bool:
        return id(n) in self.ids


def _set(nodes: list[Node]) -> _IdSet:
    return _IdSet(nodes)


def _prune_below(node: Node) -> None:
    """Replace every dummy below `node` by its (pruned) children, iteratively."""
    stack = [node]
    while stack:
        n = stack.pop()
        out: list[Node] = []
        pending = n.children[::-1]  # popped from the end: in order
        while pending:
            c = pending.pop()
            if c.item is None:
                pending.extend(c.children[::-1])  # promote a dummy's children to this level
                c.children = []
                c.parent = None
                continue
            c.parent = n
            out.append(c)
            stack.append(c)
        n.children = out


def _prune_roots(roots: list[Node]) -> list[Node]:
    out: list[Node] = []
    for r in roots:
        _prune_below(r)
        if r.item is None:
            if not r.children:
                continue
            if len(r.children) == 1:
                child = r.children[0]
                child.parent = None
                r.children = []
                out.append(child)
                continue
        out.append(r)
    return out


def _gather_subjects(roots: list[Node]) -> list[Node]:
    """Step 5: threads whose roots share a base subject are merged."""
    subjects: dict[str, Node] = {}
    subject_of: dict[int, str] = {}
    for r in roots:
        first = _first(r)
        s = first.fields.subject if first.fields else ""
        if r.item is None:
            r.reply = first.fields.reply if first.fields else False
        else:
            r.reply = r.item.fields.reply if r.item.fields else False
        if not s:
            continue
        subject_of[id(r)] = s
        old = subjects.get(s)
        if old is None:
            subjects[s] = r
        elif old.item is not None and (r.item is None or (old.reply and not r.reply)):
            subjects[s] = r
    out: list[Node] = []
    gone: set[int] = set()
    for r in roots:
        s = subject_of.get(id(r))
        t = subjects.get(s) if s is not None else None
        if t is None or t is r:
            out.append(r)
            continue
        if r.item is None and t.item is None:  # both dummies: the children become siblings
            for c in list(r.children):
                t.add(c)
            gone.add(id(r))
        elif t.item is None or (r.reply and not t.reply):
            t.add(r)
            gone.add(id(r))
        else:
            dummy = Node()
            dummy.reply = t.reply
            dummy.add(t)
            dummy.add(r)
            subjects[s] = dummy
            gone.add(id(t))
            gone.add(id(r))
            out.append(dummy)
    return [r for r in out if id(r) not in gone]


# -- output -------------------------------------------------------------------------------------

def format_threads(roots: list[Node]) -> bytes:
    """The THREAD response's thread list (RFC 5256 §5): a chain of only children is written
    flat, several children each in parentheses, a dummy as an empty member. Iterative: a
    hostile folder may nest threads thousands deep."""
    out: list[bytes] = []
    stack: list[object] = list(reversed(roots))
    while stack:
        v = stack.pop()
        if isinstance(v, bytes):
            out.append(v)
            continue
        n = v
        parts: list[bytes] = []
        while True:
            if n.item is not None:
                parts.append(b"%d" % n.item.num)
                if len(n.children) == 1:
                    n = n.children[0]
                    continue
            break
        out.append(b"(" + b" ".join(parts))
        if n.children:
            if parts:
                out.append(b" ")
            stack.append(b")")
            stack.extend(reversed(n.children))
        else:
            out.append(b")")
    return b"".join(out)
