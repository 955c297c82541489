"""The package's layers, checked on its source: each layer imports only the layers below it.

Every import of every module counts, function-level (lazy) imports included; ``if TYPE_CHECKING:``
blocks do not (they never run). The layer order is declared once, in ``LAYERS``; ARCHITECTURE.md
says what each layer owns. Also checked: no module imports another module's private
(``_underscore``) names or private modules from outside their package, the package never imports
its own deprecated paths (``lpips_fast._moved.MOVED``), every import names an existing module, and
every module belongs to a layer.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1] / "lpips_fast"

# Bottom to top. A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("lpips_fast._moved", "lpips_fast.errors", "lpips_fast.paths", "lpips_fast.profiling", "lpips_fast.sizes")),
    ("ops", ("lpips_fast.ops",)),
    ("core", ("lpips_fast.nets", "lpips_fast.validation", "lpips_fast.images", "lpips_fast.weights",
              "lpips_fast.model", "lpips_fast.functional", "lpips_fast.model_cache")),
    ("inference", ("lpips_fast.inference",)),
    ("dataset", ("lpips_fast.dataset",)),
    ("deploy", ("lpips_fast.deploy",)),
    ("training", ("lpips_fast.training",)),
    ("serve", ("lpips_fast.serve",)),
    ("cli", ("lpips_fast.cli", "lpips_fast.__main__")),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
FACADE = "lpips_fast"  # __init__: the public names, loaded lazily from every layer

# Upward imports still allowed, each with its reason (importer, imported module): keep this short.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("lpips_fast.ops._triton_grouped", "lpips_fast.nets"): (
        "aot_specializations() builds each trunk on the meta device to list the feature shapes the AOT "
        "kernels are compiled for (a function-level import, used only by `python -m lpips_fast.ops.aot`); "
        "the trunks' layer shapes should reach ops as data instead"
    ),
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(mod: str) -> str | None:
    best = None
    for name, prefixes in LAYERS:
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (name, p)
    return best and best[0]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def imports(mod: str) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every import in ``mod``'s source."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "lpips_fast"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lpips_fast":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub, None) if sub in MODULES or sub in _moved() else (node.lineno, target, a.name))
    return out


def _moved() -> dict[str, str]:
    from lpips_fast._moved import MOVED

    return MOVED


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if m != FACADE and layer_of(m) is None]
    assert not missing, f"modules in no layer of tests/test_architecture.py LAYERS: {missing}"


def test_every_imported_module_exists():
    """A relative import that points nowhere (``from .writers import ...`` left in a module that
    moved one folder down) fails here, not on the first run of the code path that imports it."""
    moved = _moved()
    bad = [
        f"{MODULES[mod].relative_to(ROOT.parent)}:{line}: imports {target}, which is no module of the package"
        for mod in MODULES
        for line, target, _ in imports(mod)
        if target not in MODULES and target not in moved
    ]
    assert not bad, "\n".join(dict.fromkeys(bad))


def test_layers_import_only_downward():
    bad = []
    for mod in MODULES:
        if mod == FACADE:
            continue
        here = RANK[layer_of(mod)]
        for line, target, _ in imports(mod):
            there = layer_of(target)
            if there is None or target == FACADE:
                continue  # the facade's own names (__version__) and the deprecated paths (checked below)
            if RANK[there] > here and (mod, target) not in ALLOWED_UPWARD:
                bad.append(f"{MODULES[mod].relative_to(ROOT.parent)}:{line}: {layer_of(mod)} imports {target} ({there})")
    assert not bad, "upward imports:\n" + "\n".join(dict.fromkeys(bad))


def test_allowed_upward_imports_are_still_needed():
    seen = {(mod, target) for mod in MODULES for _, target, _ in imports(mod)}
    stale = [k for k in ALLOWED_UPWARD if k not in seen]
    assert not stale, f"ALLOWED_UPWARD entries no longer imported (remove them): {stale}"


def _private_part(dotted: str) -> int | None:
    for i, part in enumerate(dotted.split(".")):
        if part.startswith("_") and not (part.startswith("__") and part.endswith("__")):
            return i
    return None


def test_no_private_imports_across_packages():
    bad = []
    for mod in MODULES:
        for line, target, name in imports(mod):
            full = f"{target}.{name}" if name else target
            i = _private_part(full)
            if i is None:
                continue
            owner = ".".join(full.split(".")[:i])  # the package (or module) the private name belongs to
            if not (mod == owner or mod.startswith(owner + ".")):
                bad.append(f"{MODULES[mod].relative_to(ROOT.parent)}:{line}: imports {full}")
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_package_never_imports_a_deprecated_path():
    moved = _moved()
    bad = [
        f"{MODULES[mod].relative_to(ROOT.parent)}:{line}: imports {target} (now {moved[target]})"
        for mod in MODULES
        for line, target, _ in imports(mod)
        if target in moved
    ]
    assert not bad, "\n".join(bad)
    assert not [m for m in moved if m in MODULES], "a file still sits at a deprecated path"


def test_names_loaded_by_string_are_current_modules():
    """The facade's lazy names and the CLI's command groups are imported by name at run time."""
    import lpips_fast
    from lpips_fast import cli

    targets = {f"lpips_fast.{m}" for m in lpips_fast._LAZY.values()} | set(cli.COMMAND_GROUPS)
    assert not targets & set(_moved()), targets & set(_moved())
    for t in sorted(targets):
        assert t in MODULES, t


def test_deprecated_paths_warn_and_are_the_new_modules():
    """Each old path imports (in a fresh process) with one DeprecationWarning naming the new path,
    is the new module itself, and a pickle naming a class by its old path loads."""
    code = textwrap.dedent(
        """
        import importlib, pickle, sys, warnings
        import lpips_fast
        from lpips_fast._moved import MOVED
        for old, new in MOVED.items():
            assert old not in sys.modules, old
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                mod = importlib.import_module(old)
            assert mod is importlib.import_module(new), old
            msgs = [str(w.message) for w in caught if w.category is DeprecationWarning]
            assert len(msgs) == 1 and new in msgs[0], (old, msgs)
        from lpips_fast.dataset.options import EvalOptions
        data = pickle.dumps(EvalOptions, protocol=0).replace(b"lpips_fast.dataset.options", b"lpips_fast.options")
        assert b"lpips_fast.options" in data and pickle.loads(data) is EvalOptions
        print("ok", len(MOVED))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
