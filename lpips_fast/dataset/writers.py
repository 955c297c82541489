"""Streaming row writers (CSV, JSON Lines) with crash-safe resume.

Every row is ``path0, path1, lpips, error``: ``lpips`` is the distance written with full float
precision (``repr``), empty/null on an error row; ``error`` is a one-line reason, empty/null on a
scored row. Rows are flushed after every batch, so a process killed at any moment leaves whole
rows plus at most one partial last record; ``read_existing`` drops that partial record
(truncating the file; CSV records are found by parsing quotes, so a quoted field holding a newline
is never split) and returns the rows already there, which ``--resume`` skips.

File names that are not valid UTF-8 (``os.fsdecode``'s surrogate escapes) are written to files
byte for byte (``surrogateescape``) and read back the same; on a text stream such as stdout they
are written with backslash escapes. ``RunOutput`` checks an output before any work (writable, a
regular file, not one of the inputs, on ``--resume`` the same format and the same settings,
recorded in the sidecar ``OUT.lpips-run.json``).
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

from ..errors import OptionError, row_error_kind

__all__ = [
    "Row", "COLUMNS", "RowWriter", "read_existing", "looks_like", "format_from_path", "Stats", "ExistingRows",
    "RunOutput", "settings_path", "check_new_file", "OutputWriteError",
]

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
    error_kinds: dict = field(default_factory=dict)  # row_error_kind -> count

    def add(self, row: Row) -> None:
        self.count += 1
        if row.error is not None or row.lpips is None:
            self.errors += 1
            kind = row_error_kind(row.error or "")
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
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


def _complete_csv_prefix(data: bytes) -> int:
    """Length of the longest prefix of ``data`` made of whole CSV records (each ending with a
    newline outside quotes). Between two quote characters (``""`` escapes count as two) the text
    is inside a quoted field, so the segments of ``data.split(b'"')`` alternate outside/inside."""
    parts = data.split(b'"')
    offsets = []
    pos = 0
    for p in parts:
        offsets.append(pos)
        pos += len(p) + 1
    last = len(parts) - 1
    k = last if last % 2 == 0 else last - 1
    while k >= 0:
        j = parts[k].rfind(b"\n")
        if j >= 0:
            return offsets[k] + j + 1
        k -= 2
    return 0


def _truncate_partial_tail(path: str, fmt: str = "jsonl") -> int:
    """Cut a partial last record off ``path``; returns the bytes removed."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        if fmt == "csv":
            keep = _complete_csv_prefix(f.read())
        else:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            # Scan back for the last newline (JSON strings escape their newlines).
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
        if keep == size:
            return 0
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
    out.truncated_bytes = _truncate_partial_tail(path, fmt)
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


class OutputWriteError(OSError):
    """Writing rows failed (disk full, I/O error); the message says which file and what to do."""


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
        if fmt == "csv" and need_header:
            self._write(",".join(COLUMNS) + "\n")
            self.flush()

    def _write(self, text: str) -> None:
        if not self._own:  # a text stream: escape what its encoding cannot hold, never lose a row
            enc = getattr(self._f, "encoding", None) or "utf-8"
            try:
                text.encode(enc)
            except (UnicodeEncodeError, LookupError):
                text = text.encode(enc, "backslashreplace").decode(enc, "replace")
        try:
            self._f.write(text)
        except OSError as e:
            raise OutputWriteError(self._failure(e)) from None

    def _failure(self, e: OSError) -> str:
        where = self.path if self._own else "stdout"
        return f"cannot write to {where}: {e.strerror or e} (the rows flushed before are kept; fix it and rerun with --resume)"

    def write(self, rows: Iterable[Row]) -> None:
        if self.fmt == "csv":
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            for r in rows:
                w.writerow([r.path0, r.path1, "" if r.lpips is None else repr(float(r.lpips)), _clean(r.error) or ""])
            self._write(buf.getvalue())
        else:
            self._write(
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
        self._write(text)
        self.flush()

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            raise OutputWriteError(self._failure(e)) from None

    def close(self) -> None:
        if self._own and not self._f.closed:
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
            except OSError:
                pass
            try:
                self._f.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


SETTINGS_SUFFIX = ".lpips-run.json"


def settings_path(path: str) -> str:
    """The sidecar recording the settings a run's output was written with."""
    return path + SETTINGS_SUFFIX


def check_new_file(path: str, option: str, inputs=()) -> None:
    """A file about to be written (``-o``, ``--matrix``...): its folder exists and is writable,
    it is not a folder or a device/FIFO, and not one of ``inputs``. Raises ``OptionError``."""
    from ..paths import writable_dir

    if os.path.isdir(path):
        raise OptionError(f"{option} {path}: is a directory (expected a file path)")
    if os.path.exists(path):
        import stat

        if not stat.S_ISREG(os.stat(path).st_mode):
            raise OptionError(f"{option} {path}: is not a regular file (expected a file path, or - for stdout)")
        try:
            with open(path, "ab"):
                pass
        except OSError as e:
            raise OptionError(f"{option} {path}: cannot be written ({e.strerror}; expected a writable file)") from None
        from .data import IMAGE_EXTENSIONS

        named = os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS
        for f in inputs:
            if f and (named or os.path.basename(f) == os.path.basename(path)) and _same_file(f, path):
                raise OptionError(f"{option} {path}: is one of the input images (expected a new output file)")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OptionError(f"{option} {path}: the folder {parent} does not exist (expected an existing folder)")
    if not writable_dir(parent):
        raise OptionError(f"{option} {path}: the folder {parent} is not writable (expected a writable folder)")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class RunOutput:
    """Where a run writes its rows: a file (``path``) or stdout (``None``/``'-'``).

    ``check(inputs)`` runs before any work (on every torchrun rank): the file is writable, not a
    folder or a device, not one of ``inputs``; with ``resume`` it must be one of ours in ``fmt``
    and its settings sidecar must exist and record the same ``settings`` (``force`` skips that
    check; a non-empty file without a sidecar is refused, since nothing proves its rows match). ``open()`` (rank 0 only) returns the writer and the rows
    already there; with ``retry_errors`` the previous error rows are removed from the file first,
    so their pairs are scored again.
    """

    def __init__(self, path: str | None, fmt: str | None = None, *, resume: bool = False, settings: dict | None = None,
                 force: bool = False, retry_errors: bool = False, option: str = "-o", stdout_rows: bool = True):
        self.path = None if path == "-" else path
        self.to_stdout = path == "-"
        self.fmt = format_from_path(path, fmt)
        self.resume = resume
        self.settings = settings
        self.force = force
        self.retry_errors = retry_errors
        self.option = option
        self.stdout_rows = stdout_rows  # without -o: rows on stdout (False: no rows at all)

    def check(self, inputs=()) -> None:
        p = self.path
        if self.resume and p is None:
            raise OptionError("--resume needs -o OUT (the file to complete)")
        if self.retry_errors and not self.resume:
            raise OptionError("--retry-errors needs --resume (it re-scores the error rows of an existing output)")
        if p is None:
            return
        check_new_file(p, self.option, inputs)
        if self.resume and os.path.exists(p):
            problem = looks_like(p, self.fmt)
            if problem:
                raise OptionError(f"--resume {self.option} {p}: {problem}")
            self._check_settings()

    def _check_settings(self) -> None:
        sp = settings_path(self.path)
        if self.settings is None or self.force:
            return
        if not os.path.exists(sp):
            if not _may_hold_rows(self.path, self.fmt):
                return  # nothing written past the header: no rows to mix with
            raise OptionError(
                f"--resume {self.option} {self.path}: no record of the settings that wrote it ({sp} is missing); "
                "rerun without --resume, or add --force to continue it with these settings"
            )
        try:
            with open(sp, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            raise OptionError(f"--resume {self.option} {self.path}: its settings file {sp} is unreadable (use --force to resume anyway)") from None
        diff = [k for k in sorted(set(old) | set(self.settings)) if old.get(k) != self.settings.get(k)]
        if diff:
            what = "; ".join(f"{_flag(k)} was {_show(old.get(k))}, now {_show(self.settings.get(k))}" for k in diff)
            raise OptionError(
                f"--resume {self.option} {self.path}: written with other settings ({what}); "
                "rerun with the same settings, or add --force to mix them"
            )

    def open(self) -> tuple["RowWriter | None", ExistingRows]:
        existing = ExistingRows()
        if self.path is not None and self.resume and os.path.exists(self.path):
            existing = read_existing(self.path, self.fmt)
            if self.retry_errors and any(r.error is not None for r in existing.rows):
                existing = self._drop_error_rows(existing)
        if self.path is not None and self.settings is not None:
            sp = settings_path(self.path)
            with open(sp + ".tmp", "w", encoding="utf-8") as f:
                f.write(json.dumps(self.settings, indent=1, sort_keys=True) + "\n")
            os.replace(sp + ".tmp", sp)
        if self.path is None and not self.to_stdout and not self.stdout_rows:
            return None, existing
        writer = RowWriter(self.path, self.fmt, append=self.resume)
        return writer, existing

    def _drop_error_rows(self, existing: ExistingRows) -> ExistingRows:
        keep = [r for r in existing.rows if r.error is None]
        tmp = self.path + ".retry.tmp"
        w = RowWriter(tmp, self.fmt)
        w.write(keep)
        w.close()
        os.replace(tmp, self.path)
        return ExistingRows(keys={r.key for r in keep}, rows=keep, truncated_bytes=existing.truncated_bytes)


def _may_hold_rows(path: str, fmt: str) -> bool:
    """Whether ``path`` has a complete line past the CSV header (any complete line for JSON Lines);
    files larger than the first 64 KiB read are taken to hold rows."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        more = bool(f.read(1))
    return more or head.count(b"\n") > (1 if fmt == "csv" else 0)


def _flag(key: str) -> str:
    return {"command": "the command", "state_dict": "--state-dict", "random_trunk": "--random-trunk", "seed": "--model-seed",
            "pair_seed": "--seed", "lpips": "lpips"}.get(key, "--" + key.replace("_", "-"))


def _show(v) -> str:
    return "unset" if v is None else str(v)
