"""What every ``lpips-fast`` command module shares: exit statuses, the usage error, argument
types and printing that survives any file name."""

from __future__ import annotations

import argparse
import sys

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_ERROR_ROWS", "UsageError", "positive_int", "nonneg_int", "echo"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_ERROR_ROWS = 3


class UsageError(Exception):
    """A bad argument found after parsing (exit status 2)."""

def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def echo(text: str, file=None) -> None:
    """print(), escaping what the stream's encoding cannot hold (file names are arbitrary bytes)."""
    file = file or sys.stdout
    enc = getattr(file, "encoding", None) or "utf-8"
    try:
        text.encode(enc)
    except (UnicodeEncodeError, LookupError):
        text = text.encode(enc, "backslashreplace").decode(enc, "replace")
    print(text, file=file, flush=True)
