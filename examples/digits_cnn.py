"""A small CNN on scikit-learn's 8×8 digits, trained by peerlearn (README, "Train a PyTorch
model").

Three daemons on one machine, Alg 1::

    peerlearn run --problem examples.digits_cnn:problem --listen 127.0.0.1:7001 \\
        --peers 127.0.0.1:7002,127.0.0.1:7003 --api 127.0.0.1:8101 --steps 600 --lr 0.1 \\
        --exit-on-finish

(and the same with the addresses rotated, each with an API port of its own). ``problem`` is
what ``--problem`` names; ``model``, ``digits`` and ``loss`` are what
:func:`peerlearn.torch.train` takes in a script.
"""

from __future__ import annotations

from typing import Literal

import torch
from sklearn.datasets import load_digits
from torch import nn

from peerlearn.torch import TorchProblem, data_split


def model() -> nn.Module:
    """Two 3×3 convolutions with pooling, then a linear layer: 1,898 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 10),
    )


def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The 1,797 digits scaled to [0, 1], a fixed 75/25 split (the same in every process)."""
    digits = load_digits()
    inputs = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    targets = torch.tensor(digits.target, dtype=torch.int64)
    return data_split(inputs, targets, test_fraction=0.25, seed=0)


loss = nn.functional.cross_entropy


def problem(
    batch_size: int = 32, data: Literal["shard", "sample"] = "shard", seed: int = 0
) -> TorchProblem:
    """``--problem examples.digits_cnn:problem``; ``--set problem.params.data=sample`` etc."""
    return TorchProblem(model, digits, loss, batch_size=batch_size, data=data, seed=seed)
