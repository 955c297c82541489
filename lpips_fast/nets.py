"""The three LPIPS trunks (AlexNet, VGG16, SqueezeNet 1.1), written here without torchvision.

Layer indices, shapes and tap points follow torchvision's ``.features`` and the reference
``lpips`` 0.1.4 ``pretrained_networks`` (facts, not code): each tap is the ReLU output at the end
of a slice, and the parameter names are ``slice{k}.{index}.weight`` so that reference state dicts
(``net.slice1.0.weight``) load unchanged. ``load_torchvision_features`` maps torchvision-format
keys (``features.{index}.weight``) onto the slices.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "Trunk",
    "AlexTrunk",
    "VGG16Trunk",
    "SqueezeTrunk",
    "build_trunk",
    "canonical_net_name",
    "TRUNK_CHANNELS",
]

# Canonical trunk names; "vgg16" is accepted as an alias of "vgg" as in the reference.
_NET_ALIASES = {"alex": "alex", "vgg": "vgg", "vgg16": "vgg", "squeeze": "squeeze"}

TRUNK_CHANNELS = {
    "alex": (64, 192, 384, 256, 256),
    "vgg": (64, 128, 256, 512, 512),
    "squeeze": (64, 128, 256, 384, 384, 512, 512),
}


def canonical_net_name(net: str) -> str:
    """Map a user-facing trunk name to 'alex', 'vgg' or 'squeeze'; ValueError otherwise."""
    if not isinstance(net, str) or net not in _NET_ALIASES:
        raise ValueError(
            f"net: got {net!r}, expected one of {sorted(_NET_ALIASES)}"
        )
    return _NET_ALIASES[net]


class Fire(nn.Module):
    """SqueezeNet's fire module: 1x1 squeeze, then 1x1 and 3x3 expands concatenated."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [self.expand1x1_activation(self.expand1x1(s)), self.expand3x3_activation(self.expand3x3(s))],
            dim=1,
        )


def _alex_features() -> list[nn.Module]:
    return [
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
    ]


def _vgg16_features() -> list[nn.Module]:
    layers: list[nn.Module] = []
    cin = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            cin = int(v)
    return layers


def _squeeze11_features() -> list[nn.Module]:
    return [
        nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(64, 16, 64, 64), Fire(128, 16, 64, 64),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(128, 32, 128, 128), Fire(256, 32, 128, 128),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
        Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
    ]


def _out_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length of a conv/pool along one axis (PyTorch's formula, dilation 1)."""
    span = size + 2 * padding - kernel
    if ceil_mode:
        n = -(-span // stride) + 1
        # PyTorch's ceil_mode rule: the last window must start inside the (left-padded) input.
        if (n - 1) * stride >= size + padding:
            n -= 1
    else:
        n = span // stride + 1
    return max(n, 0)


def _module_out_size(m: nn.Module, size: int) -> int:
    def first(v):  # kernel/stride/padding may be int or tuple
        return v[0] if isinstance(v, tuple) else v

    if isinstance(m, nn.Conv2d):
        return _out_size(size, first(m.kernel_size), first(m.stride), first(m.padding), False)
    if isinstance(m, nn.MaxPool2d):
        return _out_size(size, first(m.kernel_size), first(m.stride), first(m.padding), m.ceil_mode)
    if isinstance(m, Fire):
        return size  # 1x1 and padded 3x3 convs keep the size
    return size


class Trunk(nn.Module):
    """A feature trunk cut into slices; ``forward`` returns the ReLU output of every slice."""

    name: str = ""

    def __init__(self, features: list[nn.Module], bounds: Iterable[tuple[int, int]]) -> None:
        super().__init__()
        self._bounds = tuple(bounds)
        for k, (lo, hi) in enumerate(self._bounds, start=1):
            s = nn.Sequential()
            for i in range(lo, hi):
                s.add_module(str(i), features[i])
            self.add_module(f"slice{k}", s)
        self.channels = TRUNK_CHANNELS[self.name]
        self.min_size = self._min_input_size()

    @property
    def slices(self) -> list[nn.Sequential]:
        return [getattr(self, f"slice{k}") for k in range(1, len(self._bounds) + 1)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for s in self.slices:
            x = s(x)
            outs.append(x)
        return outs

    def layer_sizes(self, size: int) -> list[int]:
        """Spatial length of each tap for an input of length ``size`` along one axis."""
        taps = []
        for s in self.slices:
            for m in s:
                size = _module_out_size(m, size)
            taps.append(size)
        return taps

    def _min_input_size(self) -> int:
        size = 1
        while min(self.layer_sizes(size)) < 1:
            size += 1
        return size

    def load_torchvision_features(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load a torchvision-format state dict (``features.N.*``; classifier keys ignored)."""
        index_to_slice = {}
        for k, (lo, hi) in enumerate(self._bounds, start=1):
            for i in range(lo, hi):
                index_to_slice[i] = k
        mapped = {}
        for key, value in state_dict.items():
            if not key.startswith("features."):
                continue
            _, idx, rest = key.split(".", 2)
            idx_i = int(idx)
            if idx_i not in index_to_slice:
                continue  # layers past the last tap (e.g. alex's final max-pool) hold no weights
            mapped[f"slice{index_to_slice[idx_i]}.{idx}.{rest}"] = value
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        if strict and (missing or unexpected):
            raise ValueError(
                f"state_dict: torchvision-format {self.name} trunk weights do not match "
                f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
            )


class AlexTrunk(Trunk):
    name = "alex"

    def __init__(self) -> None:
        super().__init__(_alex_features(), [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)])


class VGG16Trunk(Trunk):
    name = "vgg"

    def __init__(self) -> None:
        super().__init__(_vgg16_features(), [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)])


class SqueezeTrunk(Trunk):
    name = "squeeze"

    def __init__(self) -> None:
        super().__init__(
            _squeeze11_features(), [(0, 2), (2, 5), (5, 8), (8, 10), (10, 11), (11, 12), (12, 13)]
        )


_TRUNKS = {"alex": AlexTrunk, "vgg": VGG16Trunk, "squeeze": SqueezeTrunk}


def build_trunk(net: str, init: bool = True) -> Trunk:
    """The trunk for ``net``: randomly initialised (PyTorch's default init, drawing from the global
    RNG), or with ``init=False`` uninitialised memory that the caller overwrites with loaded
    weights (no RNG draw, no init time)."""
    cls = _TRUNKS[canonical_net_name(net)]
    if init:
        return cls()
    with torch.device("meta"):
        trunk = cls()
    return trunk.to_empty(device="cpu")
