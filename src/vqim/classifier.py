"""A small classifier of real images, used to score class-conditional samples (built-in `digits`).

It is trained by vqim on the real training images (not on reconstructions or samples): each image is
converted to grey and average-pooled to 8×8 (the resolution scikit-learn's digits were recorded at), then a
multinomial logistic regression is fitted. Its accuracy on real held-out images is reported beside its
accuracy on generated samples, so the two can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vqim.errors import InputError

if TYPE_CHECKING:
    from vqim.config import SamplingConfig
    from vqim.prior import Prior
    from vqim.tokenizer import Tokenizer


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

    @property
    def classes(self) -> np.ndarray:
        """The class ids, in the order of `probabilities`' columns."""
        return self.model.classes_

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """(B, C) class probabilities of images (B, 3, H, W) in [0, 1]."""
        return self.model.predict_proba(features(images.cpu()))

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


def digits_classifier(image_size: int, seed: int = 0) -> SampleClassifier:
    """The sample classifier of the built-in digits at this image size (train split → test split)."""
    from vqim.data import build_dataset

    return fit_sample_classifier(
        build_dataset("digits", image_size, train=True),
        build_dataset("digits", image_size, train=False),
        seed,
    )


@torch.no_grad()
def sample_accuracy(
    tokenizer: Tokenizer,
    prior: Prior,
    classifier: SampleClassifier,
    samples_per_class: int = 20,
    sampling: SamplingConfig | None = None,
) -> dict[str, Any]:
    """Accuracy of a classifier of real images on samples of every class of a class-conditional prior.

    `samples_per_class` images of each class 0..C-1 are generated (through the tokenizer) and classified; the
    mean over classes is `sample_accuracy`, beside the per-class figures and the classifier's accuracy on
    real held-out images.

    Args:
        tokenizer: decodes the sampled tokens.
        prior: a class-conditional prior.
        classifier: e.g. `digits_classifier(tokenizer.config.image_size)`.
        samples_per_class: samples generated per class.
        sampling: temperature, top-k, top-p, guidance scale and seed (default: `SamplingConfig()`).
    """
    from vqim.config import SamplingConfig
    from vqim.sampling import generate_images

    if prior.config.num_classes == 0:
        raise InputError("sample accuracy needs a class-conditional prior")
    sampling = sampling or SamplingConfig()
    device = next(prior.parameters()).device
    labels = torch.arange(prior.config.num_classes, device=device).repeat_interleave(samples_per_class)
    images = generate_images(tokenizer, prior, len(labels), labels=labels, **sampling.kwargs()).cpu()
    per_class = classifier.accuracy_per_class(images, labels.cpu().numpy())
    return {
        "sample_accuracy": float(np.mean(list(per_class.values()))),
        "sample_accuracy_per_class": per_class,
        "classifier_real_test_accuracy": classifier.real_test_accuracy,
        "samples_per_class": samples_per_class,
    }
