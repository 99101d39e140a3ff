"""The built-in MLP trainer's knobs: names, defaults and legal values.

Kept free of torch so that ``kubetune validate`` and the operator check specs without loading
PyTorch. The trainer (``kubetune.builtin.mlp``) and the spec model both read these tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MODELS = ("mlp",)
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu")
INITS = ("xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "orthogonal")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adadelta", "adagrad")
# n_params: the model's size (trainable parameters), the same every epoch: an objective to
# trade against accuracy (spec.objective.metrics).
REPORTED_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_f1",
                    "n_params")
LOSS_METRICS = ("train_loss", "val_loss")
MINIMIZED_METRICS = ("n_params",)  # minimized by default, as losses are
BALANCE_MODES = ("none", "oversample", "weighted")  # trainer.builtin.balance


@dataclass(frozen=True)
class Knob:
    """One tunable setting: its kind, default and the interval or names it accepts."""

    kind: str  # "float" | "int" | "bool" | "choice"
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple[str, ...] = field(default_factory=tuple)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not legal for this knob, or None when it is."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if self.kind == "choice":
            if value in self.choices:
                return None
            return f"unknown value {value!r} (known: {', '.join(self.choices)})"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if self.kind == "int" and not float(value).is_integer():
            return f"must be an integer, got {value!r}"
        if not math.isfinite(value):
            return f"must be finite, got {value!r}"
        if self.minimum is not None:
            if self.exclusive_minimum and value <= self.minimum:
                return f"must be > {_num(self.minimum)}, got {value!r}"
            if not self.exclusive_minimum and value < self.minimum:
                return f"must be >= {_num(self.minimum)}, got {value!r}"
        if self.maximum is not None:
            if self.exclusive_maximum and value >= self.maximum:
                return f"must be < {_num(self.maximum)}, got {value!r}"
            if not self.exclusive_maximum and value > self.maximum:
                return f"must be <= {_num(self.maximum)}, got {value!r}"
        return None

    def describe(self) -> str:
        if self.kind == "choice":
            return " | ".join(self.choices)
        if self.kind == "bool":
            return "true | false"
        lo = "(" if self.exclusive_minimum else "["
        hi = ")" if self.exclusive_maximum else "]"
        low = "-inf" if self.minimum is None else _num(self.minimum)
        high = "inf" if self.maximum is None else _num(self.maximum)
        return f"{self.kind} in {lo}{low}, {high}{hi}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


KNOBS: dict[str, Knob] = {
    "lr": Knob("float", 1e-3, "learning rate", 0.0, exclusive_minimum=True),
    "weight_decay": Knob("float", 0.0, "L2 penalty (weight decay)", 0.0),
    "momentum": Knob("float", 0.9, "momentum of sgd and rmsprop", 0.0, 1.0, exclusive_maximum=True),
    "dropout": Knob("float", 0.0, "dropout rate after each hidden layer", 0.0, 1.0,
                    exclusive_maximum=True),
    "layers": Knob("int", 2, "number of hidden layers (0 = linear model)", 0, 32),
    "hidden": Knob("int", 128, "units per hidden layer", 1, 65536),
    "activation": Knob("choice", "relu", "hidden-layer activation", choices=ACTIVATIONS),
    "init": Knob("choice", "he_uniform", "weight initialisation", choices=INITS),
    "optimizer": Knob("choice", "adam", "optimizer", choices=OPTIMIZERS),
    "batch_size": Knob("int", 64, "mini-batch size", 1, 1 << 20),
    "epochs": Knob("int", 20, "training epochs (overrides trainer.builtin.epochs)", 1, 100000),
    "grad_clip": Knob("float", 0.0, "gradient-clipping max norm (0 = off)", 0.0),
    "lr_halving_patience": Knob(
        "int", 0, "halve the learning rate after this many epochs without a better val_loss "
        "(0 = off)", 0, 10000),
    "batch_norm": Knob("bool", False, "batch normalization after each hidden layer"),
}

DEFAULT_PARAMS: dict[str, Any] = {name: knob.default for name, knob in KNOBS.items()}
