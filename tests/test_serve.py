"""`vqim serve`: the endpoints through Starlette's TestClient (everywhere), and the page end to end in a headless
Chromium driven by Playwright (skipped only where Chromium or Playwright is missing).

Tiny untrained models, built once: a tokenizer (32 px, 64 codes, 4×4 tokens), a class-conditional prior on its
tokens, and a lowres:2 condition tokenizer with a spatially conditioned prior.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqim import Prior, Tokenizer
from vqim.checkpoint import write_json
from vqim.conditions import parse_condition
from vqim.config import SamplingConfig, get_tokenizer_config
from vqim.data import photos_dir
from vqim.errors import InputError
from vqim.evaluate import load_center_crop
from vqim.metrics import psnr, ssim
from vqim.options import add_options, build
from vqim.samples import SampleConfig, condition_tokens, sample_to_folder
from vqim.sampling import generate, row_seed
from vqim.tokens import tokenizer_identity

starlette = pytest.importorskip("starlette", reason="vqim serve needs starlette (pip install -e '.[dev]')")
from starlette.testclient import TestClient  # noqa: E402

from vqim.serve import ServeConfig, create_app  # noqa: E402
from vqim.serve.app import ServeError, Worker, background_server, bind, stretches  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LIMIT_BYTES = 300_000
LIMIT_PIXELS = 1_000_000
SETTINGS = {"n": "4", "seed": "5", "top_k": "8", "temperature": "1", "label": "all"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    tiny = {"enc_depth": 1, "dec_depth": 1}
    Tokenizer(
        get_tokenizer_config("vit-vqgan-tiny", image_size=32, codebook_size=64, **tiny)
    ).save_pretrained(root / "tok")
    Tokenizer(
        get_tokenizer_config("vit-vqgan-tiny", image_size=32, codebook_size=16, **tiny)
    ).save_pretrained(root / "ctok")
    tok, ctok = Tokenizer.from_pretrained(root / "tok"), Tokenizer.from_pretrained(root / "ctok")
    small = {"vocab_size": 64, "grid_size": (4, 4), "depth": 1, "dim": 32, "heads": 2, "mlp_dim": 64}
    Prior.from_preset("vim-tiny", num_classes=2, **small).save_pretrained(root / "prior")
    write_json(root / "prior" / "tokens.json", {**tokenizer_identity(tok), "class_names": ["cat", "dog"]})
    Prior.from_preset("vim-tiny", cond_vocab_size=16, cond_grid_size=(4, 4), **small).save_pretrained(
        root / "sprior"
    )
    condition = {"spec": "lowres:2", "grid_size": [4, 4], "codebook_size": 16, **tokenizer_identity(ctok)}
    write_json(root / "sprior" / "tokens.json", {**tokenizer_identity(tok), "condition": condition})
    return {"tok": root / "tok", "prior": root / "prior", "ctok": root / "ctok", "sprior": root / "sprior"}


def _config(models, spatial: bool = False, **kw) -> ServeConfig:
    prior = {"prior": str(models["prior"])}
    if spatial:
        prior = {"prior": str(models["sprior"]), "condition_tokenizer": str(models["ctok"])}
    base = {"tokenizer": str(models["tok"]), "device": "cpu", "max_upload_bytes": LIMIT_BYTES,
            "max_pixels": LIMIT_PIXELS, "threads": 1, "port": 0}  # fmt: skip
    return ServeConfig(**{**base, **prior, **kw})


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(_config(models))) as c:
        yield c


@pytest.fixture(scope="module")
def spatial_client(models):
    with TestClient(create_app(_config(models, spatial=True))) as c:
        yield c


def _png(arr: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _pixels(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def _uint8(image: torch.Tensor) -> np.ndarray:
    return image.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _events(client, path: str, data: dict, files: dict | None = None) -> list[dict]:
    with client.stream("POST", path, data=data, files=files) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line) for line in r.iter_lines() if line]


def _uploads_left(client) -> list[Path]:
    return list(client.app.state.server.tmp.iterdir())


def _library_reconstruction(models, photo: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tok = Tokenizer.from_pretrained(models["tok"])
    x = load_center_crop(photos_dir() / photo, 32)[None]
    ids = tok.encode(x)
    return x, ids, tok.decode(ids)


# ---------------------------------------------------------------------------------------------- options, info
def test_every_option_has_help_and_the_defaults_are_safe():
    parser = argparse.ArgumentParser()
    names = add_options(parser, ServeConfig)  # raises for a field without help text
    assert {
        "tokenizer",
        "prior",
        "condition_tokenizer",
        "host",
        "port",
        "max_upload_bytes",
        "max_pixels",
    } <= set(names)
    cfg = build(ServeConfig, parser.parse_args(["--tokenizer", "t"]))
    assert cfg.host == "127.0.0.1" and cfg.port == 8000 and cfg.prior is None
    for bad in ({"port": 70000}, {"max_pixels": 0}, {"queue": -1}, {"condition_tokenizer": "c"}):
        with pytest.raises(InputError):
            ServeConfig(tokenizer="t", **bad)
    assert (
        stretches(0, 4, 4) == [1, 2, 3, 4] and stretches(2, 8, 2) == [4, 6, 8] and stretches(0, 4, 0) == [4]
    )


def test_a_port_in_use_is_refused_with_its_flag():
    sock = bind("127.0.0.1", 0)
    try:
        with pytest.raises(InputError, match="--port"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()


def test_page_and_model_info(client, models):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "http://" not in r.text and "https://" not in r.text and "<script src" not in r.text  # all local
    info = client.get("/api/info").json()
    tok, prior = Tokenizer.from_pretrained(models["tok"]), Prior.from_pretrained(models["prior"])
    by_role = {m["role"]: m for m in info["models"]}
    assert by_role["tokenizer"]["parameters"]["total"] == tok.num_params()["total"]
    assert by_role["prior"]["parameters"]["total"] == prior.num_params()["total"]
    assert by_role["prior"]["config"]["num_classes"] == 2 and by_role["tokenizer"]["path"] == str(
        models["tok"]
    )
    assert info["prior"]["class_names"] == ["cat", "dog"] and info["prior"]["can_sample"]
    assert info["limits"] == {"max_upload_bytes": LIMIT_BYTES, "max_pixels": LIMIT_PIXELS, "max_samples": 16}
    assert [p["name"] for p in info["photos"][:3]] == ["chelsea.png", "rocket.jpg", "camera.png"]
    thumb = client.get("/api/photos/chelsea.png")
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (112, 112)
    assert client.get("/api/photos/..%2Fpyproject.toml").status_code == 404


# ---------------------------------------------------------------------------------------------- reconstruction
def test_reconstruction_is_the_librarys(client, models):
    x, ids, rec = _library_reconstruction(models, "chelsea.png")
    d = client.post("/api/reconstruct", data={"photo": "chelsea.png"}).json()
    assert d["psnr"] == pytest.approx(float(psnr(rec, x)[0]), abs=1e-3)
    assert d["ssim"] == pytest.approx(float(ssim(rec, x)[0]), abs=1e-3)
    assert (
        d["ids"] == ids[0].tolist()
        and d["codes_used"] == int(ids.unique().numel())
        and d["token_count"] == 16
    )
    assert np.array_equal(_pixels(d["original"]), _uint8(x[0]))
    assert np.abs(_pixels(d["reconstruction"]).astype(int) - _uint8(rec[0])).max() <= 1
    tokens = _pixels(d["tokens"])
    assert tokens.shape == (32, 32, 3) and (tokens[:8, :8] == tokens[0, 0]).all()  # one colour per token
    # The same photo uploaded as a file gives the same numbers.
    up = client.post(
        "/api/reconstruct", files={"image": ("mine.png", (photos_dir() / "chelsea.png").read_bytes())}
    )
    assert up.json()["psnr"] == d["psnr"] and up.json()["name"] == "mine.png"
    assert _uploads_left(client) == []


def test_any_image_mode_is_converted(client):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    cases = {
        "one-bit.png": _png(im.convert("1")),
        "grey.png": _png(im.convert("L")),
        "palette.png": _png(im.convert("P")),
        "alpha.png": _png(im.convert("RGBA")),
        "grey-alpha.png": _png(im.convert("LA")),
        "sixteen-bit.png": _png(Image.fromarray(rng.integers(0, 65536, (40, 48), dtype=np.uint16))),
        "cmyk.jpg": _png(im.convert("CMYK"), "JPEG"),
        "photo.webp": _png(im, "WEBP"),
        "photo.bmp": _png(im, "BMP"),
        "photo.gif": _png(im, "GIF"),
        "float.tif": _png(Image.fromarray(rng.random((40, 48), dtype=np.float32), "F"), "TIFF"),
    }
    for name, data in cases.items():
        r = client.post("/api/reconstruct", files={"image": (name, data, "application/octet-stream")})
        assert r.status_code == 200, (name, r.text)
        assert _pixels(r.json()["reconstruction"]).shape == (32, 32, 3)
    assert _uploads_left(client) == []


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG header claiming width × height pixels, with almost no data: decoding it would need the memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_bad_uploads_get_a_clear_message(client):
    good = _png(np.zeros((40, 40, 3), np.uint8))
    big_pixels = _png(np.zeros((1000, 1001), np.uint8))  # small file, 1 001 000 pixels
    cases = [
        ("notes.png", b"these are my notes, not a picture", 400, "notes.png is not an image"),
        ("cut.png", good[: len(good) // 2], 400, "cut.png"),
        ("huge.png", b"\0" * (LIMIT_BYTES + 1), 413, "--max-upload-bytes"),
        ("wide.png", big_pixels, 413, "1,001,000 pixels, more than the limit of 1,000,000"),
        ("bomb.png", _bomb_png(40_000, 40_000), 413, "too many pixels"),
        ("empty.png", b"", 400, "empty.png is empty"),
    ]
    for name, data, status, message in cases:
        r = client.post("/api/reconstruct", files={"image": (name, data, "image/png")})
        assert r.status_code == status, (name, r.text)
        error = r.json()["error"]
        assert message in error and "Traceback" not in error and "/tmp" not in error, (name, error)
    # Past the limit by more than the form's own fields: refused while the body arrives.
    r = client.post("/api/reconstruct", files={"image": ("larger.png", b"\0" * (LIMIT_BYTES + 100_000))})
    assert r.status_code == 413 and "--max-upload-bytes" in r.json()["error"]
    for data, message in (
        ({}, "choose an image"),
        ({"photo": "../../etc/passwd"}, "not one of the built-in"),
    ):
        r = client.post("/api/reconstruct", data=data)
        assert r.status_code == 400 and message in r.json()["error"]
    assert client.get("/api/nowhere").json() == {"error": "Not Found"}
    assert _uploads_left(client) == []


# ---------------------------------------------------------------------------------------------- sampling
def test_sampling_streams_previews_and_gives_the_images_of_vqim_sample(client, models, tmp_path):
    events = _events(client, "/api/sample", SETTINGS)
    assert [e["type"] for e in events] == ["start", "progress", "progress", "progress", "done"]
    assert events[0]["labels"] == ["cat", "dog", "cat", "dog"] and events[0]["total"] == 16
    for k, e in enumerate(events[1:4], start=1):
        assert e["done"] == 4 * k and len(e["images"]) == 4
        partial = _pixels(e["images"][0])
        assert (partial[8 * k :] == 128).all()  # rows not sampled yet: grey
    sample_to_folder(SampleConfig(prior=str(models["prior"]), tokenizer=str(models["tok"]), out=str(tmp_path), n=4,
                                  sampling=SamplingConfig(seed=5, top_k=8), device="cpu", progress=False))  # fmt: skip
    for i, url in enumerate(events[-1]["images"]):
        written = np.asarray(Image.open(tmp_path / f"class{i % 2}_{i:04d}.png").convert("RGB"))
        assert np.array_equal(_pixels(url), written), i
    one_class = _events(client, "/api/sample", {**SETTINGS, "label": "1", "n": "2", "cfg_scale": "2"})
    assert one_class[-1]["type"] == "done" and one_class[-1]["labels"] == ["dog", "dog"]


def test_bad_sampling_settings_are_refused(client):
    cases = [
        ({"n": "0"}, "count must be 1 to 16"),
        ({"n": "17"}, "--max-samples"),
        ({"n": "two"}, "n must be an integer"),
        ({"top_p": "2"}, "top_p"),
        ({"temperature": "-1"}, "temperature"),
        ({"top_k": "0"}, "top_k"),
        ({"label": "2"}, "class 2 is out of range"),
        ({"label": "cat"}, "class must be an integer"),
        ({"seed": "-1"}, "seed must be"),
    ]
    for data, message in cases:
        r = client.post("/api/sample", data={**SETTINGS, **data})
        assert r.status_code == 400 and message in r.json()["error"], (data, r.text)
    r = client.post("/api/complete", data={**SETTINGS, "photo": "camera.png", "rows": "4"})
    assert r.status_code == 400 and "rows must be in [0, 3]" in r.json()["error"]
    r = client.post("/api/condition", data={**SETTINGS, "photo": "camera.png"})
    assert r.status_code == 400 and "no spatial condition" in r.json()["error"]


def test_completion_keeps_the_top_rows(client, models):
    events = _events(client, "/api/complete", {**SETTINGS, "photo": "camera.png", "rows": "2", "label": "0"})
    assert [e["type"] for e in events] == ["start", "progress", "done"]
    assert _pixels(events[0]["kept"])[16:].max() == 128 and events[1]["done"] == 4
    _, ids, _ = _library_reconstruction(models, "camera.png")
    prior, tok = Prior.from_pretrained(models["prior"]), Tokenizer.from_pretrained(models["tok"])
    seeds = [row_seed(5, i) for i in range(4)]
    want = generate(prior, 4, 0, top_k=8, prefix=ids[0, :2].reshape(-1), row_seeds=seeds)
    assert torch.equal(want[:, :2], ids[:, :2].expand(4, -1, -1))
    for url, image in zip(events[-1]["images"], tok.decode(want), strict=True):
        assert np.abs(_pixels(url).astype(int) - _uint8(image)).max() <= 1


def test_spatially_conditioned_prior_samples_from_the_images_condition(spatial_client, models):
    info = spatial_client.get("/api/info").json()
    assert (
        info["prior"]["spatial"]
        and info["prior"]["condition"] == "lowres:2"
        and not info["prior"]["can_sample"]
    )
    assert [m["role"] for m in info["models"]] == ["tokenizer", "prior", "condition tokenizer"]
    settings = {k: v for k, v in SETTINGS.items() if k != "label"}
    events = _events(spatial_client, "/api/condition", {**settings, "photo": "rocket.jpg"})
    assert [e["type"] for e in events] == ["start", "progress", "progress", "progress", "done"]
    x = load_center_crop(photos_dir() / "rocket.jpg", 32)[None]
    cond = parse_condition("lowres:2")
    assert np.abs(_pixels(events[0]["condition"]).astype(int) - _uint8(cond.derive(x)[0])).max() <= 1
    ctok, tok = Tokenizer.from_pretrained(models["ctok"]), Tokenizer.from_pretrained(models["tok"])
    prior = Prior.from_pretrained(models["sprior"])
    ctokens = condition_tokens(x, cond, ctok, (32, 32), False)
    want = tok.decode(
        generate(prior, 4, top_k=8, condition=ctokens[0], row_seeds=[row_seed(5, i) for i in range(4)])
    )
    for url, image in zip(events[-1]["images"], want, strict=True):
        assert np.abs(_pixels(url).astype(int) - _uint8(image)).max() <= 1
    # A low-resolution image (half the size) is the condition itself; completion derives it from the image.
    small = _png(np.asarray(Image.open(photos_dir() / "coffee.png").convert("RGB").resize((16, 16))))
    events = _events(
        spatial_client, "/api/condition", {**settings, "n": "1"}, files={"image": ("s.png", small)}
    )
    assert events[-1]["type"] == "done" and _pixels(events[0]["input"]).shape == (16, 16, 3)
    events = _events(spatial_client, "/api/complete", {**settings, "photo": "rocket.jpg", "rows": "1"})
    assert events[-1]["type"] == "done" and len(events[-1]["images"]) == 4
    r = spatial_client.post("/api/sample", data=settings)
    assert r.status_code == 400 and "spatially conditioned" in r.json()["error"]
    bad = _events(spatial_client, "/api/condition", settings, files={"image": ("x.png", b"nope")})
    assert (
        bad == [{"type": "error", "message": bad[0]["message"]}]
        and "x.png is not an image" in bad[0]["message"]
    )
    assert _uploads_left(spatial_client) == []


# ---------------------------------------------------------------------------------------------- the queue
def test_one_worker_and_a_bounded_queue():
    async def scenario() -> None:
        worker = Worker(max_waiting=1)
        gate, started = threading.Event(), threading.Event()
        order: list[str] = []

        def blocking() -> str:
            started.set()
            gate.wait(10)
            order.append("first")
            return "first"

        first = asyncio.ensure_future(worker.run(blocking))
        await asyncio.to_thread(started.wait, 10)

        def job(emit, stopped) -> None:
            order.append("second")
            emit({"type": "done"})

        events = worker.stream(job)  # admitted: one call ahead of it
        with pytest.raises(ServeError) as busy:
            worker.stream(job)
        assert busy.value.status == 503 and "busy" in busy.value.message and worker.active == 2
        assert await events.__anext__() == {"type": "queued", "ahead": 1}
        gate.set()
        assert await first == "first"
        assert [e async for e in events] == [{"type": "done"}]
        assert order == ["first", "second"] and worker.active == 0  # one at a time, in arrival order

        # A client that goes away stops its job at the job's next step.
        steps: list[int] = []

        def endless(emit, stopped) -> None:
            for i in range(1000):
                emit({"step": i})
                steps.append(i)
                time.sleep(0.005)

        events = worker.stream(endless)
        assert await events.__anext__() == {"step": 0}
        await events.aclose()
        for _ in range(200):
            if worker.active == 0:
                break
            await asyncio.sleep(0.01)
        assert worker.active == 0 and len(steps) < 1000
        worker.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------- in a browser
@pytest.fixture(scope="module")
def browser():
    from vqim.serve.screenshot import chromium, find_chromium

    if find_chromium() is None:
        pytest.skip("no Chromium on the PATH (apt-get install chromium): the browser tests need it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install -e '.[dev]'): the browser tests need it")
    with sync_playwright() as pw, chromium(pw) as b:
        yield b


@pytest.fixture(scope="module")
def site(models):
    with background_server(create_app(_config(models))) as url:
        yield url


@pytest.fixture
def page(browser, site):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: "Content Security Policy" in m.text and problems.append(m.text))
    page.goto(site)
    yield page
    page.close()
    assert problems == []  # no script errors, nothing blocked


def _expect():
    from playwright.sync_api import expect

    return expect


def test_browser_reconstruction_shows_the_librarys_psnr(page, models):
    expect = _expect()
    expect(page.locator("#models .model")).to_have_count(2)
    expect(page.locator("#models")).to_contain_text("parameters")
    for how, photo in (("click", "chelsea.png"), ("upload", "camera.png")):
        if how == "click":
            page.click(f'button[data-photo="{photo}"]')
        else:
            page.set_input_files("#file", str(photos_dir() / photo))
        expect(page.locator("#chosen")).to_contain_text(photo)
        x, ids, rec = _library_reconstruction(models, photo)
        shown = f"{float(psnr(rec, x)[0]):.2f} dB"
        expect(page.locator("#psnr")).to_have_text(shown)  # the library's value, as the page rounds it
        expect(page.locator("#codes")).to_contain_text(f"{int(ids.unique().numel())} of 64")
    assert page.eval_on_selector("#tokens", "e => e.naturalWidth") == 32
    assert page.eval_on_selector("#cmp-orig", "e => e.naturalWidth") == 32
    # The compare slider: dragging moves the split between the original and the reconstruction.
    box = page.locator("#compare").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + 10)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + 10)
    page.mouse.up()
    assert 20 <= float(page.eval_on_selector("#split", "e => e.value")) <= 30
    assert "inset(0px 7" in page.eval_on_selector("#cmp-orig", "e => getComputedStyle(e).clipPath")


def test_browser_samples_arrive_with_progress_and_download(page, tmp_path):
    expect = _expect()
    page.fill("#n", "4")
    page.fill("#seed", "5")
    page.fill("#top_k", "8")
    page.click("#sample")
    expect(page.locator("#gallery")).to_have_attribute("data-state", "done")
    assert page.eval_on_selector("#progress", "e => e.dataset.previews") == "3"  # three partial images each
    images = page.locator("#gallery figure.sample img")
    expect(images).to_have_count(4)
    assert (
        page.eval_on_selector_all("#gallery figure.sample img", "es => es.map(e => e.naturalWidth)")
        == [32] * 4
    )
    expect(page.locator("#gallery")).to_contain_text("class cat")
    with page.expect_download() as download:
        page.click("#download")
    saved = tmp_path / "grid.png"
    download.value.save_as(saved)
    assert Image.open(saved).size == (4 * 34 + 2, 36)  # one row of 4 images, 2 px apart
    # Completion of the chosen image from its top token rows.
    page.click('button[data-photo="rocket.jpg"]')
    page.fill("#rows", "3")
    page.click("#complete")
    expect(page.locator("#gallery")).to_have_attribute("data-state", "done")
    expect(page.locator("#gallery figure.context")).to_have_count(2)  # the input and its kept part
    expect(page.locator("#gallery figure.sample")).to_have_count(4)


def test_browser_bad_and_too_large_uploads_show_a_message(page):
    expect = _expect()
    broken = {"name": "broken.png", "mimeType": "image/png", "buffer": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64}
    page.set_input_files("#file", files=[broken])
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("broken.png")
    assert "Traceback" not in page.content() and 'File "' not in page.inner_text("body")
    large = {"name": "large.png", "mimeType": "image/png", "buffer": b"\x00" * (LIMIT_BYTES + 1)}
    page.set_input_files("#file", files=[large])
    expect(page.locator("#error")).to_contain_text(
        "large.png is 300,001 bytes; the server accepts images of at most 300,000"
    )
    expect(page.locator("#error")).to_contain_text("--max-upload-bytes")
    # The server refuses it too, when a client sends it anyway.
    status, error = page.evaluate(
        """async (n) => {
            const fd = new FormData();
            fd.append("image", new Blob([new Uint8Array(n)], {type: "image/png"}), "sent.png");
            const r = await fetch("/api/reconstruct", {method: "POST", body: fd});
            return [r.status, (await r.json()).error];
        }""",
        3 * LIMIT_BYTES,
    )
    assert status == 413 and "--max-upload-bytes" in error


def test_browser_condition_sampling(browser, models):
    expect = _expect()
    with background_server(create_app(_config(models, spatial=True))) as url:
        page = browser.new_page()
        page.goto(url)
        expect(page.locator("#sample")).to_be_hidden()
        expect(page.locator("#condition")).to_contain_text("lowres:2")
        page.click('button[data-photo="chelsea.png"]')
        page.fill("#n", "3")
        page.click("#condition")
        expect(page.locator("#gallery")).to_have_attribute("data-state", "done")
        expect(page.locator("#gallery figure.context figcaption")).to_have_text(["input", "condition"])
        expect(page.locator("#gallery figure.sample")).to_have_count(3)
        page.close()
