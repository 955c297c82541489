"""One settings object, layered: defaults < TOML file < environment ``LPIPS_FAST_*`` < flags.

    settings = load_settings(config="lpips-fast.toml", flags={"serve.port": ("9000", "--port")})
    settings["serve.port"]            # 9000
    settings.source("serve.port")     # 'flag --port'

Keys are ``section.name``. Sections group what each part reads: ``model`` (which LPIPS), ``eval``
(the dataset commands: pair, dirs, ref, allpairs, map), ``scorer`` (dynamic batching), ``serve``
(the HTTP service), ``log``. A command that needs more settings adds
its own section with ``define`` (one ``Setting`` per key); nothing else changes.

- File: ``--config PATH`` (or ``$LPIPS_FAST_CONFIG``) names a TOML file whose top-level tables are
  the sections; without it, the first ``pyproject.toml`` found from the working directory upward is
  read, and its ``[tool.lpips-fast]`` table (if any) is used. Relative paths in a file are relative
  to the file. Parsed with ``tomllib`` (Python >= 3.11) or the ``tomli`` package.
- Environment: ``LPIPS_FAST_<SECTION>_<NAME>``, e.g. ``LPIPS_FAST_SERVE_PORT=9000``. Only variables
  whose first word is a known section are settings (``LPIPS_FAST_HOME`` and friends are not).
- Flags: whatever the command line gives explicitly, e.g. ``--port 9000`` or ``--set serve.port=9000``.

An unknown key or a bad value is a ``SettingsError`` naming the key, where it came from
(``file:line``, ``env VAR``, ``flag --x``) and what is allowed. Secret values (``serve.auth_token``)
are never printed: ``show`` and error messages say only whether they are set.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..sizes import parse_size, size_text

__all__ = [
    "add_arguments",
    "add_flag",
    "from_args",
    "Setting",
    "Settings",
    "SettingsError",
    "SCHEMA",
    "ENV_PREFIX",
    "define",
    "load_settings",
    "find_config_file",
    "parse_size",
    "size_text",
]

ENV_PREFIX = "LPIPS_FAST_"
ENV_CONFIG = "LPIPS_FAST_CONFIG"


class SettingsError(ValueError):
    """A bad or unknown setting; the message names the key, its source and what is allowed."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# A registered lin set (``lpips_fast.weights.registry``): NAME or NAME@N, and not a weights file name.
_REGISTERED_NAME = re.compile(r"(?![^@]*\.(?:safetensors|pth|pt|bin|ckpt)(?:@|$))[A-Za-z0-9][A-Za-z0-9._-]{0,63}(?:@\d+)?")


@dataclass(frozen=True)
class Setting:
    """One key: its type, default, limits and help.

    ``type``: 'str', 'int', 'float', 'bool', 'size' (bytes; '32M' accepted), 'path', 'list'
    (strings; 'a,b' from text), 'map' (name -> string; 'a=x,b=y' from text), 'weights'
    (name -> number >= 0; 'a=0.9,b=0.1' from text).
    """

    type: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    nullable: bool = False  # None (unset) is allowed; 'none' in text
    secret: bool = False
    flag: str | None = None  # the command-line flag that sets it (besides --set)
    hidden: bool = False  # not listed in --help (still settable and shown)
    metavar: str | None = None  # for --help (default: from the type or the choices)
    check: Callable[[Any], Any] | None = None  # further check of a parsed value: ValueError if bad
    expected: str | None = None  # what is allowed, in words (instead of the type's words)
    names: bool = False  # 'path' that may also be a registered name (kept as given when no such file)
    unset: str = "(unset)"  # how ``show`` names None (e.g. '(auto)')

    def allowed(self) -> str:
        t = self.type
        if self.expected:
            s = self.expected
        elif self.choices:
            s = "one of " + ", ".join(self.choices)
        elif t in ("int", "float", "size"):
            word = {"int": "an integer", "float": "a number", "size": "a size in bytes such as 32M or 1048576"}[t]
            lo = None if self.min is None else (f"> {self.min:g}" if self.min_exclusive else f">= {self.min:g}")
            hi = None if self.max is None else f"<= {self.max:g}"
            if lo and hi and not self.min_exclusive:
                s = f"{word} from {self.min:g} to {self.max:g}"
            else:
                s = " ".join([word] + [x for x in (lo, hi) if x])
        else:
            s = {
                "bool": "true or false",
                "str": "a string",
                "path": "a file path",
                "list": "a list of strings (comma-separated in text)",
                "map": "a table name = string (NAME=VALUE,... in text)",
                "weights": "a table name = number >= 0 (NAME=NUMBER,... in text)",
            }[t]
        return s + (" (or none)" if self.nullable else "")

    def text(self, v: Any) -> str:
        """A (non-None) value as a file or a flag would give it: sizes as ``10G``, lists and tables
        comma-separated, booleans as true/false, floats without trailing zeros."""
        if self.type == "size":
            return size_text(v)
        if self.type == "list":
            return ",".join(v)
        if self.type in ("map", "weights"):
            return ",".join(f"{k}={x:g}" if isinstance(x, float) else f"{k}={x}" for k, x in v.items())
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return f"{v:g}"
        return str(v)

    def parse(self, value: Any, key: str, source: str, base: Path | None = None) -> Any:
        """Check and convert ``value`` (text from env/flags, or a TOML value)."""
        v = self._parse(value, key, source, base)
        if self.check is not None and v is not None:
            try:
                self.check(v)
            except ValueError as e:
                shown = "<secret>" if self.secret else repr(value)
                reason = " ".join(str(e).split())
                why = "" if not reason or reason.startswith("expected") else f" ({reason})"
                raise SettingsError(f"{key}: got {shown} from {source}, expected {self.allowed()}{why}") from None
        return v

    def _parse(self, value: Any, key: str, source: str, base: Path | None) -> Any:
        shown = "<secret>" if self.secret else repr(value)

        def bad(extra: str = "") -> SettingsError:
            return SettingsError(f"{key}: got {shown} from {source}, expected {self.allowed()}{extra}")

        if self.nullable and (value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))):
            return None
        t = self.type
        if t == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise bad()
        if t in ("int", "size"):
            if isinstance(value, bool):
                raise bad()
            try:
                if t == "size":
                    v = parse_size(value)
                elif isinstance(value, int):
                    v = value
                elif isinstance(value, str):
                    v = int(value.strip())
                else:
                    raise ValueError
            except (ValueError, TypeError):
                raise bad() from None
            self._check_range(v, bad)
            return v
        if t == "float":
            if isinstance(value, bool):
                raise bad()
            try:
                v = float(value) if isinstance(value, (int, float, str)) else None
            except ValueError:
                v = None
            if v is None or not math.isfinite(v):
                raise bad()
            self._check_range(v, bad)
            return v
        if t in ("str", "path"):
            if not isinstance(value, str):
                raise bad()
            v = value.strip()
            if self.choices and v not in self.choices:
                close = difflib.get_close_matches(v, self.choices, n=1)
                raise bad(f" (did you mean {close[0]!r}?)" if close else "")
            if t == "path":
                p = Path(os.path.expanduser(v))
                if base is not None and not p.is_absolute():
                    if self.names and not (base / p).exists() and _REGISTERED_NAME.fullmatch(v):
                        return v  # a registered name, not a file next to the config file
                    p = base / p
                return str(p)
            return v
        if t == "list":
            items = _split_items(value)
            if items is None:
                raise bad()
            if self.choices:
                for it in items:
                    if it not in self.choices:
                        raise bad()
            return tuple(items)
        if t in ("map", "weights"):
            return _parse_named(value, t == "weights", bad)
        raise AssertionError(f"unknown setting type {t!r}")

    def _check_range(self, v: float, bad) -> None:
        if self.min is not None and (v <= self.min if self.min_exclusive else v < self.min):
            raise bad()
        if self.max is not None and v > self.max:
            raise bad()


def _split_items(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
        out: list[str] = []
        for s in value:
            out += [x.strip() for x in s.split(",") if x.strip()]
        return out
    return None


def _split_pairs(value: Any) -> list[tuple[str, Any]] | None:
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    items = _split_items(value)
    if items is None:
        return None
    out = []
    for it in items:
        if "=" not in it:
            return None
        k, v = it.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def _parse_named(value: Any, weights: bool, bad: Callable[..., SettingsError]) -> dict[str, Any]:
    """A ``map`` (name -> non-empty text) or ``weights`` (name -> finite number >= 0) setting."""
    pairs = _split_pairs(value)
    if pairs is None:
        raise bad()
    out: dict[str, Any] = {}
    for name, v in pairs:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or name in out:
            raise bad(f" (name {name!r} is empty, repeated or has characters outside A-Z a-z 0-9 _ . -)")
        if weights:
            try:
                f = float(v) if not isinstance(v, bool) else None
            except (ValueError, TypeError):
                f = None
            if f is None or not math.isfinite(f) or f < 0:
                raise bad(f" (weight of {name!r}: {v!r})")
            out[name] = f
        else:
            if not isinstance(v, str) or not v.strip():
                raise bad(f" (value of {name!r}: {v!r})")
            out[name] = v.strip()
    return out


# -- the schema ------------------------------------------------------------------------------
SCHEMA: dict[str, dict[str, Setting]] = {}


def define(section: str, name: str, setting: Setting) -> None:
    """Add a key (sections are created on first use). Section names have no underscore."""
    if "_" in section or not re.fullmatch(r"[a-z][a-z0-9]*", section):
        raise ValueError(f"section: got {section!r}, expected lowercase letters and digits")
    SCHEMA.setdefault(section, {})[name] = setting


_S = Setting
for _name, _s in {
    "net": _S("str", "alex", "trunk network", choices=("alex", "vgg", "vgg16", "squeeze"), flag="--net"),
    "version": _S("str", "0.1", "LPIPS version", choices=("0.1", "0.0", "v0.1", "v0.0"), flag="--version"),
    "dtype": _S("str", "auto", "trunk precision (auto: float32, except Scorer/serve on CUDA: bfloat16)",
                choices=("auto", "float32", "float16", "bfloat16"), flag="--dtype"),
    "compile": _S("str", "auto", "torch.compile the trunk (auto: Scorer/serve on CUDA only; dataset commands off)",
                  choices=("auto", "on", "off"), flag="--compile"),
    "trunk": _S("path", None, "trunk weights file (torchvision format) instead of the fetched ones", nullable=True, flag="--trunk"),
    "lin": _S("path", None, "lin-layer weights: a file, or a set registered with `lpips-fast weights register` "
              "(NAME or NAME@N)", nullable=True, flag="--lin", names=True, metavar="PATH|NAME",
              expected="a weights file or a registered lin set NAME[@N]"),
    "state_dict": _S("path", None, "a complete LPIPS state dict (reference keys)", nullable=True, flag="--state-dict"),
    "random_trunk": _S("bool", False, "random trunk weights (testing only)", hidden=True, flag="--random-trunk"),
    "seed": _S("int", 0, "seed for random_trunk", hidden=True, flag="--model-seed"),
}.items():
    define("model", _name, _s)


def _check_resize(value: str) -> None:
    from ..dataset.data import parse_resize

    try:
        parse_resize(value)
    except ValueError as e:  # "resize: got X, <reason>" -> the reason
        raise ValueError(str(e).split(", ", 1)[-1]) from None


for _name, _s in {
    "device": _S("str", None, "cpu, cuda or cuda:N (unset: cuda when available; under torchrun cuda:LOCAL_RANK)",
                 nullable=True, flag="--device", metavar="DEVICE", unset="(auto)"),
    "batch_size": _S("int", 32, "pairs per batch (halved on out-of-memory)", min=1, flag="--batch-size"),
    "workers": _S("int", None, "decoding processes (0: in the main process; unset: min(4, CPUs - 1))", min=0,
                  nullable=True, flag="--workers", unset="(auto)"),
    "resize": _S("str", None, "resize every image (Pillow bicubic) to HxW before scoring", nullable=True,
                 flag="--resize", metavar="HxW", check=_check_resize, expected="HxW such as 256x256"),
    "max_pixels": _S("int", None, "images with more pixels are decompression-bomb error rows "
                     "(unset: Pillow's Image.MAX_IMAGE_PIXELS, 89478485)", min=1, nullable=True, flag="--max-pixels",
                     unset="(Pillow's)"),
    "cache": _S("path", None, "feature cache directory (reused across runs and processes)", nullable=True,
                flag="--cache", metavar="DIR"),
    "cache_max_size": _S("size", 10 << 30, "feature cache size bound, LRU-evicted", min=1, flag="--cache-max-size"),
    "format": _S("str", None, "row format (unset: from the -o extension, else csv)", choices=("csv", "jsonl"),
                 nullable=True, flag="--format", unset="(from -o)"),
    "engine": _S("str", "auto", "score with lpips_fast.Engine fed by pinned buffers (CUDA graphs; uint8 over the "
                 "bus); auto: on CUDA without a feature cache", choices=("auto", "on", "off"), flag="--engine"),
}.items():
    define("eval", _name, _s)

for _name, _s in {
    "devices": _S("list", (), "devices, e.g. cpu or cuda:0,cuda:1 (empty: every GPU, else cpu)", flag="--device",
                  metavar="DEVICE"),
    "max_batch": _S("int", 64, "most pairs per engine call", min=1, flag="--max-batch"),
    "max_delay_ms": _S("float", 2.0, "how long a batch waits for more pairs after its first", min=0, flag="--max-delay-ms"),
    "max_queue": _S("int", 4096, "most pairs waiting for a device (then: wait, or Overloaded)", min=1, flag="--max-queue"),
}.items():
    define("scorer", _name, _s)

for _name, _s in {
    "host": _S("str", "127.0.0.1", "address to listen on", flag="--host"),
    "port": _S("int", 8080, "TCP port (0: any free port)", min=0, max=65535, flag="--port"),
    "models": _S("map", {}, "A/B arms NAME=SPEC (SPEC: NET[-vVERSION][@STATE_DICT] or a registered lin set "
                 "NAME[@N]); empty: one arm from [model]", flag="--model", metavar="NAME=SPEC"),
    "split": _S("weights", {}, "traffic share per arm NAME=WEIGHT (empty: equal shares)", flag="--split",
                metavar="NAME=WEIGHT,..."),
    "key_header": _S("str", "x-request-key", "request header whose value picks the arm by a stable hash", flag="--key-header"),
    "max_body_bytes": _S("size", 32 << 20, "largest request body (413 beyond)", min=1, flag="--max-body-bytes"),
    "max_pixels": _S("int", 16_777_216, "largest image in pixels, checked before decoding (413 beyond)", min=1,
                     flag="--max-pixels"),
    "request_timeout_s": _S("float", 30.0, "longest a request may take (504 beyond)", min=0, min_exclusive=True,
                            flag="--request-timeout", metavar="SECONDS"),
    "max_concurrency": _S("int", 256, "most requests in progress at once (503 beyond)", min=1, flag="--max-concurrency"),
    "shutdown_timeout_s": _S("float", 30.0, "on SIGTERM, how long in-flight requests may finish", min=0,
                             flag="--shutdown-timeout", metavar="SECONDS"),
    "metrics_json": _S("path", None, "on shutdown, write every counter and histogram here as JSON", nullable=True,
                       flag="--metrics-json"),
    "warmup_size": _S("int", 64, "image size of the warm-up pair run before /readyz turns ready", min=1, hidden=True),
    "auth_token": _S("str", None, "if set, /v1/* requests need 'Authorization: Bearer <token>'", nullable=True,
                     secret=True),
}.items():
    define("serve", _name, _s)

for _name, _s in {
    "level": _S("str", "warning", "lpips_fast logger level", choices=("critical", "error", "warning", "info", "debug"),
                flag="--log-level"),
    "format": _S("str", "text", "log line format", choices=("text", "json"), flag="--log-format"),
}.items():
    define("log", _name, _s)
del _S, _name, _s


def _lookup(key: str, source: str) -> Setting:
    section, _, name = key.partition(".")
    if section not in SCHEMA:
        close = difflib.get_close_matches(section, SCHEMA, n=1)
        hint = f" (did you mean [{close[0]}]?)" if close else ""
        raise SettingsError(f"unknown setting {key!r} from {source}: unknown section [{section}]{hint}; "
                            f"sections are {', '.join(f'[{s}]' for s in SCHEMA)}")
    keys = SCHEMA[section]
    if name not in keys:
        close = difflib.get_close_matches(name, keys, n=1)
        hint = f" (did you mean {section}.{close[0]}?)" if close else ""
        raise SettingsError(f"unknown setting {key!r} from {source}{hint}; [{section}] has {', '.join(keys)}")
    return keys[name]


# -- the settings object -----------------------------------------------------------------------

@dataclass
class Settings:
    """Effective values (``settings['serve.port']``) and where each came from (``source(key)``)."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    config_file: str | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in self.values:
            _lookup(key, "the program")
        return self.values[key]

    def source(self, key: str) -> str:
        return self.sources[key]

    def section(self, name: str) -> dict[str, Any]:
        """``{name: value}`` of one section."""
        return {k.split(".", 1)[1]: v for k, v in self.values.items() if k.split(".", 1)[0] == name}

    def display(self, key: str) -> str:
        """The value as text; secrets only say whether they are set."""
        s = _lookup(key, "the program")
        v = self.values[key]
        if s.secret:
            return "(unset)" if v is None else "(set, hidden)"
        if v is None:
            return s.unset
        if s.type in _MULTI and not v:
            return "(auto)" if key == "scorer.devices" else "(empty)"
        return s.text(v)

    def rows(self) -> list[tuple[str, str, str]]:
        """(key, value text, source) for every key, schema order."""
        return [(k, self.display(k), self.sources[k]) for k in self.values]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested ``{section: {name: {"value", "source"}}}`` for JSON; secrets hidden."""
        out: dict[str, dict[str, Any]] = {}
        for k, v in self.values.items():
            sec, name = k.split(".", 1)
            s = SCHEMA[sec][name]
            if s.secret:
                v = None if v is None else "(set, hidden)"
            elif isinstance(v, tuple):
                v = list(v)
            out.setdefault(sec, {})[name] = {"value": v, "source": self.sources[k]}
        return out


_OUR_TABLE = re.compile(r"""tool\s*\.\s*["']?lpips-fast\b""")


def find_config_file(start: str | os.PathLike | None = None) -> tuple[Path, bool] | None:
    """The first ``pyproject.toml`` from ``start`` upward: ``(path, True)``; None if there is none,
    or if it has no ``[tool.lpips-fast]`` table (then it is not even parsed: a project's own
    pyproject.toml never stops lpips-fast, and Python 3.10 needs no TOML reader for it)."""
    d = Path(start or os.getcwd()).resolve()
    for p in (d, *d.parents):
        f = p / "pyproject.toml"
        if f.is_file():
            try:
                text = f.read_text(encoding="utf-8", errors="replace")
            except OSError:
                return None
            return (f, True) if _OUR_TABLE.search(text) else None
    return None


def _load_toml(path: Path) -> tuple[dict, str]:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise SettingsError(
                f"config file {path}: reading TOML on Python < 3.11 needs the 'tomli' package (pip install tomli)"
            ) from None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SettingsError(f"config file {path}: cannot read it ({e.strerror or e})") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"config file {path}: not valid TOML: {e}") from None


def _key_lines(text: str) -> dict[str, int]:
    """Best-effort line numbers of dotted keys and table headers in TOML text."""
    lines: dict[str, int] = {}
    table: list[str] = []

    def parts(s: str) -> list[str]:
        return [p.strip().strip("\"'") for p in re.findall(r'"[^"]*"|\'[^\']*\'|[^.]+', s.strip())]

    for i, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$", line)
        if m:
            table = parts(m.group(1))
            lines.setdefault(".".join(table), i)
            continue
        m = re.match(r"\s*((?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-.\s])+?)\s*=", line)
        if m:
            lines.setdefault(".".join(table + parts(m.group(1))), i)
    return lines


def _file_layer(path: Path, in_pyproject: bool) -> dict[str, tuple[Any, str]]:
    data, text = _load_toml(path)
    prefix: list[str] = []
    if in_pyproject:
        data = data.get("tool", {}).get("lpips-fast")
        if data is None:
            return {}
        prefix = ["tool", "lpips-fast"]
    where = _key_lines(text)

    def loc(path_parts: list[str]) -> str:
        for n in range(len(path_parts), 0, -1):
            line = where.get(".".join(prefix + path_parts[:n]))
            if line is not None:
                return f"{path}:{line}"
        return str(path)

    out: dict[str, tuple[Any, str]] = {}
    base = path.parent
    for section, table in data.items():
        if not isinstance(table, dict):
            src = loc([section])
            raise SettingsError(
                f"unknown setting {section!r} from {src}: top-level keys must be tables, one per section "
                f"({', '.join(f'[{s}]' for s in SCHEMA)})"
            )
        for name, value in table.items():
            key = f"{section}.{name}"
            src = loc([section, name])
            s = _lookup(key, src)
            out[key] = (s.parse(value, key, src, base=base), src)
    return out


def _env_layer(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX):]
        section, _, name = rest.partition("_")
        if section.lower() not in SCHEMA or not name:
            continue  # LPIPS_FAST_HOME and other non-settings variables
        key = f"{section.lower()}.{name.lower()}"
        src = f"env {var}"
        s = _lookup(key, src)
        out[key] = (s.parse(text, key, src), src)
    return out


def load_settings(
    config: str | os.PathLike | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, tuple[Any, str]] | Iterable[tuple[str, Any, str]] | None = None,
    start_dir: str | os.PathLike | None = None,
    search_pyproject: bool = True,
) -> Settings:
    """Defaults < file < environment < flags.

    ``config``: a TOML file (sections as top-level tables; a ``pyproject.toml`` is read from its
    ``[tool.lpips-fast]`` table); default ``$LPIPS_FAST_CONFIG``, else the first pyproject.toml
    from ``start_dir`` (default: the working directory) upward. ``env`` defaults to
    ``os.environ``. ``flags``: ``{key: (value, flag text)}`` or ``(key, value, flag text)`` triples.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for section, keys in SCHEMA.items():
        for name, s in keys.items():
            values[f"{section}.{name}"] = s.default
            sources[f"{section}.{name}"] = "default"

    if config is None and env.get(ENV_CONFIG):
        config = env[ENV_CONFIG]
    found: tuple[Path, bool] | None
    if config is not None:
        p = Path(os.path.expanduser(os.fspath(config)))
        if not p.is_file():
            src = f"env {ENV_CONFIG}" if env.get(ENV_CONFIG) == os.fspath(config) else "flag --config"
            raise SettingsError(f"config: got {os.fspath(config)!r} from {src}, expected an existing TOML file")
        found = (p, p.name == "pyproject.toml")
    else:
        found = find_config_file(start_dir) if search_pyproject else None
    config_file = None
    layers = []
    if found is not None:
        layer = _file_layer(*found)
        if layer or not found[1]:
            config_file = str(found[0])
        layers.append(layer)
    layers.append(_env_layer(env))
    if flags is not None:
        items = flags.items() if isinstance(flags, Mapping) else ((k, (v, f)) for k, v, f in flags)
        flag_layer = {}
        for key, (value, flag) in items:
            src = f"flag {flag}"
            flag_layer[key] = (_lookup(key, src).parse(value, key, src), src)
        layers.append(flag_layer)
    for layer in layers:
        for key, (v, src) in layer.items():
            values[key] = v
            sources[key] = src
    return Settings(values=values, sources=sources, config_file=config_file)


# -- command lines -----------------------------------------------------------------------------
_MULTI = ("list", "map", "weights")
_TYPE_METAVARS = {"path": "PATH", "int": "N", "size": "SIZE", "float": "X", "str": "TEXT", "bool": "BOOL"}


def add_arguments(parser: Any, sections: Iterable[str], *, flags: bool = True) -> None:
    """Add ``--config``, ``--set`` and (``flags``) each flagged key of ``sections`` to an argparse parser.

    Flags default to "not given" (``argparse.SUPPRESS``), so only what the command line says
    overrides the file and the environment; ``from_args`` turns the parsed namespace into
    ``Settings``.
    """
    import argparse

    parser.add_argument("--config", metavar="PATH", default=None,
                        help=f"TOML settings file (default: ${ENV_CONFIG}, else [tool.lpips-fast] in the nearest pyproject.toml)")
    parser.add_argument("--set", dest="set_items", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="set any setting (repeatable), e.g. --set serve.max_concurrency=64")
    if not flags:
        return
    for section in sections:
        g = parser.add_argument_group(f"[{section}] settings")
        for name, s in SCHEMA[section].items():
            if s.flag:
                add_flag(g, section, name)


def _default_text(s: Setting) -> str:
    if s.default is None:
        return "unset by default"
    if s.type in _MULTI and not s.default:
        return "empty by default"
    return f"default {s.text(s.default)}"


def add_flag(parser: Any, section: str, name: str, *names: str, **overrides: Any) -> None:
    """Add the flag of one key (``Setting.flag``, or ``names``) to an argparse parser or group.

    The flag defaults to "not given" and stores the text as given; ``from_args`` parses it with
    the key's ``Setting`` (so a bad value names the key, the flag and what is allowed).
    ``overrides`` are passed to ``add_argument`` (e.g. ``action="store_const", const="on"``); a
    ``help`` override replaces the key's help text (the key and its default are appended).
    """
    import argparse

    s = SCHEMA[section][name]
    kw: dict[str, Any] = {"dest": f"setting__{section}__{name}", "default": argparse.SUPPRESS,
                          "help": argparse.SUPPRESS if s.hidden
                          else f"{overrides.pop('help', s.help)} [{section}.{name}: {_default_text(s)}]"}
    if s.type == "bool":
        kw.update(action="store_const", const="true")
    else:
        choices = "{" + ",".join(s.choices) + "}" if s.choices else None
        kw["metavar"] = s.metavar or choices or _TYPE_METAVARS.get(s.type, "X")
        if s.type in _MULTI:
            kw["action"] = "append"
    kw.update(overrides)
    if kw.get("action") in ("store_const", "store_true", "store_false"):
        kw.pop("metavar", None)
    parser.add_argument(*(names or (s.flag,)), **kw)


def from_args(args: Any, env: Mapping[str, str] | None = None) -> Settings:
    """The effective ``Settings`` for a namespace parsed with ``add_arguments``' flags."""
    flags: list[tuple[str, Any, str]] = []
    for dest, value in vars(args).items():
        if not dest.startswith("setting__"):
            continue
        _, section, name = dest.split("__", 2)
        flags.append((f"{section}.{name}", value, SCHEMA[section][name].flag))
    for item in getattr(args, "set_items", None) or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise SettingsError(f"--set: got {item!r}, expected SECTION.KEY=VALUE (e.g. serve.port=9000)")
        flags.append((key.strip(), value, f"--set {key.strip()}"))
    return load_settings(getattr(args, "config", None), env=env, flags=flags)
