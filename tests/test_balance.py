"""trainer.builtin.balance: what the real training loop draws and optimizes on imbalanced data.

The batches are observed where the model receives them (a global forward pre-hook on the MLP
while it trains), so the test sees what the loop actually feeds the model.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from kubetune.builtin.data import load_dataset
from kubetune.builtin.mlp import build_mlp, class_weights, resolve_params, train

IMBALANCED = {"name": "synthetic", "samples": 400, "features": 6, "informative": 4,
              "classes": 2, "classWeights": [0.9, 0.1], "seed": 3}


def _training_batches(data, balance: str, **params) -> list[Counter]:
    """Class counts of every batch the model trained on."""
    label_of = {row.tobytes(): int(label) for row, label in zip(data.X_train, data.y_train)}
    assert len(label_of) == len(data.y_train)  # every row tells its label
    batches: list[Counter] = []

    def record(module, inputs):
        if isinstance(module, nn.Sequential) and module.training:
            rows = inputs[0].detach().cpu().numpy()
            batches.append(Counter(label_of[row.tobytes()] for row in rows))

    handle = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train({"epochs": 2, "batch_size": 32, "hidden": 8, **params}, data, seed=0,
              device="cpu", balance=balance)
    finally:
        handle.remove()
    return batches


def test_oversampling_trains_on_class_balanced_batches():
    data = load_dataset(IMBALANCED, {})
    counts = np.bincount(data.y_train)
    assert counts[1] / counts.sum() < 0.15  # the data really is imbalanced

    plain = _training_batches(data, "none")
    balanced = _training_batches(data, "oversample")

    assert sum(b[1] for b in plain) / sum(sum(b.values()) for b in plain) < 0.15
    full = [b for b in balanced if sum(b.values()) == 32]
    assert len(full) >= 2 * (len(data.y_train) // 32)  # both epochs, every full batch
    assert all(b[0] == b[1] == 16 for b in full), full
    # each epoch still trains on as many rows as the data has (rounded up to a pair)
    assert sum(sum(b.values()) for b in balanced) == 2 * 2 * -(-len(data.y_train) // 2)


def test_inverse_frequency_weights():
    weights = class_weights(np.array([0] * 90 + [1] * 10), 2)
    assert weights == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])
    assert class_weights(np.array([0, 1, 2] * 5), 3) == pytest.approx([1, 1, 1])
    assert class_weights(np.array([0, 0, 2]), 3) == pytest.approx([0.75, 0, 1.5])


@pytest.mark.parametrize("balance", ["none", "weighted"])
def test_the_training_loss_is_weighted_by_class(balance):
    """One full-batch epoch with a negligible learning rate: the reported train_loss is the
    initial model's cross-entropy, weighted by inverse class frequency with balance weighted."""
    data = load_dataset(IMBALANCED, {})
    params = {"epochs": 1, "batch_size": 4096, "hidden": 8, "lr": 1e-12}
    model = build_mlp(data.n_features, data.n_classes, resolve_params(params),
                      generator=torch.Generator().manual_seed(0))
    logits = model(torch.tensor(data.X_train))
    targets = torch.tensor(data.y_train)
    weight = torch.tensor(class_weights(data.y_train, 2), dtype=torch.float32)
    weighted = nn.functional.cross_entropy(logits, targets, weight=weight).item()
    plain = nn.functional.cross_entropy(logits, targets).item()
    assert abs(weighted - plain) > 0.01  # the weights make a difference here

    result = train(params, data, seed=0, device="cpu", balance=balance)

    expected = weighted if balance == "weighted" else plain
    assert result.history[0]["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_an_unknown_balance_is_refused():
    data = load_dataset(IMBALANCED, {})
    with pytest.raises(ValueError, match="unknown balance 'smote'"):
        train({"epochs": 1}, data, seed=0, device="cpu", balance="smote")
