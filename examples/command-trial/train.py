#!/usr/bin/env python3
"""A command trial: softmax regression on the wine CSV, with nothing but the standard library.

It knows nothing of kubetune or Optuna, which is the point: any program in any language can
be tuned if it

* reads its hyperparameters from environment variables (KUBETUNE_PARAM_LR, ...) or from the
  JSON file named by KUBETUNE_PARAMS_FILE,
* prints one JSON line per epoch on stdout: {"epoch": 3, "val_accuracy": 0.91, ...},
* optionally writes predictions.json (or .npz) into KUBETUNE_OUTPUT_DIR for the ensemble,
* exits 0 when it is done (anything else fails the trial; the output's tail says why).

kubetune stops a pruned trial with SIGTERM (then SIGKILL after spec.trainer.stopGracePeriod).
"""

import csv
import json
import math
import os
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def param(name, default=None):
    """A hyperparameter from the environment: strings as they are, other values as JSON."""
    text = os.environ.get("KUBETUNE_PARAM_" + name.upper())
    if text is None:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return text


def load(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header, rows = rows[0], rows[1:]
    classes = sorted({r[-1] for r in rows})
    X = [[float(v) for v in r[:-1]] for r in rows]
    y = [classes.index(r[-1]) for r in rows]
    return X, y, len(header) - 1, len(classes)


def split(n, seed=0):
    """The same train/validation/test rows for every trial (60/20/20)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    a, b = int(0.6 * n), int(0.8 * n)
    return order[:a], order[a:b], order[b:]


def standardize(X, rows):
    columns = list(zip(*[X[i] for i in rows]))
    mean = [sum(c) / len(c) for c in columns]
    std = [math.sqrt(sum((v - m) ** 2 for v in c) / len(c)) or 1.0 for c, m in zip(columns, mean)]
    return [[(v - m) / s for v, m, s in zip(row, mean, std)] for row in X]


def softmax(z):
    top = max(z)
    e = [math.exp(v - top) for v in z]
    total = sum(e)
    return [v / total for v in e]


def predict(W, b, x):
    return softmax([sum(w * v for w, v in zip(Wk, x)) + bk for Wk, bk in zip(W, b)])


def evaluate(W, b, X, y, rows):
    probas = [predict(W, b, X[i]) for i in rows]
    loss = -sum(math.log(max(p[y[i]], 1e-15)) for p, i in zip(probas, rows)) / len(rows)
    accuracy = sum(p.index(max(p)) == y[i] for p, i in zip(probas, rows)) / len(rows)
    return loss, accuracy, probas


def main():
    lr = float(param("lr", 0.1))
    l2 = float(param("l2", 0.0))
    epochs = int(param("epochs", 30))
    seed = int(os.environ.get("KUBETUNE_TRIAL_NUMBER", "0"))
    X, y, features, classes = load(HERE.parent / "data" / "wine.csv")
    train, val, test = split(len(y))
    X = standardize(X, train)
    rng = random.Random(seed)
    W = [[rng.gauss(0, 0.01) for _ in range(features)] for _ in range(classes)]
    b = [0.0] * classes
    print(f"training softmax regression: lr={lr} l2={l2} epochs={epochs}", file=sys.stderr)
    for epoch in range(1, epochs + 1):
        rng.shuffle(train)
        total = 0.0
        for i in train:
            p = predict(W, b, X[i])
            total -= math.log(max(p[y[i]], 1e-15))
            for k in range(classes):
                g = p[k] - (1.0 if k == y[i] else 0.0)
                b[k] -= lr * g
                W[k] = [w - lr * (g * v + l2 * w) for w, v in zip(W[k], X[i])]
        val_loss, val_accuracy, _ = evaluate(W, b, X, y, val)
        report = {"epoch": epoch, "train_loss": total / len(train), "val_loss": val_loss,
                  "val_accuracy": val_accuracy}
        print(json.dumps(report), flush=True)  # NaN prints as NaN: kubetune prunes it
    _, _, val_proba = evaluate(W, b, X, y, val)
    _, _, test_proba = evaluate(W, b, X, y, test)
    output = os.environ.get("KUBETUNE_OUTPUT_DIR")
    if output:  # optional: makes this trial a candidate for the ensemble
        with open(os.path.join(output, "predictions.json"), "w") as handle:
            json.dump({"val_proba": val_proba, "test_proba": test_proba,
                       "y_val": [y[i] for i in val], "y_test": [y[i] for i in test]}, handle)


if __name__ == "__main__":
    main()
