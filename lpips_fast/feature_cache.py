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
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import time
import uuid
from typing import Iterable, Mapping, Sequence

import torch

__all__ = ["FeatureCache", "CacheProbe", "feature_key", "model_fingerprint", "parse_size"]

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
    nlayers INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_shard ON entries(shard);
"""

DEFAULT_MAX_BYTES = 10 * 1024**3


def parse_size(text: str | int | None) -> int | None:
    """``"10G"``, ``"500M"``, ``"123456"`` -> bytes; ValueError unless a positive finite size."""
    if text is None:
        return None
    if isinstance(text, int):
        value = float(text)
    else:
        t = text.strip().upper().removesuffix("B").removesuffix("I")
        mult = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
        scale = 1
        if t and t[-1] in mult:
            t, scale = t[:-1], mult[t[-1]]
        value = float(t) * scale
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"size: got {text!r}, expected a positive finite size such as 10G or 500M")
    return int(value)


def model_fingerprint(model) -> str:
    """Hash of what the trunk features depend on: trunk weights, net and the scaling version."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{getattr(model, 'pnet_type', '')}|{getattr(model, 'version', '')}".encode())
    for name, t in sorted(model.net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def feature_key(digest: str, net: str, version: str, hw: Sequence[int], dtype, fingerprint: str = "") -> str:
    """The cache key of one image's features (a hex string)."""
    dt = str(dtype).replace("torch.", "")
    raw = f"{digest}|{net}|{version}|{int(hw[0])}x{int(hw[1])}|{dt}|{fingerprint}"
    return hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()


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
        self._conn: sqlite3.Connection | None = None
        self._pid = None
        self._connect().executescript(_SCHEMA)

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(
                os.path.join(self.root, "index.sqlite"), timeout=self.timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
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
        return self._connect().execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def total_bytes(self) -> int:
        return int(self._connect().execute("SELECT COALESCE(SUM(nbytes), 0) FROM shards").fetchone()[0])

    def get_many(self, keys: Iterable[str]) -> dict[str, list[torch.Tensor]]:
        """The cached feature lists among ``keys`` (CPU tensors); the rest are misses."""
        from safetensors import safe_open

        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}
        conn = self._connect()
        where: dict[str, tuple[str, int]] = {}
        for lo in range(0, len(keys), 500):
            part = keys[lo : lo + 500]
            q = f"SELECT key, shard, nlayers FROM entries WHERE key IN ({','.join('?' * len(part))})"
            for k, shard, nl in conn.execute(q, part):
                where[k] = (shard, nl)
        found: dict[str, list[torch.Tensor]] = {}
        by_shard: dict[str, list[tuple[str, int]]] = {}
        for k, (shard, nl) in where.items():
            by_shard.setdefault(shard, []).append((k, nl))
        used = []
        for shard, items in by_shard.items():
            path = os.path.join(self.shard_dir, shard)
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for k, nl in items:
                        found[k] = [f.get_tensor(f"{k}.{i}") for i in range(nl)]
                used.append(shard)
            except Exception:  # evicted meanwhile (FileNotFoundError) or damaged: a miss
                for k, _ in items:
                    found.pop(k, None)
        if used:
            now = time.time()
            try:
                with self._tx() as c:
                    c.executemany("UPDATE shards SET last_used=? WHERE name=?", [(now, s) for s in used])
            except sqlite3.OperationalError:
                pass  # LRU bookkeeping only
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

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
        now = time.time()
        with self._tx() as c:
            c.execute("INSERT INTO shards(name, nbytes, created, last_used) VALUES (?,?,?,?)", (name, nbytes, now, now))
            c.executemany(
                "INSERT OR IGNORE INTO entries(key, shard, nlayers) VALUES (?,?,?)",
                [(k, name, len(v)) for k, v in items.items()],
            )
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
