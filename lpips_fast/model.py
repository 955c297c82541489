"""``LPIPS``: the drop-in ``nn.Module`` for ``lpips.LPIPS`` 0.1.4.

Thin by design: validate inputs, run the trunk once for both images, call the fused distance
op once per layer. State-dict keys are the reference's (``scaling_layer.shift``,
``net.slice1.0.weight``, ``lin0.model.1.weight``, ``lins.0.model.1.weight``), so reference
checkpoints load. Differences from the reference, all deliberate:

- quiet by default (``verbose=False``); ``version`` also accepts ``'v0.1'``/``'v0.0'``;
- ``use_dropout=False`` still loads the calibrated lin weights (the reference's keys shift to
  ``model.0`` there and ``strict=False`` silently drops them); checkpoints saved by the reference
  with ``use_dropout=False`` (``lin0.model.0.weight``) load too;
- ``pnet_rand=False`` never leaves the trunk random: verified pretrained weights or an error
  saying what to run (``lpips-fast weights fetch``);
- no NaN gradients where a feature column is all zero (the op's gradient there is 0);
- bad inputs raise clear errors (see ``validation.py``); NaN/Inf inputs raise unless
  ``nonfinite='propagate'``;
- 1-channel images broadcast to RGB in both versions (the reference only broadcasts in v0.1).
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .nets import TRUNK_CHANNELS, build_trunk, canonical_net_name
from .ops import lpips_distance, lpips_distances, unit_normalize
from .profiling import nvtx_range
from .validation import NONFINITE_POLICIES, check_finite, check_image_pair
from .weights import canonical_version, read_checkpoint

__all__ = ["LPIPS", "ScalingLayer", "NetLinLayer", "canonical_version", "identical_pairs"]


class ScalingLayer(nn.Module):
    """v0.1 input scaling ``(x - shift) / scale`` with the reference's constants."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return (inp - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """1x1 conv without bias; ``model[0]`` is Dropout or Identity so the weight is always ``model.1``."""

    def __init__(self, chn_in: int, chn_out: int = 1, use_dropout: bool = False) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Dropout() if use_dropout else nn.Identity(),
            nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False),
        )

    @property
    def weight(self) -> torch.Tensor:
        return self.model[1].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The reference with use_dropout=False names the weight model.0.weight.
        old, new = prefix + "model.0.weight", prefix + "model.1.weight"
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity, numerically identical to ``lpips.LPIPS`` 0.1.4.

    Arguments and defaults are the reference's (see its docstring), plus keyword-only
    ``trunk_path`` (explicit trunk weights), ``nonfinite`` ('raise' or 'propagate') and ``lin``
    (a named, verified lin-weight set from ``lpips_fast.weights.registry``: 'NAME' or 'NAME@N').
    Inputs are (N,3,H,W) (or 1-channel) floats in [-1, 1], or [0, 1] with ``normalize=True``.
    Returns (N,1,1,1), or (N,1,H,W) with ``spatial=True``; ``retPerLayer=True`` returns
    ``(total, [per-layer])``.
    """

    def __init__(
        self,
        pretrained: bool = True,
        net: str = "alex",
        version: str = "0.1",
        lpips: bool = True,
        spatial: bool = False,
        pnet_rand: bool = False,
        pnet_tune: bool = False,
        use_dropout: bool = True,
        model_path: str | os.PathLike | None = None,
        eval_mode: bool = True,
        verbose: bool = False,
        *,
        trunk_path: str | os.PathLike | None = None,
        nonfinite: str = "raise",
        lin: str | None = None,
    ) -> None:
        super().__init__()
        self.pnet_type = net
        net_c = canonical_net_name(net)
        self.version = canonical_version(version)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite: got {nonfinite!r}, expected one of {NONFINITE_POLICIES}")
        if verbose:
            print(
                "Setting up [%s] perceptual loss: trunk [%s], v[%s], spatial [%s]"
                % ("LPIPS" if lpips else "baseline", net, self.version, "on" if spatial else "off")
            )
        self.pnet_tune = pnet_tune
        self.pnet_rand = pnet_rand
        self.spatial = spatial
        self.lpips = lpips
        self.use_dropout = use_dropout
        self.nonfinite = nonfinite
        self.scaling_layer = ScalingLayer()
        self.chns = list(TRUNK_CHANNELS[net_c])
        self.L = len(self.chns)

        # Weights about to be overwritten are never initialised: no time spent, no draw from the
        # global RNG (a seeded script draws the same numbers after LPIPS(...) as before it).
        self.net = build_trunk(net_c, init=pnet_rand and trunk_path is None)
        if not pnet_rand:
            from . import weights

            self.net.load_torchvision_features(weights.trunk_state_dict(net_c, path=trunk_path))
        elif trunk_path is not None:
            self.net.load_torchvision_features(read_checkpoint(trunk_path))
        self.net.requires_grad_(pnet_tune)
        # alex/squeeze: NHWC convolutions are 1.3-2.6x faster on oneDNN (CPU; measured in
        # benchmarks/README.md), values equal NCHW to float rounding, input gradients within 1e-4.
        # vgg: NHWC input is ~1.4x faster for the forward (weights stay NCHW), but its backward's
        # input gradients drift (0.6% of the largest), so vgg uses it only when no gradient flows
        # through the trunk. load_state_dict / .to(device) keep the format; state_dict() values
        # are unchanged.
        self._channels_last = net_c in ("alex", "squeeze")
        self._channels_last_no_grad = net_c == "vgg"
        if self._channels_last:
            self.net.to(memory_format=torch.channels_last)

        if lpips:
            lins = _build_lins(self.chns, use_dropout, init=not pretrained)
            for k, layer in enumerate(lins):
                setattr(self, f"lin{k}", layer)
            self.lins = nn.ModuleList(lins)
            if pretrained or lin is not None:
                sd = self._select_lin_weights(net_c, lin, model_path, verbose)
                self._load_lin(sd, source=str(model_path or "packaged weights"))
        if eval_mode:
            self.eval()

    # -- weights -------------------------------------------------------------------------
    def _select_lin_weights(self, net_c: str, lin: str | None, model_path, verbose: bool) -> Mapping[str, torch.Tensor]:
        """The lin state dict to load: a named set (``lin=``), ``model_path``, or the packaged one."""
        if lin is not None:
            # A named lin set (lpips_fast.weights.registry): verified, checked against net/version.
            if model_path is not None:
                raise ValueError("lin: give either lin= (a registered set) or model_path=, not both")
            from .weights.registry import lin_state_dict_for

            return lin_state_dict_for(lin, net_c, self.version)[0]
        if model_path is None:
            from . import weights

            sd = weights.lin_state_dict(net_c, self.version)
            if verbose:
                print("Loading model from: packaged lpips v%s %s lin weights" % (self.version, net_c))
            return sd
        if verbose:
            print("Loading model from: %s" % model_path)
        return read_checkpoint(model_path)

    def _load_lin(self, sd: Mapping[str, torch.Tensor], source: str) -> None:
        sd = dict(sd)
        if not any(k.startswith("lin") for k in sd):
            raise ValueError(f"model_path: {source} holds no lin{{k}}.model.*.weight keys (got {sorted(sd)[:5]}...)")
        missing, _ = self.load_state_dict(sd, strict=False)
        lin_missing = [k for k in missing if k.startswith("lin")]
        # lins.K and linK share parameters: one of the two spellings is enough.
        lin_missing = [
            k for k in lin_missing
            if not any(alt not in missing for alt in _lin_aliases(k))
        ]
        if lin_missing:
            raise ValueError(f"model_path: {source} lacks lin weights {lin_missing}")

    def lin_weights(self) -> list[torch.Tensor | None]:
        """Per-layer channel weights (C,) as views of the lin parameters (None when lpips=False)."""
        if not self.lpips:
            return [None] * self.L
        return [lin.weight.view(-1) for lin in self.lins]

    # -- forward pieces (used by the engine and the dataset layer) ------------------------
    def preprocess(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[0,1] -> [-1,1] if ``normalize``, then the v0.1 scaling layer; gray -> RGB."""
        if normalize:
            x = 2 * x - 1
        if self.version == "0.1":
            x = self.scaling_layer(x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x

    def _trunk_needs_grad(self) -> bool:
        """Whether autograd will go through the trunk's own parameters (pnet_tune)."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.net.parameters())

    def _trunk(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Trunk taps of a preprocessed batch, in the fastest exact memory format."""
        nhwc = self._channels_last or (
            self._channels_last_no_grad
            and not ((torch.is_grad_enabled() and x.requires_grad) or self._trunk_needs_grad())
        )
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        with nvtx_range("lpips_fast/trunk"):
            return self.net(x)

    def features(self, x: torch.Tensor, normalize: bool = False) -> list[torch.Tensor]:
        """Trunk taps of one already-validated batch."""
        with nvtx_range("lpips_fast/preprocess"):
            x = self.preprocess(x, normalize)
        return self._trunk(x)

    def distances(
        self,
        feats0: list[torch.Tensor],
        feats1: list[torch.Tensor],
        out_hw: tuple[int, int] | None = None,
        retPerLayer: bool = False,
        spatial: bool | None = None,
        same: torch.Tensor | None = None,
    ):
        """Combine per-layer features into the LPIPS value (the reference's forward from step 4 on).

        ``spatial`` overrides the module's setting: (N,1,1,1) values, or (N,1,H,W) maps upsampled
        to ``out_hw``. ``same``: an optional (N,) bool mask of pairs whose images are bitwise
        equal; they score exactly 0 with a zero gradient (the mathematical value), whatever the
        rounding of their features.
        """
        spatial = self.spatial if spatial is None else spatial
        dropout = self.lpips and self.training and self.use_dropout
        weights = self.lin_weights()
        with nvtx_range("lpips_fast/distance"):
            if retPerLayer or dropout:
                res = [self._layer_distance(k, f0, f1, w, spatial, dropout)
                       for k, (f0, f1, w) in enumerate(zip(feats0, feats1, weights))]
            elif spatial:
                res = lpips_distances(feats0, feats1, weights, spatial=True)
            else:
                # All layers in one op call; the sum over layers comes out of the op.
                val = lpips_distances(feats0, feats1, weights).view(-1, 1, 1, 1)
                return _zero_where(same, val)
            if spatial:
                res = [F.interpolate(r, size=tuple(out_hw), mode="bilinear", align_corners=False) for r in res]
        val = res[0]
        for r in res[1:]:
            val = val + r
        if retPerLayer:
            return _zero_where(same, val), [_zero_where(same, r) for r in res]
        return _zero_where(same, val)

    def _layer_distance(
        self, k: int, f0: torch.Tensor, f1: torch.Tensor, w: torch.Tensor | None, spatial: bool, dropout: bool
    ) -> torch.Tensor:
        """One layer's (N,1,1,1) value or (N,1,h,w) map (before upsampling)."""
        if dropout:
            # Training the lin layers with dropout: materialise the diff (reference order), NCHW so
            # that dropout draws its mask in the reference's element order.
            d = self.lins[k](_unit_diff_sq(f0, f1).contiguous())
            return d if spatial else d.mean([2, 3], keepdim=True)
        r = lpips_distance(f0, f1, w, spatial=spatial)
        return r if spatial else r.view(-1, 1, 1, 1)

    def _pair_features(self, in0: torch.Tensor, in1: torch.Tensor, normalize: bool):
        grad_on = torch.is_grad_enabled()
        trunk_grad = self._trunk_needs_grad()
        need0 = grad_on and in0.requires_grad
        need1 = grad_on and in1.requires_grad
        n0 = in0.shape[0]
        if (need0 == need1 or trunk_grad) and in0.dtype == in1.dtype:
            # One batched trunk pass for both images.
            with nvtx_range("lpips_fast/preprocess"):
                x = torch.cat([self.preprocess(in0, normalize), self.preprocess(in1, normalize)])
            outs = self._trunk(x)
            return [o[:n0] for o in outs], [o[n0:] for o in outs]
        # Only one side needs gradients: never pay the trunk's backward for the other one.
        with torch.set_grad_enabled(need0 or trunk_grad):
            f0 = self.features(in0, normalize)
        with torch.set_grad_enabled(need1 or trunk_grad):
            f1 = self.features(in1, normalize)
        return f0, f1

    def forward(self, in0: torch.Tensor, in1: torch.Tensor, retPerLayer: bool = False, normalize: bool = False):
        p = self.scaling_layer.shift
        in0, in1 = check_image_pair(in0, in1, device=p.device, min_size=self.net.min_size, net=self.pnet_type)
        if self.nonfinite == "raise":
            check_finite(in0, in1)
        if 0 in (in0.shape[0], in1.shape[0]):
            shape = (0, 1) + (tuple(in0.shape[2:]) if self.spatial else (1, 1))
            out = in0.new_zeros(shape)
            return (out, [out.clone() for _ in range(self.L)]) if retPerLayer else out
        feats0, feats1 = self._pair_features(in0, in1, normalize)
        same = identical_pairs(in0, in1)
        return self.distances(feats0, feats1, out_hw=in0.shape[2:], retPerLayer=retPerLayer, same=same)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "LPIPS does not support torch.jit.script (its forward dispatches on Python-level "
            "settings and calls custom ops with list arguments). Supported: torch.jit.trace "
            "(the traced module loads after `import lpips_fast`), torch.compile, torch.export, "
            "and lpips_fast.deploy.export (ONNX, AOTInductor)."
        )


def _lin_aliases(key: str) -> list[str]:
    # lin3.model.1.weight <-> lins.3.model.1.weight
    head, rest = key.split(".", 1)
    if head == "lins":
        k, rest2 = rest.split(".", 1)
        return [f"lin{k}.{rest2}"]
    return [f"lins.{head[3:]}.{rest}"]


def identical_pairs(in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which pairs (after broadcasting a batch of 1) hold bitwise-equal images.

    One elementwise compare of the inputs, far cheaper than the trunk, and no device sync.
    """
    return (in0 == in1).flatten(1).all(dim=1)


def _zero_where(same: torch.Tensor | None, val: torch.Tensor) -> torch.Tensor:
    if same is None:
        return val
    return torch.where(same.view(-1, *([1] * (val.dim() - 1))), torch.zeros((), dtype=val.dtype, device=val.device), val)


def _build_lins(chns: list[int], use_dropout: bool, init: bool) -> list[NetLinLayer]:
    """The lin layers, randomly initialised (global RNG, as the reference) or, with ``init=False``,
    uninitialised memory for weights that are loaded next."""
    if init:
        return [NetLinLayer(c, use_dropout=use_dropout) for c in chns]
    with torch.device("meta"):
        lins = [NetLinLayer(c, use_dropout=use_dropout) for c in chns]
    return [lin.to_empty(device="cpu") for lin in lins]


def _unit_diff_sq(f0: torch.Tensor, f1: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # The op's masked normalisation: a zero gradient, not NaN, at all-zero feature columns.
    return (unit_normalize(f0, eps) - unit_normalize(f1, eps)) ** 2
