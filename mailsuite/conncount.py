"""The connections of every worker process, counted together (docs/design/limits.md, "Across
worker processes").

With `[server] workers = N` the first process makes one `ConnectionTable` before it starts any
worker: a memfd (or an unlinked file in data_dir) mapped shared, one row per process (row 0 the
first process, row K the worker of Supervisor slot K). Each worker inherits its descriptor and
maps it too. A process writes only its own row, from the reactor thread (one writer per aligned
32-bit cell), and reads all of them.

In a row, each shared listener has two exact cells (its connections, its pre-auth connections)
and three count-min sketches of `DEPTH` x `WIDTH` cells (connections per address, pre-auth
connections per address, pre-auth connections per network prefix). A key's estimate in a row is
the least of its `DEPTH` cells: never below the truth, above it only when other keys share all
its cells. So another process's connections can make a listener refuse early, never admit more.
"""
from __future__ import annotations

import functools
import hashlib
import mmap
import os
import tempfile
from typing import Any, NamedTuple, Sequence

DEPTH = 2  # hash rows of a sketch
WIDTH = 2048  # cells per hash row
_SKETCH = DEPTH * WIDTH
_CONNS, _PREAUTH = 0, 1  # the exact cells of a listener
_IP, _PREAUTH_IP, _PREFIX = 2, 2 + _SKETCH, 2 + 2 * _SKETCH  # where its sketches start
_LISTENER_CELLS = 2 + 3 * _SKETCH
_CELL = 4  # octets: a signed 32-bit cell


class Elsewhere(NamedTuple):
    """What the other processes hold on one listener (sketch figures are upper bounds)."""

    ip: int = 0  # connections of the address
    preauth_ip: int = 0  # pre-auth connections of the address
    preauth_prefix: int = 0  # pre-auth connections of its network prefix
    total: int = 0
    preauth: int = 0


NOWHERE = Elsewhere()  # a process without a table: nothing is held elsewhere


class ConnectionTable:
    """The shared rows of `rows` processes, for the listeners `names`; this process is `slot`.

    Make it with `create` (the first process) or `attach` (a worker, on the inherited
    descriptor); `listener(name)` gives the counts one LimitedFactory keeps and reads."""

    def __init__(self, fd: int, names: Sequence[str], slot: int, keep: Any = None):
        self.names = tuple(names)
        self.row_bytes = _row_bytes(len(self.names))
        size = os.fstat(fd).st_size
        self.rows = size // self.row_bytes
        if not 0 <= slot < self.rows:
            raise ValueError(f"slot {slot} is not one of the table's {self.rows} rows")
        self.slot = slot
        self._fd = fd
        self._keep = keep  # the temporary file object of the fallback, open while we are
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.cells = memoryview(self._map).cast("i")

    @classmethod
    def create(cls, rows: int, names: Sequence[str], spill_dir: str) -> "ConnectionTable":
        """A zeroed table of `rows` rows; this process is row 0. A memfd where the system has
        them, else an unlinked file in `spill_dir` (data_dir)."""
        keep = None
        try:
            fd = os.memfd_create("mailsuite-connections")
        except (AttributeError, OSError):
            keep = tempfile.TemporaryFile(dir=spill_dir)
            fd = keep.fileno()
        os.ftruncate(fd, rows * _row_bytes(len(names)))  # a new file reads as zeros
        return cls(fd, names, 0, keep)

    @classmethod
    def attach(cls, fd: int, names: Sequence[str], slot: int) -> "ConnectionTable":
        """The table a worker inherited as `fd`, as the process of row `slot`. Its row is
        zeroed: the process that had it before is dead, and its connections with it."""
        table = cls(fd, names, slot)
        table.clear(slot)
        return table

    def fileno(self) -> int:
        return self._fd

    def clear(self, slot: int) -> None:
        """Zero the row of `slot`. Only for our own row, or the row of a process known dead."""
        start = slot * self.row_bytes
        self._map[start:start + self.row_bytes] = bytes(self.row_bytes)

    def listener(self, name: str) -> "ListenerCounts":
        index = self.names.index(name)
        bases = [row * self.row_bytes // _CELL + index * _LISTENER_CELLS
                 for row in range(self.rows)]
        own = bases.pop(self.slot)
        return ListenerCounts(self.cells, own, bases)


class ListenerCounts:
    """One listener's cells: `add` writes this process's row, `elsewhere` reads the others."""

    def __init__(self, cells: memoryview, own: int, others: list[int]):
        self._cells = cells
        self._own = own
        self._others = others

    def add(self, ip: str, prefix: str, connections: int, preauth: int) -> None:
        """Count `connections` more (or fewer) connections of `ip`, and `preauth` more (or
        fewer) pre-auth ones of `ip` in `prefix`, in our row."""
        cells, base = self._cells, self._own
        if connections:
            cells[base + _CONNS] += connections
            for i in key_cells(ip):
                cells[base + _IP + i] += connections
        if preauth:
            cells[base + _PREAUTH] += preauth
            for i in key_cells(ip):
                cells[base + _PREAUTH_IP + i] += preauth
            for i in key_cells(prefix):
                cells[base + _PREFIX + i] += preauth

    def elsewhere(self, ip: str, prefix: str) -> Elsewhere:
        """The other processes' connections that count with a newcomer from `ip`."""
        cells = self._cells
        a, b = key_cells(ip)  # DEPTH == 2, spelt out: this runs for every row on every accept
        p, q = key_cells(prefix)
        on_ip = preauth_ip = preauth_prefix = total = preauth = 0
        for base in self._others:
            total += cells[base + _CONNS]
            preauth += cells[base + _PREAUTH]
            on_ip += min(cells[base + _IP + a], cells[base + _IP + b])
            preauth_ip += min(cells[base + _PREAUTH_IP + a], cells[base + _PREAUTH_IP + b])
            preauth_prefix += min(cells[base + _PREFIX + p], cells[base + _PREFIX + q])
        return Elsewhere(on_ip, preauth_ip, preauth_prefix, total, preauth)


@functools.lru_cache(maxsize=4096)
def key_cells(key: str) -> tuple[int, ...]:
    """The cell of `key` in each hash row of a sketch, as offsets into the sketch. The hash is
    the same in every process (Python's hash() of a str is salted per process)."""
    digest = hashlib.blake2b(key.encode(), digest_size=4 * DEPTH).digest()
    return tuple(row * WIDTH + int.from_bytes(digest[4 * row:4 * row + 4], "little") % WIDTH
                 for row in range(DEPTH))


def _row_bytes(listeners: int) -> int:
    """A row's size, whole pages: no two processes write into one page."""
    size = listeners * _LISTENER_CELLS * _CELL
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
