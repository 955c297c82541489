"""The distance ops' schemas, each written once.

``FWD``/``BWD``: one layer; ``GROUPED_FWD``/``GROUPED_BWD``: every layer of a trunk in one call
(lists of features, ``weight`` an empty list for a plain channel sum). The public CPU ops and the
internal C++ ops share them; the Triton ops have the same signatures, inferred from their Python
annotations.

Grouped outputs: non-spatial, the (N,) sum over layers of the per-layer spatial means; spatial,
every layer's (N, 1, H_l, W_l) map flattened and concatenated in layer order (one tensor, so that
autograd sees one output; ``lpips_distances`` returns per-layer views of it).
"""

from __future__ import annotations

import torch

__all__ = ["FWD", "BWD", "GROUPED_FWD", "GROUPED_BWD", "define_cpp_ops"]

FWD = "(Tensor feat0, Tensor feat1, Tensor? weight, bool spatial, float eps) -> Tensor"
BWD = (
    "(Tensor grad, Tensor feat0, Tensor feat1, Tensor? weight, bool spatial, float eps, "
    "bool need_feat0, bool need_feat1, bool need_weight) -> (Tensor, Tensor, Tensor)"
)
GROUPED_FWD = "(Tensor[] feats0, Tensor[] feats1, Tensor[] weights, bool spatial, float eps) -> Tensor"
GROUPED_BWD = (
    "(Tensor grad, Tensor[] feats0, Tensor[] feats1, Tensor[] weights, bool spatial, float eps, "
    "bool need_feats0, bool need_feats1, bool need_weights) -> (Tensor[], Tensor[], Tensor[])"
)

_lib = None


def define_cpp_ops() -> None:
    """Define the internal ops that csrc/lpips_distance.cpp implements for the CPU (once).

    Defined here rather than in C++ so that they exist before the library is built: the C++ file
    only registers CPU kernels for them.
    """
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library("lpips_fast", "FRAGMENT")
    lib.define("_distance_fwd_cpu" + FWD)
    lib.define("_distance_bwd_cpu" + BWD)
    lib.define("_distances_fwd_cpu" + GROUPED_FWD)
    lib.define("_distances_bwd_cpu" + GROUPED_BWD)
    _lib = lib
