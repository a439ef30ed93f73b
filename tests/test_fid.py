"""rFID / Inception Score: weight loading without unpickling, the metric values, and eval-tokenizer's flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vqim.fid import InceptionMetrics, load_inception, to_uint8


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Randomly initialised InceptionV3 weights in torch-fidelity's layout, as safetensors (no download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    d = tmp_path_factory.mktemp("inception")
    torch.save({}, d / "empty.pth")
    torch.manual_seed(0)
    net = _Unloaded("inception-v3-compat", ["2048"], str(d / "empty.pth"))
    state = {}
    for k, v in net.state_dict().items():
        if v.dim() == 4:  # He-scaled convolutions keep the 90-odd random layers' activations alive
            v = torch.randn(v.shape) * (2.0 / v[0].numel()) ** 0.5
        state[k] = v.contiguous()
    path = d / "inception.safetensors"
    save_file(state, str(path))
    return path


def _fid_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa Σb)^½ with unbiased covariances Σ = XᵀX / (n − 1) of the centred
    rows X. With fewer rows than dimensions both Σ are singular, where a matrix square root is ill-conditioned;
    tr (Σa Σb)^½ is then computed exactly as the sum of the singular values of A Bᵀ / (n − 1) (the eigenvalues
    of Σa Σb are the squared singular values of that small matrix)."""
    n = len(a)
    ca, cb = a - a.mean(0), b - b.mean(0)
    tr_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / (n - 1)
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + (ca**2).sum() / (n - 1) + (cb**2).sum() / (n - 1) - 2 * tr_sqrt)


def test_rfid_and_inception_score_equal_the_formulas_on_the_networks_features(inception_file):
    """rFID compares the real images' pool features with the reconstructions', streamed over batches; IS is
    exp(mean KL(p(y|x) ‖ p(y))) of the reconstructions' class probabilities. Both from the features by hand."""
    net = load_inception(inception_file)
    g = torch.Generator().manual_seed(1)
    real = torch.rand(12, 3, 32, 32, generator=g)
    rec = F.interpolate(torch.rand(12, 3, 4, 4, generator=g), size=32)  # blocky "reconstructions"
    m = InceptionMetrics(net, is_splits=1)
    m.update(real[:5], rec[:5])  # unequal batches: the statistics accumulate
    m.update(real[5:], rec[5:])
    got = m.compute()
    with torch.no_grad():
        pool_real, logits_real = net(to_uint8(real))
        pool_rec, logits_rec = net(to_uint8(rec))
    ref = _fid_by_hand(pool_real.double().numpy(), pool_rec.double().numpy())
    assert ref > 1.0  # different images: a distance to measure
    assert got["rfid"] == pytest.approx(ref, rel=1e-4)

    def inception_score_minus_one(logits: torch.Tensor) -> float:
        p = logits.double().softmax(1)
        return float((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean().exp()) - 1

    # The random network's class probabilities are nearly uniform, so IS is close to 1: compare IS − 1, which
    # tells the reconstructions' score from the real images'.
    expected = inception_score_minus_one(logits_rec)
    assert expected > 0 and abs(inception_score_minus_one(logits_real) - expected) > 0.01 * expected
    assert got["inception_score"] - 1 == pytest.approx(expected, rel=1e-4)


def test_identical_sets_have_zero_rfid_and_one_split_per_image_at_most(inception_file):
    net = load_inception(inception_file)
    real = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    m = InceptionMetrics(net, is_splits=10)
    m.update(real, real)
    r = m.compute()
    assert abs(r["rfid"]) < 1e-3
    # More splits than images: one split per image, and a split of one image scores exactly 1.
    assert r["inception_score_splits"] == 6 and r["inception_score"] == pytest.approx(1.0)


def test_images_are_quantised_like_png():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(x)[0, 0, 0].tolist() == [0, 128, 255, 255, 0]


def test_missing_weights_say_which_file_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_inception(tmp_path / "nope.pth")
    msg = str(e.value)
    assert "nope.pth" in msg and "--inception-weights" in msg and "weights-inception-2015-12-05" in msg
    assert "--fid off" in msg


def test_weight_files_are_never_unpickled(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "evil.pth"
    torch.save({"fc.weight": Payload()}, bad)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        load_inception(bad)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.zeros(1)}, str(wrong))
    with pytest.raises(ValueError, match="InceptionV3"):
        load_inception(wrong)


def test_incomplete_weights_are_a_clear_error(tmp_path, inception_file):
    from safetensors.torch import load_file

    state = load_file(str(inception_file))
    state.pop("Conv2d_1a_3x3.conv.weight")
    partial = tmp_path / "partial.safetensors"
    save_file(state, str(partial))
    with pytest.raises(ValueError, match="does not match"):
        load_inception(partial)


def _tiny_tokenizer(tmp_path):
    from vqim import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vit-vqgan-tiny", image_size=32)
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def _folder(tmp_path, n: int = 6):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_eval_tokenizer_reports_lpips_rfid_and_is(tmp_path, inception_file, capsys):
    from torchvision.models import vgg16

    from vqim.cli import main

    vgg = tmp_path / "vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in vgg16(weights=None).state_dict().items()}, str(vgg))
    tok, folder = _tiny_tokenizer(tmp_path), _folder(tmp_path)
    main(["eval-tokenizer", "--tokenizer", str(tok), "--data", str(folder), "--no-progress",
          "--vgg-weights", str(vgg), "--inception-weights", str(inception_file), "--out", str(tmp_path / "ev")])  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 6
    assert "not_measured" not in res
    # The same figures computed here from the 6 images and their reconstructions, with the same weights.
    from vqim import Tokenizer
    from vqim.data import build_dataset, collate
    from vqim.perceptual import LPIPS

    ds = build_dataset(str(folder), 32, train=False)
    x = collate([ds[i] for i in range(len(ds))])["image"]
    with torch.no_grad():
        rec = Tokenizer.from_pretrained(tok).eval()(x).reconstruction.clamp(0, 1)
        lp = LPIPS(vgg_weights=vgg)(rec, x)
        net = load_inception(inception_file)
        pool_x, pool_rec = net(to_uint8(x))[0], net(to_uint8(rec))[0]
    assert res["lpips"] == pytest.approx(float(lp.mean()), rel=1e-4)
    assert res["rfid"] == pytest.approx(
        _fid_by_hand(pool_x.double().numpy(), pool_rec.double().numpy()), rel=1e-3
    )
    # 6 images and 10 splits: one image per split, each scoring exactly 1.
    assert res["inception_score_splits"] == 6 and res["inception_score"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["rfid"] == pytest.approx(res["rfid"])


def test_eval_tokenizer_without_weights(tmp_path, monkeypatch, capsys):
    from vqim.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    tok = _tiny_tokenizer(tmp_path)
    args = [
        "eval-tokenizer",
        "--tokenizer",
        str(tok),
        "--data",
        "photos",
        "--image-size",
        "32",
        "--no-progress",
    ]
    # auto: measured only when found; what was left out is said, with why.
    main([*args, "--lpips", "off"])
    res = json.loads(capsys.readouterr().out)
    assert "rfid" not in res and "lpips" not in res
    assert "--inception-weights" in res["not_measured"]["rfid"]
    # on: a missing file is an error naming it.
    with pytest.raises(SystemExit) as e:
        main([*args, "--fid", "on", "--lpips", "off"])
    assert e.value.code == 2 and "inception-weights" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*args, "--lpips", "on", "--fid", "off"])
    assert e.value.code == 2 and "vgg16" in capsys.readouterr().err
