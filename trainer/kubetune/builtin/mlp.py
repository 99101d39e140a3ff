"""The built-in trainer: a configurable PyTorch MLP and its training loop.

Divergence is an expected outcome of hyperparameter search, not a bug, so the
loop never raises on NaN/inf: it reports non-finite metrics and lets the
caller prune the trial.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn

from kubetune.builtin.data import Dataset
from kubetune.spec.knobs import (
    ACTIVATIONS,
    BALANCE_MODES,
    DEFAULT_PARAMS,
    INITS,
    OPTIMIZERS,
    REPORTED_METRICS,
)

__all__ = ["ACTIVATIONS", "DEFAULT_PARAMS", "INITS", "OPTIMIZERS", "REPORTED_METRICS",
           "TrainResult", "build_mlp", "class_weights", "epoch_order", "make_optimizer",
           "predict_proba", "train"]

EVAL_BATCH_ROWS = 4096
_LEAKY_SLOPE = 0.01  # nn.LeakyReLU's default, mirrored in the he_* gain
_ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(_LEAKY_SLOPE),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}
_KAIMING_NONLINEARITY = {"relu": "relu", "leaky_relu": "leaky_relu", "tanh": "tanh", "sigmoid": "sigmoid"}


@dataclass
class TrainResult:
    """What a finished training run hands to the objective and the ensemble."""

    model: nn.Module
    history: list[dict[str, float]]
    val_proba: np.ndarray
    test_proba: np.ndarray


def resolve_params(params: dict[str, Any]) -> dict[str, Any]:
    """Overlay `params` on DEFAULT_PARAMS, rejecting unknown keys (likely typos)."""
    unknown = sorted(set(params) - set(DEFAULT_PARAMS))
    if unknown:
        raise ValueError(f"unknown MLP parameter(s) {unknown}; valid: {sorted(DEFAULT_PARAMS)}")
    return {**DEFAULT_PARAMS, **params}


def _check_choice(kind: str, value: object, valid: tuple[str, ...]) -> str:
    """Return `value` if it is one of `valid`, else raise a ValueError listing the options."""
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(valid)}")
    return str(value)


def build_mlp(
    n_features: int,
    n_classes: int,
    params: dict[str, Any],
    *,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Build `layers` x [Linear, (BatchNorm1d), activation, Dropout] then a logits Linear.

    `generator` makes the weight init reproducible without touching global RNG state.
    """
    p = resolve_params(params)
    activation = _check_choice("activation", p["activation"], ACTIVATIONS)
    init = _check_choice("init", p["init"], INITS)
    blocks: list[nn.Module] = []
    width = n_features
    for _ in range(int(p["layers"])):
        linear = nn.Linear(width, int(p["hidden"]))
        _init_linear(linear, init, _KAIMING_NONLINEARITY.get(activation, "relu"), generator)
        blocks.append(linear)
        if p["batch_norm"]:
            blocks.append(nn.BatchNorm1d(int(p["hidden"])))
        blocks += [_ACTIVATION_MODULES[activation](), nn.Dropout(float(p["dropout"]))]
        width = int(p["hidden"])
    head = nn.Linear(width, n_classes)
    _init_linear(head, init, "linear", generator)  # logits pass through no activation
    return nn.Sequential(*blocks, head)


def _init_linear(layer: nn.Linear, init: str, nonlinearity: str, generator: torch.Generator | None) -> None:
    """Initialize weights per `init` (he_* gain matched to `nonlinearity`) and zero the bias."""
    weight = layer.weight
    if init == "xavier_uniform":
        nn.init.xavier_uniform_(weight, generator=generator)
    elif init == "xavier_normal":
        nn.init.xavier_normal_(weight, generator=generator)
    elif init == "he_uniform":
        nn.init.kaiming_uniform_(weight, a=_LEAKY_SLOPE, nonlinearity=nonlinearity, generator=generator)
    elif init == "he_normal":
        nn.init.kaiming_normal_(weight, a=_LEAKY_SLOPE, nonlinearity=nonlinearity, generator=generator)
    else:
        nn.init.orthogonal_(weight, generator=generator)
    nn.init.zeros_(layer.bias)


def make_optimizer(
    name: str,
    parameters: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float,
    momentum: float,
) -> torch.optim.Optimizer:
    """Create optimizer `name`; only sgd and rmsprop use `momentum`, all get `weight_decay`."""
    name = _check_choice("optimizer", name, OPTIMIZERS)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    plain = {
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "adadelta": torch.optim.Adadelta,
        "adagrad": torch.optim.Adagrad,
    }
    return plain[name](parameters, lr=lr, weight_decay=weight_decay)


def resolve_device(device: str) -> torch.device:
    """Map "auto" to cuda when available, else cpu; reject cuda when there is none."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(device)


def train(
    params: dict[str, Any],
    data: Dataset,
    *,
    seed: int,
    device: str = "auto",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_snapshot: Callable[[int, nn.Module], None] | None = None,
    balance: str = "none",
) -> TrainResult:
    """Train the MLP on `data`, calling `on_epoch(epoch, metrics)` after each 1-based epoch.

    `balance` handles class imbalance (``trainer.builtin.balance``): "oversample" draws each
    epoch's rows class-balanced (see `epoch_order`), "weighted" weights the training loss by
    inverse class frequency (see `class_weights`). train_loss and train_accuracy are measured
    on what the model trains on; the validation metrics are always unweighted.

    Exceptions from `on_epoch` (e.g. optuna.TrialPruned) propagate unchanged. `on_snapshot(epoch,
    model)`, when given, is called after `on_epoch` with the model as it is at that epoch, for
    callers that keep checkpoints (snapshot ensembles); it may evaluate the model but must not
    change its weights. Training then goes on exactly as without it.
    """
    p = resolve_params(params)
    _check_choice("balance", balance, BALANCE_MODES)
    dev = resolve_device(device)
    cuda_devices = [torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)  # dropout draws from the global RNG; fork_rng keeps the caller's intact
        return _train(p, data, seed=seed, dev=dev, on_epoch=on_epoch, on_snapshot=on_snapshot,
                      balance=balance)


def _train(
    p: dict[str, Any],
    data: Dataset,
    *,
    seed: int,
    dev: torch.device,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
    on_snapshot: Callable[[int, nn.Module], None] | None = None,
    balance: str = "none",
) -> TrainResult:
    """The epoch loop of `train`, run with seeded RNG state."""
    generator = torch.Generator().manual_seed(seed)
    model = build_mlp(data.n_features, data.n_classes, p, generator=generator).to(dev)
    optimizer = make_optimizer(
        p["optimizer"], model.parameters(), float(p["lr"]), float(p["weight_decay"]), float(p["momentum"])
    )
    scheduler = _make_scheduler(optimizer, int(p["lr_halving_patience"]))
    X_train, y_train = _to_tensors(data.X_train, data.y_train, dev)
    X_val, y_val = _to_tensors(data.X_val, data.y_val, dev)
    weight = None
    if balance == "weighted":
        weight = torch.tensor(class_weights(data.y_train, data.n_classes), dtype=torch.float32, device=dev)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    oversample = balance == "oversample"
    history: list[dict[str, float]] = []
    n_params = float(sum(t.numel() for t in model.parameters() if t.requires_grad))
    for epoch in range(1, int(p["epochs"]) + 1):
        order = epoch_order(y_train, generator, balanced=oversample)
        train_loss, train_accuracy = _train_epoch(
            model, optimizer, X_train, y_train, order, int(p["batch_size"]), float(p["grad_clip"]), loss_fn
        )
        metrics = {
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            **_evaluate(model, X_val, y_val),
            "n_params": n_params,
        }
        if scheduler is not None:
            scheduler.step(metrics["val_loss"])
        history.append({"epoch": epoch, **metrics})
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if on_snapshot is not None:
            on_snapshot(epoch, model)
    val_proba = predict_proba(model, data.X_val, device=dev)
    test_proba = predict_proba(model, data.X_test, device=dev)
    return TrainResult(model.cpu().eval(), history, val_proba, test_proba)


def _make_scheduler(
    optimizer: torch.optim.Optimizer, patience: int
) -> torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    """Halve the learning rate when val_loss plateaus; patience 0 disables it."""
    if patience <= 0:
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=patience)


def _to_tensors(X: np.ndarray, y: np.ndarray, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a split onto the device once, so batches are cheap index operations."""
    return torch.tensor(X, dtype=torch.float32, device=dev), torch.tensor(y, dtype=torch.long, device=dev)


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency class weights ``n / (K * count_c)`` (scikit-learn's "balanced").

    Every class then weighs as much in the loss as a perfectly balanced dataset would give it;
    on balanced data all weights are 1. A class absent from `y` gets weight 0.
    """
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.float64)
    weights = np.zeros(n_classes)
    present = counts > 0
    weights[present] = len(y) / (int(present.sum()) * counts[present])
    return weights


def epoch_order(y: torch.Tensor, generator: torch.Generator, *, balanced: bool = False) -> torch.Tensor:
    """The rows one epoch trains on, in order: a random permutation of all rows, or, with
    `balanced`, class-balanced batches.

    Balanced: every class gets the same number of draws, ceil(n / K) for n rows and K classes
    (minority rows repeated, majority rows subsampled afresh each epoch); the draws of each
    class are shuffled and the classes interleaved, so any run of K consecutive rows holds one
    row of every class and a batch of B rows holds B / K rows of each class (give or take one).
    """
    n = len(y)
    if not balanced:
        return torch.randperm(n, generator=generator).to(y.device)
    y_cpu = y.cpu()
    classes = [torch.nonzero(y_cpu == c).flatten() for c in torch.unique(y_cpu)]
    per_class = -(-n // len(classes))
    picked = []
    for rows in classes:
        # whole shuffled passes over the class, cut to size: within a class, no row is drawn
        # more than once more often than another
        passes = -(-per_class // len(rows))
        draws = torch.cat([rows[torch.randperm(len(rows), generator=generator)] for _ in range(passes)])
        picked.append(draws[:per_class])
    return torch.stack(picked, dim=1).flatten().to(y.device)


def _batch_indices(order: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield `order` in batches, keeping the last partial batch.

    A trailing batch of one row is merged into the previous one: BatchNorm cannot
    normalize a single sample in training mode.
    """
    n = len(order)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        yield order[start:end]


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    X: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    grad_clip: float,
    loss_fn: nn.Module,
) -> tuple[float, float]:
    """Run one epoch over the rows in `order`; return (mean batch loss, accuracy of the
    epoch's predictions).

    A non-finite batch loss ends the epoch at once, without a step, and the
    epoch's loss is reported as NaN.
    """
    model.train()
    losses: list[float] = []
    correct = torch.zeros((), dtype=torch.long, device=X.device)
    seen = 0
    for idx in _batch_indices(order, batch_size):
        logits = model(X[idx])
        loss = loss_fn(logits, y[idx])
        correct += (logits.argmax(dim=1) == y[idx]).sum()
        seen += len(idx)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            return float("nan"), correct.item() / seen
        losses.append(loss_value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    return float(np.mean(losses)), correct.item() / seen


@torch.no_grad()
def _logits(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """Evaluate `model` in eval mode in row batches, so large splits fit in memory."""
    model.eval()
    return torch.cat([model(X[i : i + EVAL_BATCH_ROWS]) for i in range(0, len(X), EVAL_BATCH_ROWS)])


def _evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Validation loss, accuracy and macro F1; rows with non-finite logits count as wrong."""
    logits = _logits(model, X)
    loss = nn.functional.cross_entropy(logits, y).item()
    finite_rows = torch.isfinite(logits).all(dim=1)
    predictions = logits.argmax(dim=1)
    accuracy = ((predictions == y) & finite_rows).float().mean().item()
    if bool(finite_rows.all()):
        f1 = float(f1_score(y.cpu().numpy(), predictions.cpu().numpy(), average="macro", zero_division=0))
    else:
        f1 = 0.0
    return {"val_loss": loss, "val_accuracy": accuracy, "val_f1": f1}


def predict_proba(model: nn.Module, X: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
    """Softmax class probabilities (float32, one row per sample) for standardized `X`.

    The model is moved to `device` and left there in eval mode.
    """
    dev = torch.device(device)
    model.to(dev)
    logits = _logits(model, torch.tensor(X, dtype=torch.float32, device=dev))
    return torch.softmax(logits, dim=1).cpu().numpy().astype(np.float32)
