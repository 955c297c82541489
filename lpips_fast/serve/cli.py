"""``lpips-fast serve`` and ``lpips-fast config show``.

Both read the layered settings (``lpips_fast.settings``): defaults < TOML file (``--config``, or
``[tool.lpips-fast]`` in a pyproject.toml found upward) < ``LPIPS_FAST_*`` environment < flags.
Every setting with a flag gets it here, on both commands; ``--set SECTION.KEY=VALUE`` sets any
key. Exit status 2 for a bad setting (one line on stderr naming the key, its source and what is
allowed).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_commands", "settings_from_args"]

_SECTIONS = ("model", "scorer", "serve", "log")
_MULTI = ("list", "map", "weights")
_TYPE_METAVARS = {"path": "PATH", "int": "N", "size": "SIZE", "float": "X", "str": "TEXT"}
_METAVARS = {"scorer.devices": "DEVICE", "serve.models": "NAME=SPEC", "serve.split": "NAME=WEIGHT,...",
             "serve.max_body_bytes": "SIZE", "serve.request_timeout_s": "SECONDS", "serve.shutdown_timeout_s": "SECONDS"}


def _add_setting_flags(p: argparse.ArgumentParser) -> None:
    from ..settings import SCHEMA

    p.add_argument("--config", metavar="PATH", default=None,
                   help="TOML settings file (default: $LPIPS_FAST_CONFIG, else [tool.lpips-fast] in the nearest pyproject.toml)")
    p.add_argument("--set", dest="set_items", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set any setting (repeatable), e.g. --set serve.max_concurrency=64")
    for section in _SECTIONS:
        g = p.add_argument_group(f"[{section}] settings")
        for name, s in SCHEMA[section].items():
            if not s.flag:
                continue
            kw: dict[str, Any] = {"dest": f"setting__{section}__{name}", "default": argparse.SUPPRESS,
                                  "help": argparse.SUPPRESS if s.hidden else f"{s.help} [{section}.{name}]"}
            if s.type == "bool":
                kw.update(action="store_const", const="true")
            else:
                default_mv = "{" + ",".join(s.choices) + "}" if s.choices else _TYPE_METAVARS.get(s.type, "X")
                kw.update(metavar=_METAVARS.get(f"{section}.{name}", default_mv))
                if s.type in _MULTI:
                    kw["action"] = "append"
            g.add_argument(s.flag, **kw)


def settings_from_args(args: argparse.Namespace):
    """The effective ``Settings`` for parsed arguments (flags that were given override the rest)."""
    from ..settings import SCHEMA, SettingsError, load_settings

    flags: list[tuple[str, Any, str]] = []
    for dest, value in vars(args).items():
        if not dest.startswith("setting__"):
            continue
        _, section, name = dest.split("__", 2)
        flags.append((f"{section}.{name}", value, SCHEMA[section][name].flag))
    for item in args.set_items:
        key, eq, value = item.partition("=")
        if not eq:
            raise SettingsError(f"--set: got {item!r}, expected SECTION.KEY=VALUE (e.g. serve.port=9000)")
        flags.append((key.strip(), value, f"--set {key.strip()}"))
    return load_settings(args.config, flags=flags)


def _fail(command: str, e: Exception) -> int:
    print(f"lpips-fast {command}: error: {e}", file=sys.stderr)
    return 2


def _cmd_config_show(args: argparse.Namespace) -> int:
    from ..settings import SettingsError

    try:
        settings = settings_from_args(args)
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
    from ..settings import SettingsError

    try:
        settings = settings_from_args(args)
        from .app import check_arms, run

        check_arms(settings)
    except SettingsError as e:
        return _fail("serve", e)
    except ModuleNotFoundError as e:
        return _fail("serve", f"needs the 'serve' extra (pip install 'lpips-fast[serve]'): missing module {e.name!r}")

    return run(settings)


def add_commands(subparsers) -> None:
    """Register ``serve`` and ``config`` on the main CLI's sub-parsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    s = subparsers.add_parser(
        "serve", help="HTTP service: LPIPS over POST /v1/distance, A/B arms, /metrics", formatter_class=fmt,
        description="Serve LPIPS over HTTP (FastAPI on uvicorn; needs the 'serve' extra).\n\n"
        "  lpips-fast serve --host 127.0.0.1 --port 8080 --net alex\n"
        "  lpips-fast serve --model a=alex-v0.1 --model b=vgg-v0.1 --split a=0.9,b=0.1\n\n"
        "Endpoints: POST /v1/distance, /v1/distance/batch, /v1/map; GET /healthz, /readyz, /metrics, /v1/models.",
    )
    _add_setting_flags(s)
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
    _add_setting_flags(show)
    show.set_defaults(func=_cmd_config_show)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lpips-fast")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
