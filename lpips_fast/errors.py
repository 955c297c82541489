"""``OptionError``: a bad setting, reported as one line naming the option, the value given and
what is expected (the CLI prints it and exits with status 2)."""

from __future__ import annotations

__all__ = ["OptionError"]


class OptionError(ValueError):
    """A bad setting; ``str(e)`` is one line naming the option, the value and what is expected."""
