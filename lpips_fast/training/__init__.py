"""Train and evaluate the metric on BAPPS-format 2AFC/JND data.

- ``bapps``: the folder layout, loader and decoding (``open_2afc``, ``open_jnd``, ``iter_batches``).
- ``scores``: ``score_2afc``, ``score_jnd`` (the reference's definitions), ``score_table``, ``voc_ap``.
- ``head``: the ranking head ``Dist2LogitLayer`` / ``BCERankingLoss``.
- ``trainer``: ``train()``, the reference recipe on cached trunk features.
- ``synthetic``: small BAPPS-format folders judged by a teacher metric.
"""

from __future__ import annotations

from .bapps import BappsError, JNDSet, TwoAFCSet, iter_batches, open_2afc, open_jnd, read_rgb, to_input
from .head import BCERankingLoss, Dist2LogitLayer
from .scores import jnd_map, score_2afc, score_jnd, score_table, twoafc_agreement, voc_ap
from .trainer import FeatureCacheError, TrainResult, learning_rates, make_optimizer, save_weights, train, train_step

__all__ = [
    "BappsError",
    "FeatureCacheError",
    "TwoAFCSet",
    "JNDSet",
    "open_2afc",
    "open_jnd",
    "iter_batches",
    "read_rgb",
    "to_input",
    "Dist2LogitLayer",
    "BCERankingLoss",
    "score_2afc",
    "score_jnd",
    "score_table",
    "twoafc_agreement",
    "jnd_map",
    "voc_ap",
    "train",
    "TrainResult",
    "train_step",
    "make_optimizer",
    "learning_rates",
    "save_weights",
]
