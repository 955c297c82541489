"""``lpips-fast``: score images, folders and all pairs from the command line.

    lpips-fast pair a.png b.png
    lpips-fast dirs out/ gt/ -o scores.csv
    lpips-fast ref ref.png samples/ -o scores.jsonl
    lpips-fast allpairs samples/ --pairs 10000 --seed 0
    lpips-fast map a.png b.png -o heat.png
    lpips-fast weights ...            (the pretrained-weights tool)

Exit status: 0 every row scored, 3 some rows are errors, 2 bad arguments (one line on stderr
naming the option; also missing weights), 1 an unexpected failure. See ``lpips-fast COMMAND --help``.

The model and input options are layered settings (``lpips_fast.settings``, sections ``[model]``,
``[eval]``, ``[log]``): defaults < TOML file (``--config``, or ``[tool.lpips-fast]`` in a
pyproject.toml upward) < ``LPIPS_FAST_*`` environment < flags (``--set SECTION.KEY=VALUE`` sets
any key). This module is the root parser and ``main``; the commands live one group per module
(``COMMAND_GROUPS``: ``cli.dataset``, ``cli.weights``, ``cli.deploy``, ``cli.serve``,
``cli.training``), each parsing its arguments, calling one library function and printing.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import EXIT_ERROR_ROWS, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError, echo, nonneg_int, positive_int
from .dataset import run_metrics, show_progress, summary_line

__all__ = ["main", "build_parser", "summary_line", "show_progress", "run_metrics", "positive_int", "nonneg_int", "EXIT_OK",
           "EXIT_FAILURE", "EXIT_ERROR_ROWS", "EXIT_USAGE", "UsageError", "COMMAND_GROUPS"]

# The command groups, one module each in this package, in the order ``--help`` lists them. Each
# module defines ``add_commands(subparsers)`` and imports nothing heavy at module level (the parser
# is built on every invocation); its command functions return an exit status.
COMMAND_GROUPS = ("lpips_fast.cli.dataset", "lpips_fast.cli.weights", "lpips_fast.cli.deploy", "lpips_fast.cli.serve",
                  "lpips_fast.cli.training")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``lpips-fast COMMAND: error: ...`` and exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lpips-fast",
        description="Fast exact LPIPS (lpips 0.1.4 numbers) for image pairs, folders and all pairs.",
        epilog="Exit status: 0 all rows scored, 3 some rows are errors, 2 bad arguments. "
        "Under torchrun every command shards its pairs across the ranks; rank 0 writes the output.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMAND_GROUPS:
        importlib.import_module(module).add_commands(sub)
    return parser


# -- entry point -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a parse error (2)
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    from ..errors import OptionError
    from ..deploy.settings import SettingsError
    from ..dataset.writers import OutputWriteError

    try:
        if getattr(args, "uses_settings", False):
            _apply_settings(args)
        return int(args.func(args) or 0)
    except (UsageError, OptionError, SettingsError) as e:
        echo(f"lpips-fast {args.command}: error: {' '.join(str(e).split())}", sys.stderr)
        return EXIT_USAGE
    except OutputWriteError as e:
        echo(f"lpips-fast {args.command}: error: {e}", sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        echo("lpips-fast: interrupted (rows written so far are kept; rerun with --resume)", sys.stderr)
        return 130
    except Exception as e:
        if _is_weights_missing(e):
            echo(f"lpips-fast {args.command}: error: {e}", sys.stderr)
            return EXIT_USAGE
        raise


def _apply_settings(args) -> None:
    """``args.settings``: the layered settings of a dataset command (file < env < its flags); logging set up."""
    from ..deploy.settings import from_args
    from ..inference.telemetry import configure_logging

    args.settings = s = from_args(args)
    if s.source("log.level") != "default" or s.source("log.format") != "default":
        configure_logging(s["log.level"], s["log.format"])  # else Python's own: warnings and above on stderr


def _is_weights_missing(e: BaseException) -> bool:
    from ..weights import WeightsError

    return isinstance(e, WeightsError)


if __name__ == "__main__":
    sys.exit(main())
