"""Tests for kubetune.builtin.mlp: model building, training loop, divergence and callbacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kubetune.builtin.data import Dataset, load_dataset
from kubetune.builtin.mlp import (
    ACTIVATIONS,
    DEFAULT_PARAMS,
    INITS,
    OPTIMIZERS,
    REPORTED_METRICS,
    build_mlp,
    make_optimizer,
    predict_proba,
    train,
)

SPLIT = {"validation": 0.2, "test": 0.2, "seed": 0}
SMALL = {"epochs": 1, "hidden": 16, "batch_size": 32}


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset({"name": "digits"}, SPLIT)


@pytest.fixture(scope="module")
def tiny() -> Dataset:
    """A small problem that makes a one-epoch run take milliseconds."""
    return load_dataset({"name": "synthetic", "samples": 300, "features": 8, "classes": 3}, SPLIT)


def test_digits_adam_learns(digits: Dataset) -> None:
    result = train({"optimizer": "adam", "epochs": 5}, digits, seed=0, device="cpu")
    assert len(result.history) == 5
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]
    assert result.history[-1]["val_accuracy"] > 0.9
    assert result.val_proba.shape == (len(digits.y_val), 10)
    assert result.test_proba.shape == (len(digits.y_test), 10)
    assert result.val_proba.dtype == np.float32 and result.test_proba.dtype == np.float32
    assert not result.model.training
    assert all(p.device.type == "cpu" for p in result.model.parameters())


def test_same_seed_same_history_and_global_rng_untouched(tiny: Dataset) -> None:
    params = {**SMALL, "epochs": 3, "dropout": 0.3}
    rng_state = torch.get_rng_state()
    first = train(params, tiny, seed=7, device="cpu")
    assert torch.equal(torch.get_rng_state(), rng_state)
    second = train(params, tiny, seed=7, device="cpu")
    other = train(params, tiny, seed=8, device="cpu")
    assert first.history == second.history
    np.testing.assert_array_equal(first.test_proba, second.test_proba)
    assert other.history != first.history


def test_metrics_keys_are_exactly_reported_metrics(tiny: Dataset) -> None:
    seen: list[tuple[int, dict[str, float]]] = []
    result = train({**SMALL, "epochs": 2}, tiny, seed=0, device="cpu", on_epoch=lambda e, m: seen.append((e, m)))
    assert [epoch for epoch, _ in seen] == [1, 2]
    for _, metrics in seen:
        assert tuple(metrics) == REPORTED_METRICS
        assert all(isinstance(v, float) for v in metrics.values())
    assert set(result.history[0]) == {"epoch", *REPORTED_METRICS}


@pytest.mark.parametrize(
    "override",
    [{"activation": a} for a in ACTIVATIONS]
    + [{"init": i} for i in INITS]
    + [{"optimizer": o} for o in OPTIMIZERS]
    + [
        {"batch_norm": True, "batch_size": 179},  # 180 train rows: a 1-row tail batch
        {"dropout": 0.5},
        {"grad_clip": 0.5},
        {"layers": 0},
        {"lr_halving_patience": 1, "epochs": 2},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_every_option_builds_and_trains(tiny: Dataset, override: dict[str, object]) -> None:
    result = train({**SMALL, **override}, tiny, seed=0, device="cpu")
    assert len(result.history) == override.get("epochs", 1)
    assert math.isfinite(result.history[-1]["train_loss"])
    np.testing.assert_allclose(result.val_proba.sum(axis=1), 1.0, atol=1e-5)


def test_build_mlp_structure() -> None:
    model = build_mlp(5, 3, {"layers": 2, "hidden": 8, "batch_norm": True, "activation": "tanh", "dropout": 0.1})
    kinds = [type(m) for m in model]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.Tanh, nn.Dropout] * 2 + [nn.Linear]
    assert all((m.bias == 0).all() for m in model if isinstance(m, nn.Linear))
    assert [type(m) for m in build_mlp(5, 3, {"layers": 0})] == [nn.Linear]


def test_unknown_names_raise_value_error(tiny: Dataset) -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        train({"learning_rate": 0.1}, tiny, seed=0, device="cpu")
    with pytest.raises(ValueError, match="swish"):
        build_mlp(4, 2, {"activation": "swish"})
    with pytest.raises(ValueError, match="lbfgs"):
        make_optimizer("lbfgs", build_mlp(4, 2, {}).parameters(), 0.1, 0.0, 0.9)


def test_optimizer_momentum_and_weight_decay() -> None:
    params = list(build_mlp(4, 2, {}).parameters())
    sgd = make_optimizer("sgd", params, 0.1, 1e-4, 0.8)
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"] is False
    assert sgd.defaults["weight_decay"] == 1e-4
    assert make_optimizer("rmsprop", params, 0.1, 0.0, 0.7).defaults["momentum"] == 0.7
    assert isinstance(make_optimizer("adamw", params, 0.1, 0.01, 0.7), torch.optim.AdamW)


def test_divergence_reports_nan_without_raising(digits: Dataset) -> None:
    result = train({"optimizer": "sgd", "lr": 1e3, "epochs": 2}, digits, seed=0, device="cpu")
    assert len(result.history) == 2
    loss = result.history[0]["train_loss"]
    assert math.isnan(loss) or loss > 1e3
    assert result.history[-1]["val_f1"] == 0.0 or not math.isfinite(result.history[-1]["val_loss"])


class _Stop(Exception):
    pass


def test_on_epoch_exception_stops_training(tiny: Dataset) -> None:
    calls: list[int] = []
    error = _Stop("pruned")

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        calls.append(epoch)
        if epoch == 2:
            raise error

    with pytest.raises(_Stop) as info:
        train({**SMALL, "epochs": 10}, tiny, seed=0, device="cpu", on_epoch=on_epoch)
    assert info.value is error
    assert calls == [1, 2]


def test_predict_proba_rows_sum_to_one(tiny: Dataset) -> None:
    model = train(SMALL, tiny, seed=0, device="cpu").model
    proba = predict_proba(model, tiny.X_test)
    assert proba.shape == (len(tiny.y_test), tiny.n_classes) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert (proba >= 0).all()


def test_default_params_cover_every_knob() -> None:
    assert set(DEFAULT_PARAMS) == {
        "lr", "weight_decay", "momentum", "dropout", "layers", "hidden", "activation", "init",
        "optimizer", "batch_size", "epochs", "grad_clip", "lr_halving_patience", "batch_norm",
    }  # fmt: skip
