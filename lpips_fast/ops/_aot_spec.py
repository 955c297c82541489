"""One kernel specialisation as the launcher picks it: the record ``ops/aot.py`` compiles.

A kernel module lists its specialisations with ``aot_specializations() -> list[KernelSpec]``,
built from the same code that its launcher uses (block configs, constexprs, argument types), so
that the ahead-of-time compile covers exactly what the launcher can run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import torch

__all__ = ["KernelSpec", "TRITON_DTYPES", "pointer_type"]

# Element types in Triton's signature notation ("*fp32" is a pointer to fp32).
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def pointer_type(dtype: torch.dtype) -> str:
    return "*" + TRITON_DTYPES[dtype]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One compile of one ``@triton.jit`` kernel.

    kernel: the kernel's name; fn: the JIT function; signature: every parameter's Triton type
    ("*bf16", "i32", "fp32", or "constexpr"); constexprs: the constexpr values; num_warps: the
    launcher's warps; dtype: the features' dtype name; launch: what the launcher was given to pick
    this (channel counts, pixel counts, flags); axes: the dimensions this spec varies along
    (``aot.py --scope cover`` compiles every value of each at least once); hot: on the common
    path (trunk channel counts, fp32/bf16, LPIPS weights, forward or input gradient).
    """

    kernel: str
    fn: Any
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int
    dtype: str
    launch: Dict[str, Any]
    axes: Tuple[Tuple[str, Any], ...]
    hot: bool = False

    def key(self) -> Tuple:
        """Identity of the compiled binary: two specs with one key compile to the same cubin."""
        return (
            self.kernel,
            tuple(sorted(self.signature.items())),
            tuple(sorted(self.constexprs.items())),
            self.num_warps,
        )
