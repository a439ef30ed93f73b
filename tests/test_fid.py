"""rFID / Inception Score: weight loading without unpickling, the metric values, and eval-tokenizer's flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from vqim.fid import InceptionMetrics, load_inception, to_uint8
from vqim.metrics import FeatureStats, frechet_distance


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


def test_fidelity_frechet_equals_ours_and_scipy():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 16, generator=g, dtype=torch.float64)
    b = torch.randn(400, 16, generator=g, dtype=torch.float64) @ torch.randn(
        16, 16, generator=g, dtype=torch.float64
    )
    b = b + 0.5
    stats = []
    for f in (a, b):
        s = FeatureStats(16)
        s.update(f)
        stats.append(s.mean_cov())
    (m1, c1), (m2, c2) = stats
    lib = fid_statistics_to_metric(
        {"mu": m1.numpy(), "sigma": c1.numpy()}, {"mu": m2.numpy(), "sigma": c2.numpy()}, verbose=False
    )["frechet_inception_distance"]
    covmean = scipy.linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    ref = float(((m1 - m2) ** 2).sum() + np.trace(c1.numpy()) + np.trace(c2.numpy()) - 2 * np.trace(covmean))
    assert lib == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-6)


def test_identical_sets_have_zero_rfid_and_different_sets_do_not(inception_file):
    net = load_inception(inception_file)
    g = torch.Generator().manual_seed(1)
    real = torch.rand(6, 3, 32, 32, generator=g)
    same, other = InceptionMetrics(net, is_splits=2), InceptionMetrics(net, is_splits=2)
    same.update(real, real)
    other.update(real, (1 - real).clamp(0, 1))
    r_same, r_other = same.compute(), other.compute()
    assert abs(r_same["rfid"]) < 1e-3
    assert r_other["rfid"] > 100 * max(abs(r_same["rfid"]), 1e-6)
    # IS is exp(mean KL(p(y|x) ‖ p(y))): at least 1 and at most the split size.
    assert 1.0 - 1e-9 <= r_other["inception_score"] <= 3.0 + 1e-9


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
    tok = _tiny_tokenizer(tmp_path)
    main(["eval-tokenizer", "--tokenizer", str(tok), "--data", str(_folder(tmp_path)), "--no-progress",
          "--vgg-weights", str(vgg), "--inception-weights", str(inception_file), "--out", str(tmp_path / "ev")])  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 6
    assert res["lpips"] > 0 and res["rfid"] > 0 and res["inception_score"] >= 1.0
    assert "not_measured" not in res
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
