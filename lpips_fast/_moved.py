"""Old module paths of lpips-fast (before the package was split into layers), importable for one
release.

``MOVED`` maps each old dotted path to its new one. ``install()`` puts one finder on
``sys.meta_path``: importing an old path emits a DeprecationWarning naming the new path and binds
the old name to the new module itself (``sys.modules[old] is sys.modules[new]``), so attributes,
``monkeypatch``/``mock.patch`` through the old path and pickles naming the old path keep working,
and ``python -m OLD`` runs the new module. One table instead of a re-export file per old path:
no file sits at an old path, so the moves stay renames to git. The package itself never imports
an old path (tests/test_architecture.py checks this).
"""

from __future__ import annotations

import importlib
import sys
import warnings

__all__ = ["MOVED", "install"]

MOVED: dict[str, str] = {
    "lpips_fast.registry": "lpips_fast.weights.registry",
    "lpips_fast.engine": "lpips_fast.inference.engine",
    "lpips_fast.pipeline": "lpips_fast.inference.pipeline",
    "lpips_fast.scorer": "lpips_fast.inference.scorer",
    "lpips_fast.telemetry": "lpips_fast.inference.telemetry",
    "lpips_fast.data": "lpips_fast.dataset.data",
    "lpips_fast.options": "lpips_fast.dataset.options",
    "lpips_fast.features": "lpips_fast.dataset.features",
    "lpips_fast.feature_cache": "lpips_fast.dataset.feature_cache",
    "lpips_fast.evaluate": "lpips_fast.dataset.evaluate",
    "lpips_fast.pairwise": "lpips_fast.dataset.pairwise",
    "lpips_fast.diversity": "lpips_fast.dataset.diversity",
    "lpips_fast.writers": "lpips_fast.dataset.writers",
    "lpips_fast.distributed": "lpips_fast.dataset.distributed",
    "lpips_fast.heatmap": "lpips_fast.dataset.heatmap",
    "lpips_fast.export": "lpips_fast.deploy.export",
    "lpips_fast.tune": "lpips_fast.deploy.tune",
    "lpips_fast.comparison": "lpips_fast.deploy.comparison",
    "lpips_fast.settings": "lpips_fast.deploy.settings",
    "lpips_fast.deploy_cli": "lpips_fast.cli.deploy",
    "lpips_fast.weights.cli": "lpips_fast.cli.weights",
    "lpips_fast.serve.cli": "lpips_fast.cli.serve",
    "lpips_fast.training.cli": "lpips_fast.cli.training",
}


class _OldPathFinder:
    """``sys.meta_path`` finder for the paths in ``MOVED`` (consulted first, so that no stale file at an old path is imported)."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in MOVED:
            return None
        from importlib.machinery import ModuleSpec

        return ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None  # a placeholder module; exec_module replaces it in sys.modules

    def exec_module(self, module) -> None:
        old = module.__name__
        new = MOVED[old]
        warnings.warn(
            f"{old} is deprecated and will be removed in the next release; import {new} instead",
            DeprecationWarning,
            stacklevel=2,
        )
        # The import system returns whatever sys.modules holds under the name after exec_module.
        sys.modules[old] = importlib.import_module(new)

    def get_code(self, fullname: str):
        """For ``python -m OLD`` (runpy): run the new module as ``__main__``."""
        new = MOVED[fullname]
        warnings.warn(f"python -m {fullname} is deprecated; use python -m {new}", DeprecationWarning, stacklevel=2)
        return compile(f"import runpy\nrunpy.run_module({new!r}, run_name='__main__', alter_sys=True)\n", fullname, "exec")


def install() -> None:
    """Register the finder once (idempotent)."""
    if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _OldPathFinder())
