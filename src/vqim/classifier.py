"""A small classifier of real images, used to score class-conditional samples (built-in `digits`).

It is trained by vqim on the real training images (not on reconstructions or samples): each image is
converted to grey and average-pooled to 8×8 (the resolution scikit-learn's digits were recorded at), then a
multinomial logistic regression is fitted. Its accuracy on real held-out images is reported beside its
accuracy on generated samples, so the two can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


def features(images: torch.Tensor, size: int = 8) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] → (B, size²) grey levels average-pooled to size×size."""
    grey = images.float().mean(1, keepdim=True)
    return F.adaptive_avg_pool2d(grey, size).flatten(1).numpy()


@dataclass
class SampleClassifier:
    """A fitted classifier and its accuracy on real held-out images."""

    model: object
    real_test_accuracy: float

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.model.predict(features(images.cpu()))

    def accuracy_per_class(self, images: torch.Tensor, labels: np.ndarray) -> dict[int, float]:
        pred = self.predict(images)
        return {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}


def _stack(dataset: Dataset) -> tuple[torch.Tensor, np.ndarray]:
    from vqim.data import collate

    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=256, collate_fn=collate):
        xs.append(batch["image"])
        ys.append(batch["label"].numpy())
    return torch.cat(xs), np.concatenate(ys)


def fit_sample_classifier(train: Dataset, test: Dataset, seed: int = 0) -> SampleClassifier:
    """Fit on the real training images of a labelled dataset; measure accuracy on its real test images."""
    from sklearn.linear_model import LogisticRegression

    x_tr, y_tr = _stack(train)
    x_te, y_te = _stack(test)
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    clf.fit(features(x_tr), y_tr)
    return SampleClassifier(clf, float((clf.predict(features(x_te)) == y_te).mean()))
