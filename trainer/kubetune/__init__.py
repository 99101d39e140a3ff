"""kubetune: hyperparameter tuning that runs the same TuningJob locally and on Kubernetes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubetune.ensemble.export import EnsembleModel
    from kubetune.worker.contract import TrialPruned
    from kubetune.worker.entrypoint_trainer import Trial

from kubetune.version import __version__

__all__ = ["Trial", "TrialPruned", "__version__", "load_ensemble"]


def __getattr__(name: str) -> Any:
    """``kubetune.Trial`` (the trainer SDK's trial) and ``kubetune.TrialPruned``, imported on
    first use so that ``import kubetune`` stays light."""
    if name == "Trial":
        from kubetune.worker.entrypoint_trainer import Trial

        return Trial
    if name == "TrialPruned":
        from kubetune.worker.contract import TrialPruned

        return TrialPruned
    raise AttributeError(f"module 'kubetune' has no attribute {name!r}")


def load_ensemble(path: Any) -> EnsembleModel:
    """Load a model folder written by ``kubetune export``: ``predict_proba(X)``, ``predict(X)``.

    Importing ``kubetune`` stays light: PyTorch is imported by this call, not before.

    Example:
        >>> import kubetune
        >>> model = kubetune.load_ensemble("digits-model")  # doctest: +SKIP
        >>> model.predict(X)                                 # doctest: +SKIP
    """
    from kubetune.ensemble.export import load_ensemble as _load

    return _load(path)
