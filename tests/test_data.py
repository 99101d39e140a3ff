"""Tests for kubetune.builtin.data: sources, stratified split, standardization, cache, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kubetune.builtin.data import DataError, Dataset, load_dataset

WINE_CSV = Path(__file__).resolve().parent.parent / "examples" / "data" / "wine.csv"
SPLIT = {"validation": 0.2, "test": 0.2, "seed": 0}


def _all_labels(ds: Dataset) -> np.ndarray:
    return np.concatenate([ds.y_train, ds.y_val, ds.y_test])


def _raw_rows(ds: Dataset) -> np.ndarray:
    """Undo the standardization on every split, rows sorted for order-free comparison."""
    X = np.vstack([ds.X_train, ds.X_val, ds.X_test]).astype(np.float64) * ds.std + ds.mean
    return X[np.lexsort(X.T[::-1])]


def test_digits_shapes_and_stratified_proportions() -> None:
    ds = load_dataset({"name": "digits"}, SPLIT)
    assert ds.n_features == 64 and ds.n_classes == 10
    assert ds.classes == [str(i) for i in range(10)]
    assert len(ds.feature_names) == 64
    sizes = np.array([len(ds.y_train), len(ds.y_val), len(ds.y_test)])
    assert sizes.sum() == 1797
    np.testing.assert_allclose(sizes / 1797, [0.6, 0.2, 0.2], atol=0.01)
    overall = np.bincount(_all_labels(ds), minlength=10) / 1797
    for y in (ds.y_train, ds.y_val, ds.y_test):
        assert y.dtype == np.int64
        np.testing.assert_allclose(np.bincount(y, minlength=10) / len(y), overall, atol=0.01)


def test_standardization_uses_training_split_only() -> None:
    ds = load_dataset({"name": "digits"}, SPLIT)
    assert ds.X_train.dtype == np.float32
    np.testing.assert_allclose(ds.X_train.mean(axis=0), 0.0, atol=1e-4)
    varying = ds.X_train.std(axis=0) > 0
    np.testing.assert_allclose(ds.X_train.std(axis=0)[varying], 1.0, atol=1e-4)
    assert not np.allclose(ds.X_val.mean(axis=0), 0.0, atol=1e-3)
    assert not np.allclose(ds.X_test.mean(axis=0), 0.0, atol=1e-3)
    assert (ds.std[~varying] == 1.0).all()  # constant pixels: std 0 replaced by 1, no NaN
    assert all(np.isfinite(x).all() for x in (ds.X_train, ds.X_val, ds.X_test))


def test_cache_returns_same_object_for_equivalent_arguments() -> None:
    first = load_dataset({"name": "digits"}, SPLIT)
    assert load_dataset({"name": "digits"}, {}) is first
    assert load_dataset({"name": "digits"}, {**SPLIT, "seed": 1}) is not first


def test_cached_arrays_are_read_only() -> None:
    ds = load_dataset({"name": "digits"}, SPLIT)
    with pytest.raises(ValueError):
        ds.X_train[0, 0] = 1.0


def test_synthetic_respects_classes_features_and_seed() -> None:
    source = {"name": "synthetic", "samples": 600, "features": 7, "informative": 20, "classes": 4, "seed": 3}
    ds = load_dataset(source, SPLIT)
    assert ds.n_features == 7 and ds.n_classes == 4
    assert len(_all_labels(ds)) == 600
    again = load_dataset({**source, "classSep": 1.0}, SPLIT)  # new dict, same content: cached
    np.testing.assert_array_equal(again.X_train, ds.X_train)
    other = load_dataset({**source, "seed": 4}, SPLIT)
    assert not np.allclose(other.X_train[:10], ds.X_train[:10])


def test_synthetic_same_seed_regenerates_identical_data() -> None:
    from kubetune.builtin.data import _load_cached

    source = {"name": "synthetic", "samples": 300, "features": 5, "seed": 11}
    first = load_dataset(source, SPLIT)
    _load_cached.cache_clear()
    second = load_dataset(source, SPLIT)
    assert second is not first
    np.testing.assert_array_equal(first.X_train, second.X_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)


def test_synthetic_class_weights_shift_balance() -> None:
    source = {"name": "synthetic", "samples": 1000, "classes": 3, "classWeights": [0.7, 0.2, 0.1]}
    counts = np.bincount(_all_labels(load_dataset(source, SPLIT)))
    assert counts[0] > 2 * counts[1] > 0 and counts[1] > counts[2] > 0


def test_wine_csv_loads_three_classes() -> None:
    ds = load_dataset({"name": "file", "path": str(WINE_CSV), "labelColumn": "cultivar"}, SPLIT)
    assert ds.classes == ["class_0", "class_1", "class_2"]
    assert ds.n_features == 13 and "cultivar" not in ds.feature_names
    assert ds.feature_names[0] == "alcohol"
    assert len(_all_labels(ds)) == 178


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "label_column", "expected"),
    [
        ("a,b,target\n1,2,x\n", "label", ["'label'", "not found"]),
        ("a,b,label\n1,2,x\n3,oops,y\n", "label", ["'b'", "non-numeric", "'oops'", "line 3"]),
        ("a,b,label\n1,2,x\nnan,4,y\n", "label", ["'a'", "non-finite", "line 3"]),
    ],
    ids=["missing-label-column", "non-numeric-feature", "nan-feature"],
)
def test_bad_csv_names_column_and_file(tmp_path: Path, text: str, label_column: str, expected: list[str]) -> None:
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(DataError) as info:
        load_dataset({"name": "file", "path": path, "labelColumn": label_column}, SPLIT)
    message = str(info.value)
    assert path in message
    for fragment in expected:
        assert fragment in message


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset({"name": "file", "path": str(tmp_path / "nope.csv")}, SPLIT)
    with pytest.raises(DataError, match="unsupported extension"):
        load_dataset({"name": "file", "path": _write(tmp_path / "data.txt", "a\n")}, SPLIT)
    one_class = "a,label\n" + "".join(f"{i},x\n" for i in range(10))
    with pytest.raises(DataError, match="at least 2 classes"):
        load_dataset({"name": "file", "path": _write(tmp_path / "one.csv", one_class)}, SPLIT)
    rare = "a,label\n" + "".join(f"{i},x\n" for i in range(10)) + "1,y\n2,y\n"
    with pytest.raises(DataError, match=r"\['y'\].*fewer than"):
        load_dataset({"name": "file", "path": _write(tmp_path / "rare.csv", rare)}, SPLIT)


def test_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 4)) * 5 + 2
    y = np.array(["cat", "dog", "emu"] * 30)
    np.savez(tmp_path / "data.npz", X=X, y=y)
    ds = load_dataset({"name": "file", "path": str(tmp_path / "data.npz")}, SPLIT)
    assert ds.classes == ["cat", "dog", "emu"]
    assert ds.feature_names == ["x0", "x1", "x2", "x3"]
    np.testing.assert_allclose(_raw_rows(ds), X[np.lexsort(X.T[::-1])], rtol=1e-5, atol=1e-5)


def test_npz_nan_and_missing_array(tmp_path: Path) -> None:
    X = np.ones((30, 3))
    X[7, 2] = np.nan
    np.savez(tmp_path / "nan.npz", X=X, y=np.arange(30) % 2)
    with pytest.raises(DataError, match="'x2'.*row 7"):
        load_dataset({"name": "file", "path": str(tmp_path / "nan.npz")}, SPLIT)
    np.savez(tmp_path / "noy.npz", X=np.ones((30, 3)))
    with pytest.raises(DataError, match="missing array"):
        load_dataset({"name": "file", "path": str(tmp_path / "noy.npz")}, SPLIT)
