"""Streaming row writers (CSV, JSON Lines) with crash-safe resume.

Every row is ``path0, path1, lpips, error``: ``lpips`` is the distance written with full float
precision (``repr``), empty/null on an error row; ``error`` is a one-line reason, empty/null on a
scored row. Rows are flushed after every batch, so a process killed at any moment leaves whole
rows plus at most one partial last line; ``read_existing`` drops that partial line (truncating
the file) and returns the rows already there, which ``--resume`` skips.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Iterable, TextIO

__all__ = ["Row", "COLUMNS", "RowWriter", "read_existing", "looks_like", "format_from_path", "Stats", "ExistingRows"]

COLUMNS = ("path0", "path1", "lpips", "error")


@dataclass
class Row:
    """One result: the two paths (as shown in the output), the distance or an error reason."""

    path0: str
    path1: str
    lpips: float | None = None
    error: str | None = None
    index: int = -1  # position in the job (ordering only; not written)

    @property
    def key(self) -> tuple[str, str]:
        return (self.path0, self.path1)

    def as_dict(self) -> dict:
        return {"path0": self.path0, "path1": self.path1, "lpips": self.lpips, "error": self.error}


def format_from_path(path: str | None, fmt: str | None) -> str:
    """Explicit ``fmt`` wins; otherwise ``.jsonl``/``.json``/``.ndjson`` -> jsonl, else csv."""
    if fmt:
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"format: got {fmt!r}, expected 'csv' or 'jsonl'")
        return fmt
    if path and os.path.splitext(path)[1].lower() in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    return "csv"


@dataclass
class Stats:
    """Running count/errors/mean/std/min/max (Welford, float64)."""

    count: int = 0
    errors: int = 0
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def add(self, row: Row) -> None:
        self.count += 1
        if row.error is not None or row.lpips is None:
            self.errors += 1
            return
        self.add_value(float(row.lpips))

    def add_value(self, v: float) -> None:
        self.n += 1
        d = v - self.mean
        self.mean += d / self.n
        self.m2 += d * (v - self.mean)
        self.min = min(self.min, v)
        self.max = max(self.max, v)

    def add_values(self, values) -> None:
        """Many scored values at once (Chan et al.'s merge of two Welford summaries)."""
        import numpy as np

        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.size == 0:
            return
        self.count += v.size
        nb, mb = v.size, float(v.mean())
        m2b = float(((v - mb) ** 2).sum())
        n = self.n + nb
        d = mb - self.mean
        self.mean += d * nb / n
        self.m2 += m2b + d * d * self.n * nb / n
        self.n = n
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1); 0 for fewer than two values."""
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0

    @property
    def stderr(self) -> float:
        """Standard error of the mean, ``std / sqrt(n)``."""
        return self.std / math.sqrt(self.n) if self.n > 0 else 0.0


def _csv_field(text: str) -> str:
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _clean(text: str | None) -> str | None:
    return None if text is None else " ".join(str(text).split())


@dataclass
class ExistingRows:
    keys: set = field(default_factory=set)
    rows: list = field(default_factory=list)
    truncated_bytes: int = 0


def _truncate_partial_tail(path: str) -> int:
    """Cut a partial last line (no trailing newline) off ``path``; returns the bytes removed."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Scan back for the last newline.
        pos = size
        block = 1 << 16
        keep = 0
        while pos > 0:
            lo = max(0, pos - block)
            f.seek(lo)
            chunk = f.read(pos - lo)
            j = chunk.rfind(b"\n")
            if j >= 0:
                keep = lo + j + 1
                break
            pos = lo
        f.truncate(keep)
        return size - keep


def looks_like(path: str, fmt: str) -> str | None:
    """None if ``path`` is empty or starts like an lpips-fast ``fmt`` file, else what is wrong."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.strip():
        return None
    first = head.split(b"\n", 1)[0]
    if fmt == "csv":
        if first.startswith(b"path0,path1,lpips,error") or (b"\n" not in head and b"path0,path1,lpips,error".startswith(first)):
            return None
        return f"the file does not start with the csv header {','.join(COLUMNS)} (wrong --format?)"
    if first.startswith(b"{"):
        return None
    return "the file is not JSON Lines (wrong --format?)"


def read_existing(path: str, fmt: str) -> ExistingRows:
    """Rows already in ``path`` (for ``--resume``); a partial last line is truncated away.

    A CSV row with the wrong number of fields or a JSON line that does not parse is ignored (its
    pair is scored again and appended).
    """
    out = ExistingRows()
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return out
    out.truncated_bytes = _truncate_partial_tail(path)
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        if fmt == "csv":
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return out
            if tuple(header) != COLUMNS:
                raise ValueError(
                    f"{path}: cannot resume, the header is {header} (expected {list(COLUMNS)}); "
                    f"is it a {fmt} file written by lpips-fast?"
                )
            for rec in reader:
                if len(rec) != 4:
                    continue
                p0, p1, v, err = rec
                try:
                    val = float(v) if v != "" else None
                except ValueError:
                    continue
                row = Row(p0, p1, val, err if err != "" else None)
                if row.lpips is None and row.error is None:
                    continue
                out.keys.add(row.key)
                out.rows.append(row)
        else:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    d = json.loads(line)
                    row = Row(str(d["path0"]), str(d["path1"]), None if d.get("lpips") is None else float(d["lpips"]), d.get("error"))
                except (ValueError, KeyError, TypeError):
                    continue
                if row.lpips is None and row.error is None:
                    continue
                out.keys.add(row.key)
                out.rows.append(row)
    return out


class RowWriter:
    """Append rows to a file (or stdout) as CSV or JSON Lines, flushed after every ``write``."""

    def __init__(self, path: str | None, fmt: str = "csv", *, append: bool = False, stream: TextIO | None = None):
        self.path = path
        self.fmt = fmt
        if path is None or path == "-":
            self._f = stream if stream is not None else sys.stdout
            self._own = False
            need_header = True
        else:
            exists = append and os.path.exists(path) and os.path.getsize(path) > 0
            self._f = open(path, "a" if append else "w", newline="", encoding="utf-8", errors="surrogateescape")
            self._own = True
            need_header = not exists
        self._csv = csv.writer(self._f, lineterminator="\n") if fmt == "csv" else None
        if fmt == "csv" and need_header:
            self._csv.writerow(COLUMNS)
            self.flush()

    def write(self, rows: Iterable[Row]) -> None:
        if self.fmt == "csv":
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            for r in rows:
                w.writerow([r.path0, r.path1, "" if r.lpips is None else repr(float(r.lpips)), _clean(r.error) or ""])
            self._f.write(buf.getvalue())
        else:
            self._f.write(
                "".join(
                    json.dumps({"path0": r.path0, "path1": r.path1, "lpips": None if r.lpips is None else float(r.lpips), "error": _clean(r.error)})
                    + "\n"
                    for r in rows
                )
            )
        self.flush()

    def write_pairs(self, path0: str, paths1, values) -> None:
        """Scored rows ``(path0, paths1[k], values[k])`` (no errors), formatted in bulk."""
        if self.fmt == "csv":
            p0 = _csv_field(path0)
            text = "".join(f"{p0},{_csv_field(p1)},{float(v)!r},\n" for p1, v in zip(paths1, values))
        else:
            p0 = json.dumps(path0)
            text = "".join(
                f'{{"path0": {p0}, "path1": {json.dumps(p1)}, "lpips": {float(v)!r}, "error": null}}\n'
                for p1, v in zip(paths1, values)
            )
        self._f.write(text)
        self.flush()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if self._own:
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
            except OSError:
                pass
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
