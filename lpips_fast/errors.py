"""``OptionError``: a bad setting, reported as one line naming the option, the value given and
what is expected (the CLI prints it and exits with status 2). ``row_error_kind``: the kind of an
error row's message, for the counters of a run (``--metrics-json``)."""

from __future__ import annotations

import re

__all__ = ["OptionError", "ROW_ERROR_KINDS", "row_error_kind"]


class OptionError(ValueError):
    """A bad setting; ``str(e)`` is one line naming the option, the value and what is expected."""


# (kind, what the message says) in the order tried; the messages are written by data.decode_file /
# decode_bytes, evaluate (pairs, sizes), features (trunk minimum, out of memory at a batch of one,
# internal errors) and diversity (most common size).
ROW_ERROR_KINDS: tuple[tuple[str, str], ...] = (
    ("missing", r"\bmissing file\b|\bmissing in DIR[01]\b"),
    ("not_regular_file", r"\bnot a regular file\b"),
    ("unreadable", r"\bunreadable:"),
    ("empty_file", r"\bempty file\b"),
    ("decompression_bomb", r"\bdecompression bomb\b"),
    ("not_an_image", r"\bnot an image\b"),
    ("decode_error", r"\bdecode error\b"),
    ("size_mismatch", r"\bsize mismatch\b|\bdiffers from the most common size\b"),
    ("too_small", r"\bsmaller than the \w+ trunk's minimum\b"),
    ("out_of_memory", r"\bout of memory\b"),
    ("internal", r"^internal error:|: internal error:"),
)
_KIND_RES = tuple((kind, re.compile(rx)) for kind, rx in ROW_ERROR_KINDS)


def row_error_kind(message: str) -> str:
    """The kind of an error row (one of ``ROW_ERROR_KINDS``' names), ``'other'`` when none fits."""
    for kind, rx in _KIND_RES:
        if rx.search(message):
            return kind
    return "other"
