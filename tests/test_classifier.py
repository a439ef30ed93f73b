"""Sample-classifier accuracy: one function for `vqim eval-prior` and the demo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqim import Prior, Tokenizer
from vqim.classifier import SampleClassifier, sample_accuracy
from vqim.config import SamplingConfig
from vqim.samples import class_list


class _ByBrightness:
    """A stand-in classifier: class = how bright the image is, in tenths."""

    def predict(self, feats: np.ndarray) -> np.ndarray:
        return np.clip((feats.mean(1) * 10).astype(int), 0, 9)


def test_sample_accuracy_scores_every_class_reproducibly():
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64).eval()
    prior = Prior.from_preset("vim-tiny", vocab_size=64, grid_size=(4, 4), num_classes=3, depth=1).eval()
    clf = SampleClassifier(_ByBrightness(), real_test_accuracy=0.9)
    s = SamplingConfig(top_k=5, seed=1)
    a, b = sample_accuracy(tok, prior, clf, 4, s), sample_accuracy(tok, prior, clf, 4, s)
    assert a == b and set(a["sample_accuracy_per_class"]) == {0, 1, 2}
    assert a["sample_accuracy"] == pytest.approx(np.mean(list(a["sample_accuracy_per_class"].values())))
    assert a["classifier_real_test_accuracy"] == 0.9 and a["samples_per_class"] == 4
    with pytest.raises(ValueError, match="class-conditional"):
        sample_accuracy(tok, Prior.from_preset("vim-tiny", vocab_size=64, grid_size=(4, 4), depth=1), clf)


def test_class_list():
    assert class_list(None, 3) == [0, 1, 2] and class_list("2,0", 3) == [2, 0]
    assert class_list(None, 0) is None
    for text, n, msg in (("3", 3, "out of range"), ("a", 3, "comma-separated"), ("1", 0, "unconditional")):
        with pytest.raises(ValueError, match=msg):
            class_list(text, n)
