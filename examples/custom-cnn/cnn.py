"""A small PyTorch CNN on scikit-learn's 8x8 digits, tuned by kubetune through the trainer SDK.

kubetune calls ``train(trial)`` once per trial (``spec.trainer.entrypoint: cnn:train``):

* ``trial.params`` holds the sampled hyperparameters and the fixed ``spec.trainer.params``;
* ``trial.report(epoch, ...)`` after every epoch applies kubetune's NaN/divergence guards and
  the Optuna pruner, and raises ``kubetune.TrialPruned`` when the trial should stop;
* ``trial.checkpoint(...)`` / ``trial.restore()`` let a trial whose worker died resume;
* ``trial.save_predictions(...)`` makes the trial a candidate for the ensemble.

Run it with ``kubetune run examples/custom-cnn/job.yaml``. A few seconds per trial on a CPU;
it trains on the GPU when torch sees one.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


def load_splits(seed: int = 0):
    """Train, validation and test images (N, 1, 8, 8) and labels; the same rows for every
    trial, so that the ensemble can combine their predictions."""
    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    X_train, X_rest, y_train, y_rest = train_test_split(X, y, test_size=0.4, stratify=y,
                                                        random_state=seed)
    X_val, X_test, y_val, y_test = train_test_split(X_rest, y_rest, test_size=0.5,
                                                    stratify=y_rest, random_state=seed)
    return [torch.from_numpy(a) for a in (X_train, y_train, X_val, y_val, X_test, y_test)]


class SmallCNN(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(2 * channels * 4 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train(trial) -> dict[str, float]:
    p = trial.params
    torch.manual_seed(trial.number)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    X_train, y_train, X_val, y_val, X_test, y_test = (t.to(device) for t in load_splits())
    model = SmallCNN(int(p["channels"]), float(p["dropout"])).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(p["lr"]))
    loss_fn = nn.CrossEntropyLoss()
    first = 1
    state = trial.restore()  # a retried trial resumes where its last attempt stopped
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first = state["epoch"] + 1
    for epoch in range(first, int(p["epochs"]) + 1):
        model.train()
        order = torch.randperm(len(X_train), device=device)
        losses = []
        for start in range(0, len(order), int(p["batch_size"])):
            batch = order[start:start + int(p["batch_size"])]
            loss = loss_fn(model(X_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            val_logits = model(X_val)
        val_accuracy = (val_logits.argmax(1) == y_val).float().mean().item()
        val_loss = loss_fn(val_logits, y_val).item()
        # NaN or a diverging train_loss prunes the trial here (kubetune.TrialPruned).
        trial.report(epoch, train_loss=float(np.mean(losses)), val_loss=val_loss,
                     val_accuracy=val_accuracy)
        trial.checkpoint({"epoch": epoch, "model": model.state_dict(),
                          "optimizer": optimizer.state_dict()})
    with torch.no_grad():
        trial.save_predictions(validation=torch.softmax(model(X_val), 1).cpu().numpy(),
                               test=torch.softmax(model(X_test), 1).cpu().numpy(),
                               labels=(y_val.cpu().numpy(), y_test.cpu().numpy()))
    return {"val_accuracy": val_accuracy, "val_loss": val_loss}
