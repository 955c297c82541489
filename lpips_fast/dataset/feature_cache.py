"""On-disk cache of trunk features: safetensors shards with a SQLite index (no server).

Layout of a cache directory::

    DIR/index.sqlite          # WAL journal; tables `shards` and `entries`
    DIR/shards/<uuid>.safetensors

- An entry is the list of trunk taps of one image, keyed by ``feature_key(...)``: the content
  hash of the file's bytes, the net, the version, the decoded size, the dtype and a fingerprint
  of the trunk weights (a random or fine-tuned trunk never reuses another's features).
- One ``put_many`` writes one shard (a batch of images): the file is written under a temporary
  name and renamed into place before its rows are committed, so readers only ever see whole
  shards. Several processes may share a directory: SQLite serialises the index updates
  (``busy_timeout``), and a shard that vanishes under a reader (evicted by another process) is a
  miss, not an error.
- The size is bounded (``max_bytes``): after each write the least-recently-used shards are
  evicted (rows deleted in one transaction, then the files unlinked) until the total fits.
  A read refreshes its shards' ``last_used``.

Integrity: every entry's index row holds a CRC-32 of its tensors (dtypes, shapes and bytes),
checked on every read. An entry whose bytes no longer match (bit rot, a modified or
truncated shard), or a shard that cannot be parsed, is a miss: it is dropped from the index and
recomputed, with one warning per cache object. An index that SQLite cannot read (garbage,
truncated) is moved aside to ``index.sqlite.corrupt-<time>`` and rebuilt empty, with a warning.
Shard files the index does not know (orphans: left by a crash between the rename and the
commit, or by a rebuilt index) are deleted once they are older than ``ORPHAN_AGE_S``.
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import time
import uuid
import warnings
import zlib
from typing import Iterable, Mapping, Sequence

import torch

from ..model_cache import model_fingerprint

__all__ = ["FeatureCache", "CacheProbe", "feature_key", "model_fingerprint", "parse_size", "entry_digest", "ORPHAN_AGE_S"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    name TEXT PRIMARY KEY,
    nbytes INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS shards_lru ON shards(last_used);
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    shard TEXT NOT NULL,
    nlayers INTEGER NOT NULL,
    digest TEXT
);
CREATE INDEX IF NOT EXISTS entries_shard ON entries(shard);
"""

DEFAULT_MAX_BYTES = 10 * 1024**3
#: Shard files unknown to the index are deleted once older than this (seconds).
ORPHAN_AGE_S = 600.0


_DIGEST = "crc32:"


def entry_digest(tensors: Sequence[torch.Tensor]) -> str:
    """Checksum of a feature list: CRC-32 over each tensor's dtype, shape and bytes, in order.

    CRC-32 detects every burst of up to 32 flipped bits and any other damage with probability
    1 - 2^-32; it guards against corruption, not against someone who can write to the cache.
    It runs at memory speed (~1 GB/s), where a cryptographic hash would add noticeably to a
    cached run.
    """
    crc = 0
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        crc = zlib.crc32(f"{t.dtype}|{tuple(t.shape)}|".encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{_DIGEST}{crc:08x}"


def _corrupt_index(e: BaseException) -> bool:
    """SQLite errors that mean the index file itself is damaged (not "database is locked")."""
    msg = str(e).lower()
    return isinstance(e, sqlite3.DatabaseError) and any(
        w in msg for w in ("not a database", "malformed", "disk image", "file is encrypted", "database corrupt")
    )


def parse_size(text: str | int | None) -> int | None:
    """``"10G"``, ``"500M"``, ``"1e9"``, ``"123456"`` -> bytes (``lpips_fast.sizes.parse_size``);
    ValueError unless a positive finite size."""
    from ..sizes import parse_size as parse_bytes

    if text is None:
        return None
    try:
        value = parse_bytes(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"size: got {text!r}, expected a positive finite size such as 10G or 500M")
    return value


def feature_key(digest: str, net: str, version: str, hw: Sequence[int], dtype, fingerprint: str = "") -> str:
    """The cache key of one image's features (a hex string)."""
    dt = str(dtype).replace("torch.", "")
    raw = f"{digest}|{net}|{version}|{int(hw[0])}x{int(hw[1])}|{dt}|{fingerprint}"
    return hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()


def _entries_by_shard(conn, keys: list[str]) -> dict[str, list[tuple[str, int, str | None]]]:
    """The index rows of ``keys``: (key, layers, digest) per shard file."""
    by_shard: dict[str, list[tuple[str, int, str | None]]] = {}
    for lo in range(0, len(keys), 500):
        part = keys[lo : lo + 500]
        q = f"SELECT key, shard, nlayers, digest FROM entries WHERE key IN ({','.join('?' * len(part))})"
        for k, shard, nl, dg in conn.execute(q, part):
            by_shard.setdefault(shard, []).append((k, nl, dg))
    return by_shard


def _read_shard(path: str, items, found: dict, bad: list, stale: list) -> None:
    """Read ``items`` from one shard into ``found``; keys failing their digest go to ``bad``, keys
    written without one to ``stale``. Raises when the shard is missing or cannot be parsed."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        for k, nl, dg in items:
            try:
                feats = [f.get_tensor(f"{k}.{i}") for i in range(nl)]
            except Exception:
                feats = None
            if dg is None or not dg.startswith(_DIGEST):
                stale.append(k)  # written without a checksum: a silent miss, rewritten
            elif feats is None or entry_digest(feats) != dg:
                bad.append(k)
            else:
                found[k] = feats


class FeatureCache:
    """Process-safe, size-bounded LRU store of per-image feature lists."""

    def __init__(self, root: str | os.PathLike, max_bytes: int | None = DEFAULT_MAX_BYTES, timeout_s: float = 60.0):
        self.root = os.fspath(root)
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
        self.timeout_s = timeout_s
        self.shard_dir = os.path.join(self.root, "shards")
        os.makedirs(self.shard_dir, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self.evicted_shards = 0
        self.dropped_entries = 0
        self._warned = False
        self._conn: sqlite3.Connection | None = None
        self._pid = None
        try:
            self._init_schema()
        except sqlite3.DatabaseError as e:
            if not _corrupt_index(e):
                raise
            self._rebuild_index(e)
        self.evict_orphans()

    def _init_schema(self) -> None:
        conn = self._connect()
        conn.executescript(_SCHEMA)
        cols = {r[1] for r in conn.execute("PRAGMA table_info(entries)")}
        if "digest" not in cols:  # an index written before entries carried a hash: those entries are misses
            try:
                conn.execute("ALTER TABLE entries ADD COLUMN digest TEXT")
            except sqlite3.OperationalError:
                pass  # another process added it first
        conn.execute("SELECT COUNT(*) FROM shards").fetchone()

    def _warn(self, msg: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"lpips_fast feature cache {self.root}: {msg}", RuntimeWarning, stacklevel=3)

    def _rebuild_index(self, err: BaseException) -> None:
        """Move a damaged index aside and start an empty one (its shards become orphans)."""
        self.close()
        index = os.path.join(self.root, "index.sqlite")
        aside = f"{index}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(index + suffix):
                os.replace(index + suffix, aside + suffix)
        self._warn(f"the index could not be read ({' '.join(str(err).split())}); moved it to {aside} and started an empty one")
        self._init_schema()
        self.evict_orphans(min_age_s=0.0)

    def _guard(self, fn):
        """Run ``fn()``; a damaged index is rebuilt once and ``fn`` retried."""
        try:
            return fn()
        except sqlite3.DatabaseError as e:
            if not _corrupt_index(e):
                raise
            self._rebuild_index(e)
            return fn()

    def evict_orphans(self, min_age_s: float | None = None) -> int:
        """Delete shard files (and stale temporary files) the index does not list; returns how many."""
        age = ORPHAN_AGE_S if min_age_s is None else float(min_age_s)
        try:
            names = os.listdir(self.shard_dir)
        except OSError:
            return 0
        if not names:
            return 0
        known = {r[0] for r in self._connect().execute("SELECT name FROM shards")}
        now = time.time()
        gone = 0
        for name in names:
            if name in known:
                continue
            path = os.path.join(self.shard_dir, name)
            try:
                if now - os.stat(path).st_mtime >= age:
                    os.unlink(path)
                    gone += 1
            except OSError:
                pass
        return gone

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(
                os.path.join(self.root, "index.sqlite"), timeout=self.timeout_s, isolation_level=None, check_same_thread=False
            )
            _set_wal(conn, self.timeout_s)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    class _Tx:
        def __init__(self, conn):
            self.c = conn

        def __enter__(self):
            self.c.execute("BEGIN IMMEDIATE")
            return self.c

        def __exit__(self, et, ev, tb):
            self.c.execute("COMMIT" if et is None else "ROLLBACK")
            return False

    def _tx(self):
        return self._Tx(self._connect())

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    # -- queries ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._guard(lambda: self._connect().execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def total_bytes(self) -> int:
        return int(self._guard(lambda: self._connect().execute("SELECT COALESCE(SUM(nbytes), 0) FROM shards").fetchone()[0]))

    def get_many(self, keys: Iterable[str]) -> dict[str, list[torch.Tensor]]:
        """The cached feature lists among ``keys`` (CPU tensors, hash-checked); the rest are misses."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}
        found = self._guard(lambda: self._read(keys))
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def _read(self, keys: list[str]) -> dict[str, list[torch.Tensor]]:
        found: dict[str, list[torch.Tensor]] = {}
        bad: list[str] = []
        bad_shards: list[str] = []
        gone: list[str] = []
        stale: list[str] = []
        used = []
        for shard, items in _entries_by_shard(self._connect(), keys).items():
            try:
                _read_shard(os.path.join(self.shard_dir, shard), items, found, bad, stale)
                used.append(shard)
            except FileNotFoundError:  # evicted meanwhile, or deleted by hand: a miss; forget stale rows
                gone.append(shard)
                continue
            except Exception:  # the shard cannot be parsed: every entry in it is a miss
                bad_shards.append(shard)
        if bad or bad_shards:
            self._drop(bad, bad_shards)
        if gone or stale:
            try:
                with self._tx() as c:
                    c.executemany("DELETE FROM entries WHERE key=?", [(k,) for k in stale])
                    for name in gone:
                        if not os.path.exists(os.path.join(self.shard_dir, name)):
                            c.execute("DELETE FROM entries WHERE shard=?", (name,))
                            c.execute("DELETE FROM shards WHERE name=?", (name,))
            except sqlite3.OperationalError:
                pass
        if used:
            now = time.time()
            try:
                with self._tx() as c:
                    c.executemany("UPDATE shards SET last_used=? WHERE name=?", [(now, s) for s in used])
            except sqlite3.OperationalError:
                pass  # LRU bookkeeping only
        return found

    def _drop(self, keys: list[str], shards: list[str]) -> None:
        """Forget damaged entries (recomputed by the caller) and unreadable shards."""
        n = len(keys)
        with self._tx() as c:
            c.executemany("DELETE FROM entries WHERE key=?", [(k,) for k in keys])
            for name in shards:
                n += c.execute("SELECT COUNT(*) FROM entries WHERE shard=?", (name,)).fetchone()[0]
                c.execute("DELETE FROM entries WHERE shard=?", (name,))
                c.execute("DELETE FROM shards WHERE name=?", (name,))
        for name in shards:
            try:
                os.unlink(os.path.join(self.shard_dir, name))
            except FileNotFoundError:
                pass
        self.dropped_entries += n
        self._warn(
            f"{n} cached feature entr{'y' if n == 1 else 'ies'} failed the integrity check "
            f"(damaged or modified shard{'s' if len(shards) != 1 else ''}); dropped and recomputed"
        )

    def put_many(self, items: Mapping[str, Sequence[torch.Tensor]]) -> None:
        """Store feature lists (one shard), then evict least-recently-used shards over the bound."""
        from safetensors.torch import save_file

        if not items:
            return
        tensors = {}
        nbytes = 0
        for k, feats in items.items():
            for i, t in enumerate(feats):
                t = t.detach().to("cpu").contiguous()
                tensors[f"{k}.{i}"] = t
                nbytes += t.numel() * t.element_size()
        name = f"{uuid.uuid4().hex}.safetensors"
        path = os.path.join(self.shard_dir, name)
        tmp = path + f".tmp{os.getpid()}"
        save_file(tensors, tmp)
        os.replace(tmp, path)
        nbytes = os.path.getsize(path)
        rows = [(k, name, len(v), entry_digest([tensors[f"{k}.{i}"] for i in range(len(v))])) for k, v in items.items()]

        def commit():
            now = time.time()
            with self._tx() as c:
                c.execute("INSERT INTO shards(name, nbytes, created, last_used) VALUES (?,?,?,?)", (name, nbytes, now, now))
                c.executemany("INSERT OR IGNORE INTO entries(key, shard, nlayers, digest) VALUES (?,?,?,?)", rows)

        self._guard(commit)
        self.evict(keep=name)

    def evict(self, keep: str | None = None) -> int:
        """Drop LRU shards until the total is within ``max_bytes``; returns shards dropped."""
        doomed = []
        with self._tx() as c:
            total = c.execute("SELECT COALESCE(SUM(nbytes), 0) FROM shards").fetchone()[0]
            if total <= self.max_bytes:
                return 0
            for name, nb in c.execute("SELECT name, nbytes FROM shards ORDER BY last_used ASC, created ASC"):
                if total <= self.max_bytes:
                    break
                if name == keep:
                    continue
                doomed.append(name)
                total -= nb
            for name in doomed:
                c.execute("DELETE FROM entries WHERE shard=?", (name,))
                c.execute("DELETE FROM shards WHERE name=?", (name,))
        for name in doomed:
            try:
                os.unlink(os.path.join(self.shard_dir, name))
            except FileNotFoundError:
                pass
        self.evicted_shards += len(doomed)
        return len(doomed)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_conn"] = None
        d["_pid"] = None
        return d


class CacheProbe:
    """Picklable ``probe(digest, (H, W)) -> bool`` for decoding workers: are these features cached?

    Each process opens its own read connection; a stale answer only costs a decode later.
    """

    def __init__(self, root: str, net: str, version: str, dtype, fingerprint: str):
        self.root = os.fspath(root)
        self.args = (net, version, dtype, fingerprint)
        self._conn = None
        self._pid = None

    def __call__(self, digest: str, hw) -> bool:
        net, version, dtype, fp = self.args
        key = feature_key(digest, net, version, hw, dtype, fp)
        if self._conn is None or self._pid != os.getpid():
            self._conn = sqlite3.connect(os.path.join(self.root, "index.sqlite"), timeout=10.0, check_same_thread=False)
            self._pid = os.getpid()
        return self._conn.execute("SELECT 1 FROM entries WHERE key=?", (key,)).fetchone() is not None

    def __getstate__(self):
        return {"root": self.root, "args": self.args, "_conn": None, "_pid": None}


def _set_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process holds the new index's lock: the
    switch can answer "database is locked" at once, without waiting for the busy timeout (seen
    with two torchrun ranks opening one fresh cache folder)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(0.2, delay * 2)
