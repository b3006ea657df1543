"""FedBN: Federated Learning on Non-IID Features via Local Batch Normalization [Li et al., 2021].

Paper: https://openreview.net/pdf?id=6YEQUn0QICG
"""

from __future__ import annotations

from flwr.app import ConfigRecord

from hdf import contract as K
from server.strategy.base import SourceFedAvg


class FedBN(SourceFedAvg):
    """FedAvg whose clients keep their normalization layers local.

    Implementation based on https://openreview.net/pdf?id=6YEQUn0QICG. Every train and evaluate
    config carries `fedbn = 1`; a client that sees it **must** keep the parameters and running
    statistics of its normalization layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm) in
    `context.state` and overwrite the received ones with them before training or evaluating
    (client/app.py does). The server still averages every array, so a held-out source, which has
    no local statistics, is scored with the averaged (global) ones. In-distribution validation
    therefore measures each site's personalised model, as in the paper.

    Takes `SourceFedAvg`'s parameters.
    """

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        out = super().train_config(server_round, config)
        out[K.FEDBN] = 1
        return out

    def evaluate_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """Evaluate as FedAvg does, with the flag so sites apply their own norm layers."""
        out = super().evaluate_config(server_round, config)
        out[K.FEDBN] = 1
        return out
