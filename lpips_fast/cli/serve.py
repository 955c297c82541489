"""``lpips-fast serve`` and ``lpips-fast config show``.

Both read the layered settings (``lpips_fast.deploy.settings``): defaults < TOML file (``--config``, or
``[tool.lpips-fast]`` in a pyproject.toml found upward) < ``LPIPS_FAST_*`` environment < flags.
Every ``[model]``, ``[scorer]``, ``[serve]`` and ``[log]`` setting with a flag gets it here, on both
commands; ``--set SECTION.KEY=VALUE`` sets any key (the ``[eval]`` keys of the dataset commands
too: their flags ``--device`` and ``--max-pixels`` would clash with ``[scorer]``'s and ``[serve]``'s). Exit status 2 for a bad setting (one line on stderr naming the key, its source and what is
allowed).
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_commands"]

_SECTIONS = ("model", "scorer", "serve", "log")


def _fail(command: str, e: Exception) -> int:
    print(f"lpips-fast {command}: error: {e}", file=sys.stderr)
    return 2


def _cmd_config_show(args: argparse.Namespace) -> int:
    from ..deploy.settings import SettingsError, from_args

    try:
        settings = from_args(args)
    except SettingsError as e:
        return _fail("config", e)
    if args.json:
        print(json.dumps({"config_file": settings.config_file, "settings": settings.to_dict()}, indent=2))
        return 0
    rows = settings.rows()
    wk = max(len(r[0]) for r in rows)
    wv = min(40, max(len(r[1]) for r in rows))
    print(f"# config file: {settings.config_file or '(none)'}")
    for key, value, source in rows:
        print(f"{key:<{wk}}  {value:<{wv}}  {source}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..deploy.settings import SettingsError, from_args

    try:
        settings = from_args(args)
        from ..serve.app import check_arms, run

        check_arms(settings)
    except SettingsError as e:
        return _fail("serve", e)
    except ModuleNotFoundError as e:
        return _fail("serve", f"needs the 'serve' extra (pip install 'lpips-fast[serve]'): missing module {e.name!r}")

    return run(settings)


def add_commands(subparsers) -> None:
    """Register ``serve`` and ``config`` on the main CLI's sub-parsers."""
    from ..deploy.settings import add_arguments  # stdlib only: cheap at parser-build time

    fmt = argparse.RawDescriptionHelpFormatter
    s = subparsers.add_parser(
        "serve", help="HTTP service: LPIPS over POST /v1/distance, A/B arms, /metrics", formatter_class=fmt,
        description="Serve LPIPS over HTTP (FastAPI on uvicorn; needs the 'serve' extra).\n\n"
        "  lpips-fast serve --host 127.0.0.1 --port 8080 --net alex\n"
        "  lpips-fast serve --model a=alex-v0.1 --model b=vgg-v0.1 --split a=0.9,b=0.1\n\n"
        "Endpoints: POST /v1/distance, /v1/distance/batch, /v1/map; GET /healthz, /readyz, /metrics, /v1/models.",
    )
    add_arguments(s, _SECTIONS)
    s.set_defaults(func=_cmd_serve)

    c = subparsers.add_parser("config", help="show the effective settings and where each came from")
    sub = c.add_subparsers(dest="config_command", metavar="{show}")
    sub.required = True
    show = sub.add_parser(
        "show", help="print every setting, its value and its source", formatter_class=fmt,
        description="Print the effective settings (defaults < file < LPIPS_FAST_* environment < flags)\n"
        "with where each came from. Secrets are never printed.\n\n  lpips-fast config show --port 9000",
    )
    show.add_argument("--json", action="store_true", help="print JSON")
    add_arguments(show, _SECTIONS)
    show.set_defaults(func=_cmd_config_show)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lpips-fast")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
