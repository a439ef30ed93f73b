"""A screenshot of the `vqim serve` page after a reconstruction and a sampling, taken in a headless browser.

    python -m vqim.serve.screenshot docs/images/serve.png --tokenizer runs/demo/tokenizer --prior runs/demo/prior

Needs Playwright's Python package and a Chromium on the PATH (Debian: `apt-get install chromium`); Playwright's
own browser download is not used. Without --tokenizer, tiny untrained models are built in a temporary folder
(the page's layout, not its pictures).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vqim.errors import InputError
from vqim.options import add_options, values

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) on the PATH, or None."""
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


@contextmanager
def chromium(playwright: Any) -> Any:
    """Playwright's Chromium driving the system's browser (no browser download); closed after the block."""
    path = find_chromium()
    if path is None:
        raise InputError(f"no Chromium found on the PATH (looked for {', '.join(CHROMIUM_NAMES)})")
    browser = playwright.chromium.launch(executable_path=path)
    try:
        yield browser
    finally:
        browser.close()


def tiny_models(root: Path) -> tuple[Path, Path]:
    """An untrained tiny tokenizer and class-conditional prior (a checked pair) under root."""
    import torch

    from vqim import Prior, Tokenizer
    from vqim.checkpoint import write_json
    from vqim.config import get_tokenizer_config
    from vqim.tokens import tokenizer_identity

    torch.manual_seed(0)
    tok = Tokenizer(get_tokenizer_config("vit-vqgan-tiny", image_size=32, codebook_size=64, enc_depth=1,
                                         dec_depth=1))  # fmt: skip
    tok.save_pretrained(root / "tokenizer")
    prior = Prior.from_preset("vim-tiny", vocab_size=64, grid_size=(4, 4), num_classes=2, depth=1, dim=32,
                              heads=2, mlp_dim=64)  # fmt: skip
    prior.save_pretrained(root / "prior")
    write_json(
        root / "prior" / "tokens.json", tokenizer_identity(Tokenizer.from_pretrained(root / "tokenizer"))
    )
    return root / "tokenizer", root / "prior"


def take_screenshot(
    out: str,
    tokenizer: str | None = None,
    prior: str | None = None,
    condition_tokenizer: str | None = None,
    photo: str = "chelsea.png",
    n: int = 10,
    seed: int = 0,
    cfg_scale: float = 2.0,
    top_k: int | None = 50,
    width: int = 1280,
) -> Path:
    """Serve the models, reconstruct a built-in photo and sample on the page, and save a PNG of the whole page.

    Args:
        out: the PNG to write.
        tokenizer: tokenizer folder (default: a tiny untrained one).
        prior: prior folder (default: a tiny untrained one with the default tokenizer; none with --tokenizer).
        condition_tokenizer: the condition tokenizer of a spatially conditioned prior.
        photo: the built-in photo to reconstruct.
        n: images to sample.
        seed: the sampling seed.
        cfg_scale: guidance scale (class-conditional priors).
        top_k: top-k of the sampling (empty: all).
        width: the browser window's width in pixels.
    """
    from playwright.sync_api import sync_playwright

    from vqim.serve import ServeConfig, create_app
    from vqim.serve.app import background_server

    with tempfile.TemporaryDirectory(prefix="vqim-screenshot-") as tmp:
        if tokenizer is None:
            tokenizer, tiny_prior = map(str, tiny_models(Path(tmp)))
            prior = prior or tiny_prior
        cfg = ServeConfig(tokenizer=tokenizer, prior=prior, condition_tokenizer=condition_tokenizer, port=0)
        app = create_app(cfg)
        with background_server(app) as url, sync_playwright() as pw, chromium(pw) as browser:
            page = browser.new_page(viewport={"width": width, "height": 800}, bypass_csp=True)
            page.goto(url)
            page.click(f'button[data-photo="{photo}"]')
            page.wait_for_function("document.getElementById('psnr').textContent.includes('dB')")
            page.evaluate("setSplit(62)")
            if prior is not None and not app.state.server.models.prior.config.spatial:
                page.fill("#n", str(n))
                page.fill("#seed", str(seed))
                page.fill("#top_k", "" if top_k is None else str(top_k))
                if app.state.server.models.prior.config.conditional:
                    page.fill("#cfg_scale", str(cfg_scale))
                page.click("#sample")
                page.wait_for_selector("#gallery[data-state=done]", timeout=600_000)
            out_path = Path(out)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out_path), full_page=True)
    return out_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vqim.serve.screenshot", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out", help="the PNG to write")
    add_options(parser, take_screenshot, exclude=("out",))
    args = parser.parse_args(argv)
    print(take_screenshot(**values(take_screenshot, args)))


if __name__ == "__main__":
    main()
