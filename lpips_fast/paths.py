"""Where lpips-fast keeps files: the cache root (``$LPIPS_FAST_HOME``, default
``~/.cache/lpips_fast``), and a check that a folder is really writable.

Pretrained trunks live under ``cache_root()/trunks``; other components put their own folders
beside them. Read at call time, so tests and users can change the variable in-process.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "writable_dir", "ENV_HOME"]

#: The environment variable that moves the cache root.
ENV_HOME = "LPIPS_FAST_HOME"


def cache_root() -> Path:
    """``$LPIPS_FAST_HOME`` (``~`` expanded), default ``~/.cache/lpips_fast``."""
    home = os.environ.get(ENV_HOME)
    return Path(home).expanduser() if home else Path("~/.cache/lpips_fast").expanduser()


def writable_dir(path: str | os.PathLike) -> bool:
    """True when a file can really be created in ``path`` (root ignores permission bits, and
    read-only mounts only show on a write, so this creates and removes a probe file)."""
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(prefix=".lpips-fast-probe-", dir=os.fspath(path))
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True
