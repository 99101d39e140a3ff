"""The exported ensemble: a self-contained model folder, and the one call that loads it.

The folder (``ensemble.json``, ``weights.pt``) is described for users in docs/ensemble.md.
``weights.pt`` holds tensors only, read with ``torch.load(weights_only=True)``: loading runs no
pickled code and needs nothing of the study or the run. The manifest's ``format``
(``BUNDLE_FORMAT``) versions the folder: change it with the layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_FILE = "ensemble.json"
WEIGHTS_FILE = "weights.pt"
BUNDLE_FORMAT = "kubetune-ensemble/1"


class ExportError(Exception):
    """The folder cannot be written or read as an exported ensemble (a message for the user)."""


def write_model_folder(bundle: dict[str, Any], output: Path) -> Path:
    """Write ``bundle`` (as saved by the ensemble step) into ``output`` as a model folder.

    Refuses a folder that holds anything but an earlier export, so nothing else is overwritten.
    """
    import torch

    output = Path(output)
    if output.exists() and (not output.is_dir() or (
            any(output.iterdir()) and not (output / MANIFEST_FILE).exists())):
        raise ExportError(f"{output} exists and is not an empty folder or an earlier export; "
                          "pick another --output")
    output.mkdir(parents=True, exist_ok=True)
    manifest = {**bundle["manifest"], "files": {"weights": WEIGHTS_FILE},
                "load": "kubetune.load_ensemble(FOLDER).predict(X)"}
    torch.save({"mean": bundle["mean"], "std": bundle["std"], "members": bundle["members"]},
               output / WEIGHTS_FILE)
    (output / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return output


class EnsembleModel:
    """A weighted ensemble of MLPs that predicts class probabilities and labels.

    Attributes:
        classes_: the class labels, in the order of ``predict_proba``'s columns.
        manifest: the folder's ``ensemble.json`` (members, weights, scores).
    """

    def __init__(self, manifest: dict[str, Any], weights: dict[str, Any]) -> None:
        from kubetune.builtin.mlp import build_mlp

        self.manifest = manifest
        self.classes_ = np.asarray(manifest["classes"])
        self.n_features_in_ = int(manifest["nFeatures"])
        self._mean = weights["mean"].numpy().astype(np.float64)
        self._std = weights["std"].numpy().astype(np.float64)
        self._weights = [float(m["weight"]) for m in manifest["members"]]
        self._models = []
        for member, state in zip(manifest["members"], weights["members"], strict=True):
            model = build_mlp(self.n_features_in_, len(self.classes_), member["params"])
            model.load_state_dict(state)
            self._models.append(model.eval())

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, shape (samples, classes), for raw features ``X``."""
        from kubetune.builtin.mlp import predict_proba

        X = self._check(X)
        standardized = ((X - self._mean) / self._std).astype(np.float32)
        total = np.zeros((len(X), len(self.classes_)), dtype=np.float64)
        for model, weight in zip(self._models, self._weights):
            total += weight * predict_proba(model, standardized, device="cpu")
        return total

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class label of each row of ``X``, as the data labels classes."""
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def _check(self, X: Any) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must have shape (samples, {self.n_features_in_}), got "
                             f"{X.shape}; for one sample use X.reshape(1, -1)")
        if not np.isfinite(X).all():
            raise ValueError("X has NaN or infinite values; the model was trained on finite "
                             "features")
        return X

    def __repr__(self) -> str:
        return (f"EnsembleModel({self.manifest.get('method')}, "
                f"{len(self._models)} members, {len(self.classes_)} classes)")


def load_ensemble(path: str | Path) -> EnsembleModel:
    """Load a folder written by ``kubetune export``.

    Args:
        path: the folder (``ensemble.json`` and ``weights.pt``).

    Returns:
        An ``EnsembleModel`` with ``predict_proba(X)`` and ``predict(X)`` for raw numpy
        features.
    """
    import torch

    folder = Path(path)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{folder} is not an exported kubetune ensemble: cannot read "
                          f"{MANIFEST_FILE}: {err}") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ExportError(f"{folder / MANIFEST_FILE}: unknown format "
                          f"{manifest.get('format')!r}; expected {BUNDLE_FORMAT}")
    weights = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    return EnsembleModel(manifest, weights)
