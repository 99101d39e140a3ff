"""Search-space presets: the empirical starting ranges of the tuning method, by name.

Torch-free: the spec model (which expands ``searchSpace: {preset: ...}``), the CRD generator and
``kubetune presets`` read this table; docs/tuning.md shows it and says why each range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    description: str
    space: dict[str, dict[str, Any]]


PRESETS: dict[str, Preset] = {
    "mlp-classic": Preset(
        "the classic starting ranges for an MLP, widened to the good regions of the hard "
        "benchmark tasks: learning rate 1e-4 to 0.3 and L2 1e-6 to 1e-2 on log scales, 16 to "
        "1024 hidden units (log), 1 to 3 layers, batch size log-uniform over 32..512 (centred "
        "on 128), dropout 0 to 0.5, gradient clipping 5 to 15, adaptive optimizers (rmsprop "
        "included) and SGD with momentum 0.9",
        {
            # the best trials of a 10-class hard task (issue 18) had lr < 1e-3; above 0.3
            # adaptive optimizers diverge and SGD with momentum 0.9 rarely helps
            "lr": {"type": "float", "low": 1e-4, "high": 0.3, "log": True},
            # up to 10 wasted 2-8 coarse trials per run on accuracies of 0.09-0.40
            "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
            "hidden": {"type": "int", "low": 16, "high": 1024, "log": True},
            "layers": {"type": "int", "low": 1, "high": 3},
            # log-uniform: the geometric middle of 32..512 is 128, half the draws are 64..256
            "batch_size": {"type": "int", "low": 32, "high": 512, "log": True},
            # from 0: the hard task's best trials had dropout < 0.3
            "dropout": {"type": "float", "low": 0.0, "high": 0.5},
            "grad_clip": {"type": "float", "low": 5.0, "high": 15.0},
            # sgd and rmsprop run with the momentum knob's default, 0.9
            "optimizer": {"type": "categorical", "choices": ["adam", "adamw", "rmsprop", "sgd"]},
        },
    ),
}
PRESET_KEY = "preset"


def expand(space: dict[str, Any], fixed: set[str] = frozenset()) -> dict[str, Any]:
    """``space`` with its ``preset`` replaced by the preset's entries (the name must be known).

    Entries written next to ``preset`` win over the preset's; knobs in ``fixed`` (fixed in
    ``trainer.builtin.params``) are left out of the preset's entries.
    """
    rest = {k: v for k, v in space.items() if k != PRESET_KEY}
    preset = PRESETS[space[PRESET_KEY]]
    expanded = {name: dict(entry) for name, entry in preset.space.items()
                if name not in fixed and name not in rest}
    return {**expanded, **rest}


def describe_entry(entry: dict[str, Any]) -> str:
    """One search-space entry in a few characters: ``0.001..1 log``, ``adam | sgd``."""
    if entry["type"] == "categorical":
        return " | ".join(str(c) for c in entry["choices"])
    text = f"{entry['low']:g}..{entry['high']:g}"
    if entry.get("type") == "int":
        text += " int"
    if entry.get("log"):
        text += " log"
    if entry.get("step") not in (None, 1):
        text += f" step {entry['step']:g}"
    return text


def listing() -> str:
    """What ``kubetune presets`` prints."""
    lines = []
    for name, preset in PRESETS.items():
        lines.append(f"{name}: {preset.description}")
        width = max(len(k) for k in preset.space)
        for knob, entry in preset.space.items():
            lines.append(f"  {knob:<{width}}  {describe_entry(entry)}")
    lines.append("")
    lines.append("Use one as  searchSpace: {preset: NAME}; entries named next to it override "
                 "the preset's, and knobs fixed in trainer.builtin.params are not searched.")
    return "\n".join(lines)
