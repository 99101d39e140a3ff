"""Load a dataset for the built-in trainer and split/standardize it reproducibly.

Every trial of a study must see the same train/validation/test rows, so the split is stratified
with a fixed seed, and the result is cached per process: a worker reads and splits it once.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.datasets import load_digits, make_classification
from sklearn.model_selection import train_test_split

if TYPE_CHECKING:
    from kubetune.spec.model import TuningJob

SOURCE_NAMES = ("digits", "synthetic", "file")
FILE_EXTENSIONS = (".npz", ".csv")

_SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "samples": 2000,
    "features": 20,
    "informative": 10,
    "classes": 2,
    "classWeights": None,
    "classSep": 1.0,
    "seed": 0,
}
_SPLIT_DEFAULTS: dict[str, Any] = {"validation": 0.2, "test": 0.2, "seed": 0}
_MIN_PER_CLASS = 3  # one sample each for train, validation and test


class DataError(ValueError):
    """Bad data with a message a user can act on (names the file/column)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A split, standardized classification dataset (arrays are read-only)."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    feature_names: list[str]
    mean: np.ndarray
    std: np.ndarray
    share: float = 1.0  # the part of the full training rows kept (a reduced-data stage)

    @property
    def n_features(self) -> int:
        """Number of input columns the model must accept."""
        return int(self.X_train.shape[1])

    @property
    def n_classes(self) -> int:
        """Number of output logits the model must produce."""
        return len(self.classes)


def load_dataset(source: dict[str, Any], split: dict[str, Any]) -> Dataset:
    """Load, split and standardize `source`; repeated calls return the cached object."""
    key = {"source": _normalize_source(source), "split": {**_SPLIT_DEFAULTS, **split}}
    return _load_cached(json.dumps(key, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _load_cached(key: str) -> Dataset:
    """Build the dataset for a normalized JSON key (the lru_cache is the per-process cache)."""
    args = json.loads(key)
    X, y, feature_names = _read_source(args["source"])
    return _split_and_standardize(X, y, feature_names, args["split"])


def _normalize_source(source: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults so equivalent sources share a cache entry.

    File sources also carry the absolute path and modification time, so a
    changed file or a different working directory is never served stale data.
    """
    name = source.get("name")
    if name == "digits":
        return {"name": "digits"}
    if name == "synthetic":
        return {**_SYNTHETIC_DEFAULTS, **source}
    if name == "file":
        if not source.get("path"):
            raise DataError("file data source needs a 'path'")
        path = Path(source["path"]).expanduser().resolve()
        mtime = path.stat().st_mtime_ns if path.is_file() else None
        label = source.get("labelColumn", "label")
        return {"name": "file", "path": str(path), "labelColumn": label, "mtime": mtime}
    raise DataError(f"unknown data source {name!r}; expected one of {', '.join(SOURCE_NAMES)}")


def _read_source(source: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return raw features, raw labels and feature names for a normalized source."""
    if source["name"] == "digits":
        bunch = load_digits()
        return bunch.data, bunch.target, list(bunch.feature_names)
    if source["name"] == "synthetic":
        return _make_synthetic(source)
    return _read_file(Path(source["path"]), source["labelColumn"])


def _make_synthetic(source: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Generate a make_classification problem; non-informative columns are pure noise."""
    features = int(source["features"])
    try:
        X, y = make_classification(
            n_samples=int(source["samples"]),
            n_features=features,
            n_informative=min(int(source["informative"]), features),
            n_redundant=0,
            n_classes=int(source["classes"]),
            weights=source["classWeights"],
            class_sep=float(source["classSep"]),
            random_state=int(source["seed"]),
        )
    except ValueError as exc:
        raise DataError(f"synthetic data source: {exc}") from exc
    return X, y, [f"x{i}" for i in range(features)]


def _read_file(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Dispatch on the file extension after checking the file exists."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix.lower() == ".npz":
        return _read_npz(path)
    if path.suffix.lower() == ".csv":
        return _read_csv(path, label_column)
    raise DataError(
        f"data file {path}: unsupported extension {path.suffix!r}; "
        f"expected one of {', '.join(FILE_EXTENSIONS)}"
    )


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read arrays `X` (2-D numeric) and `y` (1-D, same length) from an .npz file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("X", "y") if k not in archive.files]
            if missing:
                raise DataError(f"data file {path}: missing array(s) {missing}; found {archive.files}")
            X, y = archive["X"], archive["y"]
    except ValueError as exc:  # e.g. object arrays, which would need unsafe pickle loading
        raise DataError(f"data file {path}: cannot read .npz: {exc}") from exc
    if X.ndim != 2 or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise DataError(f"data file {path}: X must be a 2-D numeric array, got {X.ndim}-D {X.dtype}")
    if y.ndim != 1 or len(y) != len(X):
        raise DataError(f"data file {path}: y must be 1-D with {len(X)} entries, got shape {y.shape}")
    names = [f"x{i}" for i in range(X.shape[1])]
    X = X.astype(np.float64)
    _check_finite(X, names, path)
    return X, y, names


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a headed CSV: `label_column` holds labels, every other column must be numeric."""
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if label_column not in header:
            raise DataError(
                f"data file {path}: label column {label_column!r} not found; columns are {header}"
            )
        label_at = header.index(label_column)
        names = [n for i, n in enumerate(header) if i != label_at]
        rows, labels = [], []
        for cells in reader:
            if not cells:
                continue
            features, label = _parse_row(cells, header, label_at, path, reader.line_num)
            rows.append(features)
            labels.append(label)
    if not rows:
        raise DataError(f"data file {path}: no data rows after the header")
    return np.asarray(rows, dtype=np.float64), np.asarray(labels), names


def _parse_row(
    cells: list[str], header: list[str], label_at: int, path: Path, line: int
) -> tuple[list[float], str]:
    """Split one CSV row into float features and its label, naming the bad cell on error."""
    if len(cells) != len(header):
        raise DataError(f"data file {path}, line {line}: {len(cells)} values, header has {len(header)}")
    label = cells[label_at].strip()
    if not label:
        raise DataError(f"data file {path}, line {line}: empty label in column {header[label_at]!r}")
    features = []
    for i, cell in enumerate(cells):
        if i == label_at:
            continue
        try:
            value = float(cell)
        except ValueError:
            raise DataError(
                f"data file {path}, line {line}: column {header[i]!r} has non-numeric value "
                f"{cell!r}; every column except the label {header[label_at]!r} must be numeric"
            ) from None
        if not math.isfinite(value):
            raise DataError(
                f"data file {path}, line {line}: column {header[i]!r} has non-finite value "
                f"{cell!r}; remove or impute missing values"
            )
        features.append(value)
    return features, label


def _check_finite(X: np.ndarray, names: list[str], path: Path) -> None:
    """Reject NaN/inf features in an .npz, naming the first offending column and row."""
    bad = ~np.isfinite(X)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"data file {path}: column {names[col]!r} (X[:, {col}]) has non-finite value "
            f"{X[row, col]} in row {row}; remove or impute missing values"
        )


def _encode_labels(y: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Map labels to 0..K-1 by sorted unique value and require enough samples per class."""
    values, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    classes = [str(v) for v in values]
    if len(classes) < 2:
        raise DataError(f"need at least 2 classes to classify, found {classes}")
    rare = [c for c, n in zip(classes, counts) if n < _MIN_PER_CLASS]
    if rare:
        raise DataError(
            f"class(es) {rare} have fewer than {_MIN_PER_CLASS} samples; a stratified "
            "train/validation/test split needs at least one of each class per split"
        )
    return codes.astype(np.int64), classes


def _split_and_standardize(
    X: np.ndarray, y_raw: np.ndarray, feature_names: list[str], split: dict[str, Any]
) -> Dataset:
    """Stratified fixed-seed split, then standardize with training-split statistics only."""
    y, classes = _encode_labels(y_raw)
    X_train, y_train, X_val, y_val, X_test, y_test = _stratified_split(X, y, split)
    # Finite values near the float limits overflow here; the preflight reports the features
    # that are not finite once standardized, so numpy need not warn about them too.
    with np.errstate(over="ignore", invalid="ignore"):
        mean = X_train.mean(axis=0)
        std = X_train.std(axis=0)
    std[std == 0] = 1.0

    def scale(part: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return _frozen(((part - mean) / std).astype(np.float32))

    return Dataset(
        X_train=scale(X_train),
        y_train=_frozen(y_train),
        X_val=scale(X_val),
        y_val=_frozen(y_val),
        X_test=scale(X_test),
        y_test=_frozen(y_test),
        classes=classes,
        feature_names=list(feature_names),
        mean=_frozen(mean.astype(np.float32)),
        std=_frozen(std.astype(np.float32)),
    )


def _stratified_split(X: np.ndarray, y: np.ndarray, split: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """Split off test, then validation from the rest; fractions are of the whole dataset."""
    val_frac, test_frac, seed = float(split["validation"]), float(split["test"]), int(split["seed"])
    if not (val_frac > 0 and test_frac > 0 and val_frac + test_frac < 1):
        raise DataError(
            f"split fractions validation={val_frac}, test={test_frac} must be > 0 and sum to < 1"
        )
    try:
        X_rest, X_test, y_rest, y_test = train_test_split(
            X, y, test_size=test_frac, random_state=seed, stratify=y
        )
        X_train, X_val, y_train, y_val = train_test_split(
            X_rest, y_rest, test_size=val_frac / (1 - test_frac), random_state=seed, stratify=y_rest
        )
    except ValueError as exc:
        raise DataError(f"cannot make a stratified split with {split}: {exc}") from exc
    return X_train, y_train, X_val, y_val, X_test, y_test


@functools.lru_cache(maxsize=8)
def reduce_dataset(data: Dataset, *, fraction: float | None = None, classes: int | None = None,
                   seed: int = 0) -> Dataset:
    """A cheaper dataset for a reduced-fidelity stage (cached: one per stage and process).

    ``classes``: keep the first N classes in label order (the order of ``data.classes``) in
    every split, so the model has N outputs. ``fraction``: a stratified random subsample of
    the *training* split only, at least one row per class; validation and test stay whole,
    so scores stay comparable within the stage. Standardization keeps the full training
    split's statistics.
    """
    splits = {name: (getattr(data, f"X_{name}"), getattr(data, f"y_{name}"))
              for name in ("train", "val", "test")}
    kept_classes = list(data.classes)
    if classes is not None and classes < len(data.classes):
        kept_classes = kept_classes[:classes]
        splits = {name: (X[y < classes], y[y < classes]) for name, (X, y) in splits.items()}
    if fraction is not None and fraction < 1:
        X, y = splits["train"]
        rng = np.random.default_rng(seed)
        rows = []
        for label in np.unique(y):
            members = np.flatnonzero(y == label)
            take = max(1, int(round(fraction * len(members))))
            rows.append(rng.choice(members, size=take, replace=False))
        picked = np.sort(np.concatenate(rows))
        splits["train"] = (X[picked], y[picked])
    return Dataset(
        X_train=_frozen(np.ascontiguousarray(splits["train"][0])),
        y_train=_frozen(np.ascontiguousarray(splits["train"][1])),
        X_val=_frozen(np.ascontiguousarray(splits["val"][0])),
        y_val=_frozen(np.ascontiguousarray(splits["val"][1])),
        X_test=_frozen(np.ascontiguousarray(splits["test"][0])),
        y_test=_frozen(np.ascontiguousarray(splits["test"][1])),
        classes=kept_classes, feature_names=list(data.feature_names),
        mean=data.mean, std=data.std,
        share=data.share * len(splits["train"][1]) / max(1, len(data.y_train)))


def _frozen(array: np.ndarray) -> np.ndarray:
    """Make a cached array read-only so one trial cannot corrupt another's data."""
    array.setflags(write=False)
    return array


def load_data(job: TuningJob, stage: int | None = None) -> Any:
    """The job's dataset, split and standardized (cached per process by ``load_dataset``);
    with ``stage``, cut to that stage's data fidelity (``spec.stages[].data``). None for code
    trainers, which load their own data."""
    builtin = job.spec.trainer.builtin
    if builtin is None:
        return None
    data = load_dataset(builtin.dataset.model_dump(by_alias=True, exclude_none=True),
                        builtin.split.model_dump(by_alias=True, exclude_none=True))
    stages = job.spec.stages
    fidelity = stages[min(stage, len(stages) - 1)].data if stage is not None and stages else None
    if fidelity is None:
        return data
    return reduce_dataset(data, fraction=fidelity.fraction, classes=fidelity.classes,
                          seed=builtin.split.seed)
