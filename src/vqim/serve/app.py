"""The app behind `vqim serve` (see `vqim.serve`): the models, a one-thread worker queue and the endpoints."""

from __future__ import annotations

import asyncio
import base64
import colorsys
import concurrent.futures
import contextlib
import io
import ipaddress
import json
import logging
import socket
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vqim.errors import InputError
from vqim.serve import ServeConfig

log = logging.getLogger(__name__)

# Room for the form's other fields and the multipart headers on top of the file itself.
FORM_OVERHEAD = 64 * 1024
# An upload over the limit is read to its end (and dropped) up to this many bytes more, so that the browser
# receives the "too large" answer instead of a reset connection; a larger one is cut off.
DRAIN_LIMIT = 256 * 1024 * 1024
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    # Nothing but this server: the page fetches nothing from the internet.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; connect-src 'self'",
}


class ServeError(Exception):
    """A request the server refuses: an HTTP status and a message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Stopped(Exception):
    """The client went away: the job stops."""


def user_message(e: BaseException) -> tuple[int, str]:
    """(HTTP status, one-line message) for an exception: the message of bad input, never a stack trace."""
    if isinstance(e, ServeError):
        return e.status, e.message
    if isinstance(e, HTTPException):
        return e.status_code, str(e.detail)
    if isinstance(e, ValueError):  # InputError and the library's other checks on values
        return 400, " ".join(str(e).split())
    log.error("internal error", exc_info=e)
    return 500, f"internal error ({type(e).__name__}); the server's log has the details"


# ---------------------------------------------------------------------------------------------- queue
class Worker:
    """Runs every model call on one thread, in arrival order; at most `max_waiting` calls wait behind it.

    One thread means one model computation at a time however many people use the page: PyTorch's own threads do
    the parallel work inside each call and nothing else competes for the cores. A call arriving when the queue is
    full is refused at once (`ServeError` 503), not queued without bound.
    """

    def __init__(self, max_waiting: int, threads: int | None = None) -> None:
        init = (lambda: torch.set_num_threads(threads)) if threads else None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="vqim-serve", initializer=init
        )
        self._lock = threading.Lock()
        self._active = 0  # admitted calls not finished yet: the running one and those waiting
        self.max_waiting = max_waiting

    @property
    def active(self) -> int:
        return self._active

    def admit(self) -> tuple[int, Callable[[], None]]:
        """Take a place in the queue: (calls ahead, a function that frees the place, once). 503 when full."""
        with self._lock:
            if self._active > self.max_waiting:
                raise ServeError(
                    503,
                    f"the server is busy ({self._active} requests running or waiting, the most it queues); "
                    "try again in a moment",
                )
            ahead = self._active
            self._active += 1
        freed = False

        def free(*_: Any) -> None:
            nonlocal freed
            with self._lock:
                if not freed:
                    freed = True
                    self._active -= 1

        return ahead, free

    def submit(self, fn: Callable[[], Any], place: tuple[int, Callable[[], None]] | None = None) -> tuple:
        """Queue fn() in a place (`admit`; default: a new one); returns (its future, calls ahead of it)."""
        ahead, free = place or self.admit()

        def call() -> Any:
            try:
                return fn()
            finally:
                free()

        try:
            future = self._pool.submit(call)
        except BaseException:
            free()
            raise
        future.add_done_callback(free)  # when cancelled before it ran
        return future, ahead

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the worker thread, awaited."""
        future, _ = self.submit(lambda: fn(*args))
        return await asyncio.wrap_future(future)

    def stream(self, job: Callable[[Callable[[dict], None], threading.Event], None]) -> AsyncIterator[dict]:
        """Queue job(emit, stopped) now (503 when full); returns the events it emits, as an async iterator.

        A "queued" event comes first when calls are ahead; an exception in the job ends the events with an
        "error" event. Closing the iterator (the client went away) sets `stopped` and makes emit raise, so the
        job ends at its next step; a job that has not started yet never starts.
        """
        place = self.admit()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict | None] = asyncio.Queue()
        stopped = threading.Event()

        def put(event: dict | None) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody listens any more
                stopped.set()

        def emit(event: dict) -> None:
            if stopped.is_set():
                raise _Stopped
            put(event)

        def run() -> None:
            try:
                if not stopped.is_set():
                    job(emit, stopped)
            except _Stopped:
                pass
            except Exception as e:  # noqa: BLE001 - every failure becomes a message on the page
                put({"type": "error", "message": user_message(e)[1]})
            finally:
                place[1]()  # free the place before the stream ends: the next request finds it free
                put(None)

        future, ahead = self.submit(run, place)

        async def iterate() -> AsyncIterator[dict]:
            try:
                if ahead:
                    yield {"type": "queued", "ahead": ahead}
                while (event := await events.get()) is not None:
                    yield event
            finally:
                stopped.set()
                future.cancel()  # only takes effect if it has not started

        return iterate()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- images
@dataclass
class Source:
    """An input image: an upload saved in the temporary folder, or a built-in photo."""

    path: Path
    name: str  # what messages call it
    upload: bool = False  # a file in the temporary folder, deleted by `discard`

    def discard(self) -> None:
        if self.upload:
            self.path.unlink(missing_ok=True)

    def clean(self, e: BaseException) -> str:
        """An exception's message with the file's path replaced by its name (no temporary paths on the page)."""
        text = " ".join(f"{type(e).__name__}: {e}".split())
        return text.replace(str(self.path), self.name)


def load_input(src: Source, max_pixels: int, min_side: int | None) -> Image.Image:
    """The image as 8-bit RGB (`vqim.data.load_rgb`): the pixel limit is checked from the header first. An upload
    is deleted once read, whether it could be decoded or not."""
    try:
        return _load_input(src, max_pixels, min_side)
    finally:
        src.discard()


def _load_input(src: Source, max_pixels: int, min_side: int | None) -> Image.Image:
    from vqim.data import load_rgb

    size = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(src.path) as im:
                size = im.size
        except Image.DecompressionBombError:
            if max_pixels <= 2 * (Image.MAX_IMAGE_PIXELS or 0):
                raise ServeError(
                    413,
                    f"{src.name} has too many pixels (the limit is {max_pixels:,}, vqim serve --max-pixels)",
                ) from None
        except Exception as e:  # noqa: BLE001 - anything PIL cannot open is not an image
            raise ServeError(
                400, f"{src.name} is not an image file that can be read (PNG, JPEG, WebP, BMP, TIFF, GIF…): "
                f"{src.clean(e)}",
            ) from None  # fmt: skip
    if size is not None and size[0] * size[1] > max_pixels:
        w, h = size
        raise ServeError(
            413, f"{src.name} is {w}×{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
            "(vqim serve --max-pixels)",
        )  # fmt: skip
    try:
        return load_rgb(src.path, min_side=min_side, max_pixels=max_pixels)
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data, an unusable mode
        raise ServeError(400, f"{src.name} could not be decoded: {src.clean(e)}") from None


def center_crop(im: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) in [0, 1]: shorter side resized to size, central square (`vqim.evaluate.load_center_crop`)."""
    from vqim.data import _crop, resize_shorter, to_tensor

    return to_tensor(_crop(np.asarray(resize_shorter(im, size)), size, None, False))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] → (H, W, 3) uint8, rounded as torchvision's save_image does."""
    x = image.detach().float().cpu().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_url(image: torch.Tensor | np.ndarray) -> str:
    """A PNG data URL of an image (3, H, W) in [0, 1] or an (H, W, 3) uint8 array."""
    arr = to_uint8(image) if isinstance(image, torch.Tensor) else image
    return "data:image/png;base64," + base64.b64encode(png_bytes(arr)).decode("ascii")


def palette(k: int) -> np.ndarray:
    """(k, 3) uint8 colours, one per token id, fixed: neighbouring ids far apart in hue and brightness."""
    golden = 0.6180339887498949
    rows = [
        colorsys.hsv_to_rgb((i * golden) % 1.0, 0.45 + 0.5 * ((i * 0.7548776662) % 1.0),
                            0.55 + 0.45 * ((i * 0.5698402910) % 1.0))
        for i in range(k)
    ]  # fmt: skip
    return np.round(np.array(rows) * 255).astype(np.uint8)


def token_picture(ids: torch.Tensor, colours: np.ndarray, scale: int) -> np.ndarray:
    """The token-id map (h, w) as an (h·scale, w·scale, 3) picture: each id its colour, one square per token."""
    arr = colours[ids.cpu().numpy()]
    return arr.repeat(scale, 0).repeat(scale, 1)


# ---------------------------------------------------------------------------------------------- models
@dataclass
class Settings:
    """One sampling request's settings, checked."""

    n: int
    labels: torch.Tensor | None
    sampling: Any  # vqim.config.SamplingConfig
    label_names: list[str | None]


class Models:
    """The loaded tokenizer, prior and condition tokenizer, and what the page can do with them."""

    def __init__(self, cfg: ServeConfig) -> None:
        from vqim.checkpoint import resolve_device
        from vqim.tokenizer import Tokenizer

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.prior = self.ctok = self.cond = None
        self.class_names: list[str] | None = None
        self.condition_spec: str | None = None
        if cfg.prior is not None:
            from vqim.prior import load_prior_and_tokenizer
            from vqim.tokens import read_prior_tokens

            self.prior, self.tok = load_prior_and_tokenizer(cfg.prior, cfg.tokenizer, self.device)
            record = read_prior_tokens(cfg.prior) or {}
            names = record.get("class_names")
            if self.prior.config.conditional:
                c = self.prior.config.num_classes
                ok = isinstance(names, list) and len(names) == c
                self.class_names = [str(v) for v in names] if ok else [str(i) for i in range(c)]
            if self.prior.config.spatial:
                from vqim.samples import load_condition_tokenizer

                self.ctok, self.cond = load_condition_tokenizer(
                    cfg.prior, self.prior, cfg.condition_tokenizer, self.device
                )
                self.condition_spec = (record.get("condition") or {}).get("spec")
            elif cfg.condition_tokenizer is not None:
                raise InputError(
                    f"--condition-tokenizer is for a spatially conditioned prior; the prior in {cfg.prior} has "
                    "no spatial condition"
                )
        else:
            self.tok = Tokenizer.from_pretrained(cfg.tokenizer, device=self.device)
        self.size = self.tok.config.image_size
        self.patch = self.tok.config.patch_size
        self.colours = palette(self.tok.config.codebook_size)
        self.info = self._info()

    # ------------------------------------------------------------------ what is loaded
    def _info(self) -> dict[str, Any]:
        def model(role: str, path: str, m: Any, **extra: Any) -> dict[str, Any]:
            return {"role": role, "path": str(path), "parameters": m.num_params(),
                    "config": m.config.to_dict(), "fingerprint": m.fingerprint()[:12], **extra}  # fmt: skip

        cfg = self.cfg
        models = [model("tokenizer", cfg.tokenizer, self.tok, grid=list(self.tok.grid_size))]
        prior = None
        if self.prior is not None:
            pc = self.prior.config
            models.append(model("prior", cfg.prior, self.prior, grid=list(self.prior.grid_size)))
            prior = {
                "grid": list(pc.grid_size),
                "conditional": pc.conditional,
                "class_names": self.class_names,
                "spatial": pc.spatial,
                "condition": self.condition_spec,
                "condition_given": pc.spatial and self.cond is None,
                "can_sample": not pc.spatial,
                "can_complete": not pc.spatial or self.cond is not None,
            }
        if self.ctok is not None:
            models.append(model("condition tokenizer", cfg.condition_tokenizer, self.ctok,
                                condition=self.condition_spec))  # fmt: skip
        return {
            "models": models,
            "image_size": self.size,
            "patch_size": self.patch,
            "codebook_size": self.tok.config.codebook_size,
            "prior": prior,
            "device": str(self.device),
            "limits": {
                "max_upload_bytes": cfg.max_upload_bytes,
                "max_pixels": cfg.max_pixels,
                "max_samples": cfg.max_samples,
            },
            "photos": photo_names(),
        }

    # ------------------------------------------------------------------ reconstruction
    @torch.no_grad()
    def reconstruct(self, src: Source) -> dict[str, Any]:
        from vqim.metrics import psnr, ssim

        t0 = time.perf_counter()
        x = center_crop(load_input(src, self.cfg.max_pixels, self.size), self.size)[None].to(self.device)
        ids = self.tok.encode(x)
        rec = self.tok.decode(ids)
        used = int(ids.unique().numel())
        return {
            "name": src.name,
            "original": png_url(x[0]),
            "reconstruction": png_url(rec[0]),
            "tokens": png_url(token_picture(ids[0], self.colours, self.patch)),
            "ids": ids[0].tolist(),
            "psnr": round(float(psnr(rec, x)[0]), 3),
            "ssim": round(float(ssim(rec, x)[0]), 4),
            "codes_used": used,
            "token_count": int(ids.numel()),
            "codebook_size": self.tok.config.codebook_size,
            "grid": list(ids.shape[1:]),
            "size": self.size,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    # ------------------------------------------------------------------ sampling
    def settings(self, form: FormData) -> Settings:
        """The sampling settings of a request's form, checked (a ServeError or InputError names the bad one)."""
        from vqim.config import SamplingConfig

        prior = self.prior
        if prior is None:
            raise ServeError(400, "no prior is loaded: start vqim serve with --prior to sample")
        n = _number(form, "n", int, 8)
        if not 1 <= n <= self.cfg.max_samples:
            raise ServeError(
                400, f"count must be 1 to {self.cfg.max_samples} (vqim serve --max-samples), got {n}"
            )
        seed = _number(form, "seed", int, 0)
        if not 0 <= seed < 2**63:
            raise ServeError(400, f"seed must be an integer in [0, 2^63), got {seed}")
        sampling = SamplingConfig(
            temperature=_number(form, "temperature", float, 1.0),
            top_k=_number(form, "top_k", int, None),
            top_p=_number(form, "top_p", float, None),
            cfg_scale=_number(form, "cfg_scale", float, 1.0),
            seed=seed,
        )
        label = (_field(form, "label") or "all").strip()
        labels, names = None, [None] * n
        if prior.config.conditional:
            c = prior.config.num_classes
            if label == "all":
                ids = [i % c for i in range(n)]  # as `vqim sample`: sample i takes class i mod C
            else:
                try:
                    k = int(label)
                except ValueError:
                    raise ServeError(400, f"class must be an integer or 'all', got {label!r}") from None
                if not 0 <= k < c:
                    raise ServeError(400, f"class {k} is out of range: the prior has classes 0..{c - 1}")
                ids = [k] * n
            labels = torch.tensor(ids, device=prior.device)
            names = [self.class_names[i] for i in ids]
        else:
            if label != "all":
                raise ServeError(400, "a class was given, but the prior is unconditional")
            if sampling.cfg_scale != 1.0:
                raise ServeError(400, "guidance (cfg_scale other than 1) needs a class-conditional prior")
        return Settings(n, labels, sampling, names)

    @torch.no_grad()
    def generate(
        self,
        emit: Callable[[dict], None],
        stopped: threading.Event,
        st: Settings,
        condition: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
        rows: int = 0,
        shown: dict[str, str] | None = None,
    ) -> None:
        """Sample st.n token grids in raster order, emitting partially decoded images every few token rows.

        Each stretch of rows is one `vqim.sampling.generate` call that keeps the tokens sampled so far as its
        prefix; sample i draws from its own stream `row_seed(seed, i)`, position by position, so the stretches
        give the tokens one call would.
        """
        from vqim.sampling import generate, row_seed

        prior, tok = self.prior, self.tok
        h, w = prior.grid_size
        n = st.n
        t0 = time.perf_counter()
        kw = st.sampling.kwargs()
        seed = kw.pop("seed")
        seeds = [row_seed(seed, i) for i in range(n)]
        ids = None if rows == 0 else known[:rows].reshape(1, -1).expand(n, -1).to(prior.device)
        total = (h - rows) * w
        emit({"type": "start", "n": n, "total": total, "labels": st.label_names, **(shown or {})})
        for r in stretches(rows, h, self.cfg.previews):
            if stopped.is_set():
                return
            ids = generate(prior, n, st.labels, prefix=ids, num_tokens=r * w, row_seeds=seeds, condition=condition,
                           **kw)  # fmt: skip
            if r < h:
                emit({"type": "progress", "done": (r - rows) * w, "total": total,
                      "images": [png_url(x) for x in self._partial(ids, r)]})  # fmt: skip
        images = tok.decode(ids.view(n, h, w).to(self.device))
        emit({"type": "done", "images": [png_url(x) for x in images], "labels": st.label_names,
              "seconds": round(time.perf_counter() - t0, 3)})  # fmt: skip

    def _partial(self, ids: torch.Tensor, r: int) -> torch.Tensor:
        """Images of grids whose first r rows are sampled: the rest repeats the last row to decode, shown grey."""
        n = ids.shape[0]
        h, w = self.prior.grid_size
        grid = ids.view(n, r, w)
        full = torch.cat([grid, grid[:, -1:].expand(n, h - r, w)], dim=1)
        images = self.tok.decode(full.to(self.device))
        images[:, :, r * self.patch :] = 0.5
        return images

    def sample(self, emit: Callable[[dict], None], stopped: threading.Event, st: Settings) -> None:
        self.generate(emit, stopped, st)

    def sample_condition(
        self, emit: Callable[[dict], None], stopped: threading.Event, src: Source, st: Settings
    ) -> None:
        """Samples from a condition image: derived from the image (built-in conditions) or the image itself."""
        from vqim.data import to_tensor
        from vqim.samples import condition_tokens

        s = self.size
        im = load_input(src, self.cfg.max_pixels, s)
        cond = self.cond
        if cond is not None and cond.kind == "lowres" and im.size == (s // cond.factor, s // cond.factor):
            x = to_tensor(np.asarray(im))  # a low-resolution image itself: super-resolved
        else:
            x = center_crop(im, s)
        x = x[None].to(self.device)
        ctokens = condition_tokens(x, cond, self.ctok, (s, s), given=cond is None)
        shown = x if cond is None else cond.from_input(x, (s, s))
        self.generate(emit, stopped, st, condition=ctokens[0],
                      shown={"condition": png_url(shown[0].clamp(0, 1)), "input": png_url(x[0])})  # fmt: skip

    def complete(
        self, emit: Callable[[dict], None], stopped: threading.Event, src: Source, st: Settings, rows: int
    ) -> None:
        """Completions of the image from its top `rows` token rows (the condition, if any, derived from it)."""
        from vqim.samples import condition_tokens

        s, p = self.size, self.patch
        x = center_crop(load_input(src, self.cfg.max_pixels, s), s)[None].to(self.device)
        known = self.tok.encode(x)[0]
        condition = None
        if self.prior.config.spatial:
            condition = condition_tokens(x, self.cond, self.ctok, (s, s), given=False)[0]
        kept = x[0].clone()
        kept[:, rows * p :] = 0.5
        self.generate(emit, stopped, st, condition=condition, known=known, rows=rows,
                      shown={"input": png_url(x[0]), "kept": png_url(kept)})  # fmt: skip


def stretches(start: int, h: int, previews: int) -> list[int]:
    """The token rows after which to stop and show a preview, then h: up to `previews` stops, evenly spaced."""
    todo = h - start
    count = max(1, min(previews + 1, todo))
    return sorted({start + round(todo * (k + 1) / count) for k in range(count)})


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise ServeError(400, f"{name} must be a form field, not a file")
    return value


def _number(form: FormData, name: str, kind: type, default: Any) -> Any:
    """A number from the form: empty or missing gives the default (None for "off")."""
    text = (_field(form, name) or "").strip()
    if not text:
        return default
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ServeError(400, f"{name} must be {what}, got {text!r}") from None


def photo_names() -> list[dict[str, Any]]:
    """The built-in photos found on this machine: the held-out evaluation photos first."""
    from vqim.data import PHOTOS_EVAL, PHOTOS_TRAIN, photos_dir

    d = photos_dir()
    return [
        {"name": n, "held_out": n in PHOTOS_EVAL} for n in (*PHOTOS_EVAL, *PHOTOS_TRAIN) if (d / n).is_file()
    ]


# ---------------------------------------------------------------------------------------------- app
class Server:
    """One app's state: the models, the worker and the temporary folder that uploads pass through."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.models = Models(cfg)
        self.worker = Worker(cfg.queue, cfg.threads)
        self._tmp = tempfile.TemporaryDirectory(prefix="vqim-serve-")
        self.tmp = Path(self._tmp.name)
        self._thumbs: dict[str, bytes] = {}
        self._thumbs_lock = threading.Lock()

    def close(self) -> None:
        self.worker.close()
        self._tmp.cleanup()

    def _thumbnail(self, name: str) -> bytes:
        with self._thumbs_lock:
            if name not in self._thumbs:
                self._thumbs[name] = _thumbnail(name)
            return self._thumbs[name]

    # ------------------------------------------------------------------ requests
    async def form(self, request: Request) -> FormData:
        """The request's form, refused (413) as soon as more bytes than the upload limit arrive."""
        limit = self.cfg.max_upload_bytes + FORM_OVERHEAD
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit + DRAIN_LIMIT:
            raise ServeError(413, self._too_large(int(length)))
        received = 0

        async def receive() -> dict:
            nonlocal received
            message = await request.receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    more = message.get("more_body", False)
                    while more and received <= limit + DRAIN_LIMIT:  # read the rest, so the answer arrives
                        message = await request.receive()
                        received += len(message.get("body", b""))
                        more = message.get("more_body", False) and message["type"] == "http.request"
                    raise ServeError(413, self._too_large(received))
            return message

        try:
            return await Request(request.scope, receive).form(max_files=1, max_fields=32)
        except ServeError:
            raise
        except HTTPException as e:
            raise ServeError(400, f"the request's form could not be read: {e.detail}") from None

    def _too_large(self, size: int) -> str:
        limit = self.cfg.max_upload_bytes
        a, b = (
            (_bytes(size), _bytes(limit))
            if _bytes(size) != _bytes(limit)
            else (f"{size:,} bytes", f"{limit:,} bytes")
        )
        return f"the upload is {a}; the server accepts images of at most {b} (vqim serve --max-upload-bytes)"

    async def source(self, form: FormData) -> Source:
        """The request's image: an uploaded file (saved in the temporary folder) or a built-in photo."""
        upload, photo = form.get("image"), _field(form, "photo")
        if isinstance(upload, UploadFile):
            name = Path(upload.filename or "upload").name[:120] or "upload"
            if upload.size is not None and upload.size > self.cfg.max_upload_bytes:
                raise ServeError(413, f"{name}: {self._too_large(upload.size)}")
            data = await upload.read()
            if not data:
                raise ServeError(400, f"{name} is empty")
            path = self.tmp / f"upload-{uuid.uuid4().hex}"
            path.write_bytes(data)
            return Source(path, name, upload=True)
        if upload is not None:
            raise ServeError(400, "image must be a file upload")
        if photo:
            from vqim.data import photos_dir

            if photo not in {p["name"] for p in photo_names()}:
                raise ServeError(400, f"{photo!r} is not one of the built-in photos")
            return Source(photos_dir() / photo, photo)
        raise ServeError(400, "choose an image: upload one, drop one on the page, or pick a built-in photo")

    async def image_form(self, request: Request) -> tuple[FormData, Source]:
        """The request's form and its image (an upload is saved to the temporary folder; `Source.discard`)."""
        form = await self.form(request)
        try:
            return form, await self.source(form)
        finally:
            await form.close()  # the upload's bytes are in the temporary folder now

    def stream(
        self, events: AsyncIterator[dict], cleanup: Callable[[], None] | None = None
    ) -> StreamingResponse:
        """The events as JSON lines; cleanup runs when the stream ends (or the client goes away)."""

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for event in events:
                    yield (json.dumps(event) + "\n").encode()
            finally:
                await events.aclose()
                if cleanup is not None:
                    cleanup()

        return StreamingResponse(
            lines(), media_type="application/x-ndjson", headers={"Cache-Control": "no-store"}
        )

    # ------------------------------------------------------------------ endpoints
    async def page(self, request: Request) -> Response:
        from vqim.serve.page import INDEX_HTML

        return HTMLResponse(INDEX_HTML, headers=PAGE_HEADERS)

    async def info(self, request: Request) -> Response:
        return JSONResponse(self.models.info)

    async def photo(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in {p["name"] for p in photo_names()}:
            raise ServeError(404, f"{name!r} is not one of the built-in photos")
        # Small, and made once per photo: off the model's queue (a page asks for every photo at once).
        png = self._thumbs.get(name) or await run_in_threadpool(self._thumbnail, name)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def reconstruct(self, request: Request) -> Response:
        _, src = await self.image_form(request)
        try:
            return JSONResponse(await self.worker.run(self.models.reconstruct, src))
        finally:
            src.discard()

    async def sample(self, request: Request) -> Response:
        form = await self.form(request)
        await form.close()
        st = self.models.settings(form)
        if self.models.prior.config.spatial:
            raise ServeError(
                400, "this prior is spatially conditioned: sample from a condition image instead"
            )
        return self.stream(self.worker.stream(lambda emit, stopped: self.models.sample(emit, stopped, st)))

    async def condition(self, request: Request) -> Response:
        return await self._with_image(request, "condition")

    async def complete(self, request: Request) -> Response:
        return await self._with_image(request, "complete")

    async def _with_image(self, request: Request, kind: str) -> Response:
        models = self.models
        form, src = await self.image_form(request)
        try:
            st = models.settings(form)
            if kind == "condition":
                if not models.prior.config.spatial:
                    raise ServeError(
                        400, "this prior has no spatial condition: sample without a condition image"
                    )
                job = lambda emit, stopped: models.sample_condition(emit, stopped, src, st)
            else:
                if not models.info["prior"]["can_complete"]:
                    raise ServeError(400, "this prior reads its condition images from a folder, so completion has "
                                     "no condition: sample from a condition image instead")  # fmt: skip
                h = models.prior.grid_size[0]
                rows = _number(form, "rows", int, h // 2)
                if not 0 <= rows < h:
                    raise ServeError(
                        400, f"rows must be in [0, {h - 1}] (the grid has {h} token rows), got {rows}"
                    )
                job = lambda emit, stopped: models.complete(emit, stopped, src, st, rows)
            events = self.worker.stream(job)
        except BaseException:
            src.discard()
            raise
        # The job deletes the upload once decoded; the stream's end deletes it if the job never ran.
        return self.stream(events, cleanup=src.discard)


def _thumbnail(name: str, side: int = 112) -> bytes:
    from vqim.data import load_rgb, photos_dir

    return png_bytes(to_uint8(center_crop(load_rgb(photos_dir() / name, min_side=side), side)))


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


async def _error(request: Request, exc: Exception) -> Response:
    status, message = user_message(exc)
    return JSONResponse({"error": message}, status_code=status)


def create_app(cfg: ServeConfig) -> Starlette:
    """The Starlette app with its models loaded; the worker stops and uploads go when the app shuts down."""
    server = Server(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            server.close()

    routes = [
        Route("/", server.page),
        Route("/api/info", server.info),
        Route("/api/photos/{name}", server.photo),
        Route("/api/reconstruct", server.reconstruct, methods=["POST"]),
        Route("/api/sample", server.sample, methods=["POST"]),
        Route("/api/condition", server.condition, methods=["POST"]),
        Route("/api/complete", server.complete, methods=["POST"]),
    ]
    handlers = {ServeError: _error, ValueError: _error, HTTPException: _error, Exception: _error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.server = server
    return app


# ---------------------------------------------------------------------------------------------- running
def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); a port in use is an InputError naming it."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]  # fmt: skip
    except socket.gaierror as e:
        raise InputError(f"--host {host}: not an address this machine can listen on ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise InputError(
            f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port (or --host)"
        ) from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(cfg: ServeConfig) -> None:
    """Listen on cfg.host:cfg.port, load the models and serve until interrupted."""
    import uvicorn

    sock = bind(cfg.host, cfg.port)  # before the models load: a port in use fails at once
    try:
        if not _is_loopback(cfg.host):
            log.warning(
                "listening on %s: anyone who can reach it can use the models and upload images", cfg.host
            )
        app = create_app(cfg)
        log.warning("vqim serve: open %s in a browser (Ctrl+C stops the server)", url_of(sock))
        uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=3)).run(sockets=[sock])
    finally:
        sock.close()


@contextlib.contextmanager
def background_server(app: Starlette, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve app with uvicorn on a free port in a thread (tests, screenshots); yields the page's URL."""
    import uvicorn

    sock = bind(host, 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="vqim-serve-http"
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
