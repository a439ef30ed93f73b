"""`vqim serve`: a local web page where a person tries a tokenizer (and a prior) on their own images.

    vqim serve --tokenizer T [--prior P] [--condition-tokenizer C] [--host 127.0.0.1] [--port 8000]

The page (one static HTML file of our own, vanilla JavaScript, nothing fetched from the internet) shows:
- the reconstruction of an uploaded, dropped or built-in photo (the centre crop at the tokenizer's size, as
  `vqim.evaluate.load_center_crop` makes it) beside the original, with a compare slider, PSNR and SSIM, the
  token-id map as a picture and the codes used;
- with a prior: samples (class, count, temperature, top-k, top-p, guidance scale, seed), streamed as they are
  generated: partially decoded images arrive every few token rows; a download button for the images. Sample i
  draws from its own random stream `row_seed(seed, i)` and sample i of "every class" takes class i mod C, so the
  images are those `vqim sample --n N --seed S` (or `--classes c`) writes;
- with a spatially conditioned prior (and its --condition-tokenizer): samples from a condition derived from
  the image (or the image itself, for a prior trained on condition images from a folder); completion of an
  image from its kept top token rows;
- which model folders are loaded, their configs and parameter counts.

Endpoints (JSON errors `{"error": message}` with status 400 bad input, 413 too large, 503 busy):
    GET  /                    the page
    GET  /api/info            models, configs, parameter counts, limits, built-in photos
    GET  /api/photos/NAME     a thumbnail of a built-in photo
    POST /api/reconstruct     form: image (file) or photo (name) → JSON images, PSNR, SSIM, token ids, codes used
    POST /api/sample          form: n, label, temperature, top_k, top_p, cfg_scale, seed → JSON lines (below)
    POST /api/condition       form: image or photo + the sampling fields → JSON lines
    POST /api/complete        form: image or photo, rows + the sampling fields → JSON lines
The sampling endpoints stream one JSON object per line: {"type": "queued", "ahead": k} while waiting,
{"type": "start", ...} (with the condition or kept part shown), {"type": "progress", "done", "total", "images"}
(partially decoded images, unsampled rows grey), then {"type": "done", "images", "seconds"} or
{"type": "error", "message"}. Images travel as PNG data URLs: the server keeps no images.

One model instance serves every request through `vqim.serve.app.Worker`: one thread runs the model calls in
arrival order (PyTorch's own threads parallelise inside each call), and at most --queue requests wait behind
the running one; more are refused at once ("busy"), so concurrent users never oversubscribe the CPU. An upload
is refused above --max-upload-bytes (while it arrives) and above --max-pixels (from its header, before it is
decoded: decompression bombs included); any PIL mode is converted to RGB (16-bit scaled, `vqim.data.load_rgb`).
Uploads are written to a temporary folder only, and deleted as soon as they are decoded.

Why Starlette + uvicorn rather than gradio: a few small, well-kept dependencies instead of gradio's large tree
(and its front end fetched or bundled at run time); full control of one page of our own; and plain HTTP
endpoints that tests call directly (Starlette's TestClient) besides driving the page in a headless browser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vqim.errors import InputError, check_settings

if TYPE_CHECKING:
    from starlette.applications import Starlette


@dataclass(kw_only=True)
class ServeConfig:
    """What `vqim serve` does: a local web page to try a tokenizer (and a prior) on your own images.

    Args:
        tokenizer: tokenizer folder (written by train-tokenizer or save_pretrained).
        prior: prior folder (written by train-prior) to sample from; trained on the tokenizer's tokens.
        condition_tokenizer: the condition tokenizer of a spatially conditioned prior (the one `vqim encode
            --condition` used).
        host: address to listen on; the default serves this machine only (on another address, anyone who can
            reach it can use the models).
        port: port to listen on (0: any free port).
        device: cpu, cuda, or auto (cuda when available).
        max_upload_bytes: largest accepted upload, in bytes.
        max_pixels: largest accepted image, in pixels (width × height); a larger image (a decompression bomb
            included) is refused before it is decoded.
        max_samples: most images one sampling request may ask for.
        previews: partially generated images sent while sampling (each costs one extra pass over the tokens
            sampled so far); 0 sends the final images only.
        queue: requests that may wait while one runs; more are refused ("busy, try again") until one finishes.
        threads: CPU threads PyTorch uses for the models (default: PyTorch's choice, one per core).
    """

    tokenizer: str
    prior: str | None = None
    condition_tokenizer: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    max_upload_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_samples: int = 16
    previews: int = 4
    queue: int = 8
    threads: int | None = None

    def __post_init__(self) -> None:
        check_settings(
            self,
            positive=("max_upload_bytes", "max_pixels", "max_samples", "threads"),
            non_negative=("previews", "queue"),
        )
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be in [0, 65535], got {self.port}")
        if self.condition_tokenizer is not None and self.prior is None:
            raise InputError(
                "--condition-tokenizer is for a spatially conditioned --prior: pass the prior too"
            )


def create_app(cfg: ServeConfig) -> Starlette:
    """The Starlette app of `vqim serve` with its models loaded (for uvicorn, or Starlette's TestClient)."""
    from vqim.serve.app import create_app as _create

    return _create(cfg)


def serve(cfg: ServeConfig) -> None:
    """Load the models and serve the page with uvicorn at cfg.host:cfg.port until interrupted (Ctrl+C)."""
    from vqim.serve.app import serve as _serve

    _serve(cfg)


__all__ = ["ServeConfig", "create_app", "serve"]
