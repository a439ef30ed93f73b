"""LPIPS: equal to the `lpips` package on the same backbone weights; gradients reach the input; clear errors."""

from __future__ import annotations

import lpips  # the reference implementation; a dev dependency
import pytest
import torch

from vqim.perceptual import LPIPS, default_lin_path


@pytest.fixture(scope="module")
def reference_and_vgg(tmp_path_factory):
    torch.manual_seed(0)
    # Random VGG16 backbone (no download), LPIPS's shipped linear heads.
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    # Write the backbone in torchvision's layout (features.N.*), as torchvision's own vgg16 file has it.
    state = {}
    for s in range(1, 6):
        for name, t in getattr(ref.net, f"slice{s}").state_dict().items():
            state[f"features.{name}"] = t.clone()
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(state, path)
    return ref, path


def test_equals_lpips_package(reference_and_vgg):
    ref, vgg = reference_and_vgg
    ours = LPIPS(vgg_weights=vgg, lin_weights=default_lin_path())
    torch.manual_seed(1)
    x, y = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x, y, normalize=True).flatten()  # normalize=True: inputs in [0, 1]
        got = ours(x, y)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert torch.all(got > 0)
    assert torch.allclose(ours(x, x), torch.zeros(3), atol=1e-7)


def test_gradient_reaches_input_and_weights_stay_frozen(reference_and_vgg):
    _, vgg = reference_and_vgg
    ours = LPIPS(vgg_weights=vgg)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    ours(x, torch.rand(2, 3, 32, 32)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in ours.parameters())


def test_missing_weights_say_which_file_and_how(tmp_path, reference_and_vgg):
    with pytest.raises(FileNotFoundError) as e:
        LPIPS(vgg_weights=tmp_path / "nope.pth")
    msg = str(e.value)
    assert "nope.pth" in msg and "--vgg-weights" in msg and "--perceptual-weight 0" in msg
    _, vgg = reference_and_vgg
    with pytest.raises(FileNotFoundError, match="lpips"):
        LPIPS(vgg_weights=vgg, lin_weights=tmp_path / "missing_lin.pth")
