"""The ranking head of the LPIPS training recipe (the reference's ``Dist2LogitLayer`` /
``BCERankingLoss``, lpips 0.1.4).

From the two distances of a triplet the head predicts the fraction of people who prefer p1:
five features ``(d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps))`` (eps = 0.1) go through
1x1 convolutions 5 -> 32 -> 32 -> 1 with LeakyReLU(0.2) between them and a sigmoid at the end;
the loss is the binary cross-entropy against the judge. State-dict keys are the reference's
(``model.0.weight`` ... ``model.4.bias``), so its saved ``*_net_rank.pth`` heads load.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Dist2LogitLayer", "BCERankingLoss"]


class Dist2LogitLayer(nn.Module):
    """(d0, d1) -> predicted probability that p1 is preferred; inputs and output (N,1,1,1)."""

    def __init__(self, chn_mid: int = 32, use_sigmoid: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(5, chn_mid, 1, bias=True),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(chn_mid, chn_mid, 1, bias=True),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(chn_mid, 1, 1, bias=True),
        ]
        if use_sigmoid:
            layers.append(nn.Sigmoid())
        self.model = nn.Sequential(*layers)

    def forward(self, d0: torch.Tensor, d1: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
        x = torch.cat((d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)), dim=1)
        return self.model(x)


class BCERankingLoss(nn.Module):
    """Binary cross-entropy between the head's prediction and ``judge`` in [0, 1]."""

    def __init__(self, chn_mid: int = 32) -> None:
        super().__init__()
        self.net = Dist2LogitLayer(chn_mid=chn_mid)
        self.loss = nn.BCELoss()

    def forward(self, d0: torch.Tensor, d1: torch.Tensor, judge: torch.Tensor) -> torch.Tensor:
        return self.loss(self.net(d0, d1), judge.reshape(d0.shape).to(d0.dtype))
