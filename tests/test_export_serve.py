"""Export with its parity gate, predict --model, and the prediction service with its page."""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import io
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headstart.cli import main
from headstart.export.gate import ParityError
from headstart.export.writers import export, open_exported
from headstart.infer.prediction import predict
from headstart.training import TrainConfig, train

from .conftest import PHOTOS, colour_image, needs_nncf, needs_shared

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    from .conftest import make_dataset

    root = tmp_path_factory.mktemp("exp")
    data = make_dataset(root / "data")
    train(data, out=root / "run", config=TrainConfig(arch="tiny", weights=None, strategy="finetune", epochs=2,
                                                     batch_size=8, lr=0.05, workers=0))
    return root / "run" / "best.safetensors", data


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_an_export_gives_headstarts_answers(run, tmp_path: Path, fmt: str) -> None:
    ckpt, data = run
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m.xml")
    result = export(ckpt, format=fmt, out=out)
    assert result.parity.images == 12 and result.parity.top1_agreement == 1.0  # the run's validation images
    assert result.parity.max_logit_diff <= 1e-3
    model = open_exported(out)
    assert model.classes == ["blue", "red"] and model.preprocessing.image_size == 32
    ours = predict(ckpt, [data / "val"], workers=0, precision="fp32", engine="torch", reject="off")  # (exports: no
    theirs = predict(out, [data / "val"], workers=0)  # unknown-image test)
    assert [p.label for p in theirs] == [p.label for p in ours]
    assert max(abs(a.probability - b.probability) for a, b in zip(ours, theirs)) < 1e-4


def readme_snippet(model: Path, image: Path) -> tuple[str, float]:
    """The README's lines that run an exported file without headstart, run as they are there (with
    the file names swapped in): the class and probability they print."""
    text = (Path(__file__).parents[1] / "docs" / "export.md").read_text()
    code = text.split("Without headstart", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "ImageOps.exif_transpose" in code and '"best.onnx"' in code and '"photo.jpg"' in code
    code = code.replace('"best.onnx"', repr(str(model))).replace('"photo.jpg"', repr(str(image)))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    label, probability = printed.getvalue().split()
    return label, float(probability)


def test_the_readmes_lines_run_an_export_without_headstart_as_predict_does(run, tmp_path: Path) -> None:
    ckpt, data = run
    export(ckpt, out=tmp_path / "m.onnx")
    # a photo whose EXIF says "rotated 90 degrees": the snippet turns it upright, as headstart's decoder does
    upright = Image.new("RGB", (60, 40), (230, 30, 30))
    upright.paste((30, 30, 230), (0, 0, 60, 12))  # a blue band at the top
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown after turning 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    for image in (data / "val" / "red" / "red_0.png", tmp_path / "turned.jpg"):
        label, probability = readme_snippet(tmp_path / "m.onnx", image)
        ours = predict(ckpt, [image], workers=0, precision="fp32", reject="off")[0]
        assert (label, probability) == (ours.label, pytest.approx(ours.probability, abs=1e-4))


def test_one_decoder_for_files_bytes_pil_images_and_arrays(run, tmp_path: Path) -> None:
    """Every way an image comes in gives the same pixels: the full decode, EXIF-rotated, made RGB, as
    the README's lines make them for an exported file (export.documented_crop)."""
    from PIL import ImageOps

    from headstart import load
    from headstart.export.gate import documented_crop

    ckpt, data = run
    m = load(ckpt, precision="fp32")
    rng = np.random.default_rng(0)  # a large JPEG: today's draft decode would have read it at half size
    Image.fromarray(rng.integers(0, 255, (600, 700, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=90)
    turned = Image.new("RGB", (60, 40), (230, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    turned.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 255, (50, 70, 4), dtype=np.uint8), "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(rng.integers(0, 65535, (50, 70), dtype=np.uint16)).save(tmp_path / "deep.png")  # I;16
    odd = [tmp_path / "alpha.png", tmp_path / "deep.png"]  # transparency on white; 16 bits scaled, as the README says
    for path in (data / "val" / "red" / "red_0.png", tmp_path / "big.jpg", tmp_path / "turned.jpg", *odd):
        want = torch.from_numpy(documented_crop(path, m.preprocessing).copy()).permute(2, 0, 1)
        upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        arrays = [np.asarray(upright)] if path not in odd else []
        for image in (path, str(path), path.read_bytes(), Image.open(path), *arrays):
            assert torch.equal(m.decode(image), want), (path, type(image))
    gate = export(ckpt, out=tmp_path / "m.onnx", images=odd + [tmp_path / "turned.jpg"])  # the file as documented
    assert gate.parity.images == 3 and gate.parity.max_logit_diff < 1e-4
    strip = io.BytesIO()  # a few hundred bytes that a whole-image resize would make gigabytes of
    Image.new("RGB", (20000, 1), (200, 0, 0)).save(strip, "PNG")
    assert m.decode(strip.getvalue()).shape == (3, 32, 32) and len(strip.getvalue()) < 1000
    assert Image.open(tmp_path / "turned.jpg").size == (40, 60)  # stored on its side
    with pytest.raises(ValueError, match="uint8 \\(H, W\\), \\(H, W, 3\\) RGB"):
        m.decode(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="a path, bytes, a PIL image or a uint8 array"):
        m.decode(3)
    one, many = m.predict(Image.open(tmp_path / "big.jpg")), m.predict([tmp_path / "big.jpg", b"not an image"])
    assert one.top_k == many[0].top_k and many[1].label is None and "not a readable image" in many[1].error
    assert [p.top_k for p in m.predict(p for p in [tmp_path / "big.jpg"])] == [one.top_k]  # any iterable


def test_load_opens_each_kind_of_file_and_each_gives_the_same_answers(run, tmp_path: Path) -> None:
    from headstart import Classifier, load
    from headstart.export.convert import convert

    ckpt, data = run
    convert(ckpt, tmp_path / "w.pth")  # plain weights, with their arch and classes beside them
    files = {"checkpoint": ckpt, "weights": tmp_path / "w.pth",
             "onnx": export(ckpt, out=tmp_path / "m.onnx").path,
             "openvino": export(ckpt, format="openvino", out=tmp_path / "m.xml").path}
    answers = {}
    for kind, path in files.items():
        m = load(path, precision="fp32" if kind in ("checkpoint", "weights") else "auto")
        assert isinstance(m, Classifier) and (m.classes, m.arch) == (["blue", "red"], "tiny"), kind
        assert m.describe()["arch"] == "tiny" and m.preprocessing.image_size == 32
        answers[kind] = m.predict(data / "val", workers=0)
        assert len(answers[kind]) == 12 and m.logits(data / "val" / "red" / "red_0.png").shape == (1, 2)
    for kind, preds in answers.items():
        assert [p.label for p in preds] == [p.label for p in answers["checkpoint"]], kind
        assert max(abs(a.probability - b.probability) for a, b in zip(preds, answers["checkpoint"])) < 1e-4, kind
    assert "onnxruntime" in load(files["onnx"]).backend and "OpenVINO" in load(files["openvino"]).backend
    with pytest.raises(ValueError, match="m.onnx is an fp32 export and runs in fp32, not bf16"):
        load(files["onnx"], precision="bf16")
    with pytest.raises(ValueError, match="drop --engine, --device and --compile"):
        load(files["onnx"], engine="torch")
    with pytest.raises(ValueError, match="which gives logits, not features: pass the checkpoint it came from"):
        load(files["onnx"]).features(data / "val")
    with pytest.raises(ValueError, match="exported file already"):
        load(files["onnx"]).export(tmp_path / "again.onnx")
    with pytest.raises(ValueError, match="--reject 0.05 needs a checkpoint with an unknown-image test"):
        load(ckpt, precision="int8", reject=0.05)  # (this run has 12 validation images: no test)
    with pytest.raises(ValueError, match="int8 copy in OpenVINO on the CPU: drop --engine torch"):
        load(ckpt, precision="int8", engine="torch")
    if importlib.util.find_spec("nncf") is not None:  # (the int8 tests below require it where CI has it)
        int8 = load(ckpt, precision="int8", threads=1)
        assert int8.precision == "int8" and int8.arch == "tiny" and "int8 (OpenVINO)" in int8.backend
        assert len(int8.predict(data / "val", workers=0)) == 12
        assert int8.export(tmp_path / "from-int8.onnx").path.is_file()  # the checkpoint it runs a copy of
        with pytest.raises(ValueError, match="int8 \\(OpenVINO\\), which gives logits, not features: load it with"):
            int8.features(data / "val")


def test_model_says_the_architecture_of_an_exported_file(run, tmp_path: Path) -> None:
    ckpt, _ = run
    s = Server(export(ckpt, out=tmp_path / "m.onnx").path)
    try:
        status, model = request(s.url + "/model")
        assert status == 200 and model["arch"] == "tiny" and model["engine"] == "onnx file, fp32 (onnxruntime)"
        assert model["unknown_below"] is None and model["classes"] == ["blue", "red"]
    finally:
        s.close()


def test_an_export_that_disagrees_fails_loudly_and_leaves_nothing(run, tmp_path: Path, monkeypatch) -> None:
    ckpt, _ = run
    import headstart.export.writers as ex

    real = ex.open_exported

    def noisy(path):
        m = real(path)
        run_ = m.run
        m.run = lambda batch: run_(batch) + np.float32(0.01)
        return m

    monkeypatch.setattr(ex, "open_exported", noisy)
    with pytest.raises(ParityError, match="disagrees with headstart.*max \\|logit difference\\| 1.00e-02"):
        export(ckpt, out=tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_and_predict_model_from_the_command_line(run, tmp_path: Path, capsys) -> None:
    ckpt, data = run
    assert main(["export", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--images", str(data / "val" / "red")]) == 0
    out = capsys.readouterr().out
    assert "parity on 6 images (the images given)" in out and "top-1 agreement 100.00%" in out
    assert main(["predict", "--model", str(tmp_path / "m.onnx"), str(data / "val" / "red"), "--format", "json"]) == 0
    assert {p["label"] for p in json.loads(capsys.readouterr().out)} <= {"blue", "red"}


# ---------------------------------------------------------------------------------------------
# int8 (NNCF).

def test_int8_is_quantized_checked_on_validation_and_run_by_predict_evaluate_and_serve(run, tmp_path: Path,
                                                                                      capsys) -> None:
    needs_nncf()
    from headstart.export.gate import INT8_MAX_DROP
    from headstart.export.int8 import int8_model
    from headstart.infer.evaluation import evaluate
    from headstart.serve.app import Predictor

    ckpt, data = run
    fp32 = export(ckpt, format="openvino", out=tmp_path / "m.xml")
    result = export(ckpt, format="openvino", precision="int8", out=tmp_path / "m.int8.xml")
    p = result.parity
    assert (p.precision, p.images) == ("int8", 12) and p.accuracy is not None and p.reference_accuracy is not None
    assert p.reference_accuracy - p.accuracy <= INT8_MAX_DROP and "in fp32" in p.line()
    assert open_exported(tmp_path / "m.int8.xml").precision == "int8"
    # int8 weights: a quarter of the fp32 file's bytes, give or take the scales and the fp32 bias
    assert (tmp_path / "m.int8.bin").stat().st_size < 0.5 * (tmp_path / "m.bin").stat().st_size
    assert fp32.parity.accuracy == p.reference_accuracy
    assert main(["export", str(ckpt), "--format", "openvino", "--precision", "int8", "--out",
                 str(tmp_path / "cli.int8.xml")]) == 0
    assert (tmp_path / "cli.int8.xml").is_file() and "in fp32 (" in capsys.readouterr().out
    # predict, evaluate and serve with precision int8 use the same quantized model (made once, cached)
    cached = int8_model(ckpt)
    assert cached.precision == "int8" and int8_model(ckpt).path == cached.path
    preds = predict(ckpt, [data / "val"], workers=0, precision="int8", reject="off")
    assert sum(pr.label == pr.path.split("/")[-2] for pr in preds) / len(preds) == p.accuracy
    assert evaluate(ckpt, data, workers=0, precision="int8").accuracy == p.accuracy
    server = Predictor(ckpt, precision="int8", reject="off")
    try:
        image = server.decode((data / "val" / "red" / "red_0.png").read_bytes(), "red_0.png")
        answer, batch = server.submit(image).result(timeout=30)
        assert batch == 1 and server.describe()["engine"] == "xml file, int8 (OpenVINO)"
        assert answer.familiarity is None and server.describe()["unknown_below"] is None
        assert answer.label == next(pr.label for pr in preds if pr.path.endswith("red_0.png"))
    finally:
        server.close()


def test_precision_auto_uses_an_int8_model_made_before_only_without_bf16_and_where_it_ran_faster(
        run, monkeypatch) -> None:
    needs_nncf()
    import headstart.export.int8 as q
    import headstart.runtime.device as rt
    from headstart.infer.evaluation import evaluate

    ckpt, data = run
    made = q.int8_model(ckpt)
    side = made.path.with_suffix(".json")
    record = json.loads(side.read_text())
    assert record["parity"]["precision"] == "int8" and record["int8_img_s"] > 0 and record["default_img_s"] > 0
    opened: list[Path] = []
    real_open = q.open_exported
    monkeypatch.setattr(q, "open_exported", lambda path, **kw: opened.append(Path(path)) or real_open(path, **kw))

    def used(bf16: bool, int8_img_s: float) -> bool:
        monkeypatch.setattr(rt, "cpu_has_bf16", lambda: bf16)
        side.write_text(json.dumps({**record, "int8_img_s": int8_img_s, "default_img_s": 10.0}))
        opened.clear()
        predict(ckpt, [data / "val"], workers=0, reject="off")
        return opened == [made.path]

    assert used(bf16=False, int8_img_s=20.0)
    assert not used(bf16=False, int8_img_s=5.0)  # slower than the default precision
    assert not used(bf16=True, int8_img_s=20.0)  # bf16 is there: auto keeps it
    opened.clear()
    predict(ckpt, [data / "val"], workers=0, engine="torch")  # the torch engine named: no OpenVINO model
    assert opened == []
    monkeypatch.setattr(rt, "cpu_has_bf16", lambda: False)
    side.write_text(json.dumps({**record, "int8_img_s": 20.0, "default_img_s": 10.0}))
    opened.clear()
    assert evaluate(ckpt, data, workers=0).accuracy == evaluate(ckpt, data, workers=0, precision="int8").accuracy
    assert opened == [made.path, made.path]  # auto's choice, then asked for
    opened.clear()
    predict(ckpt, [data / "val"], workers=0, precision="fp32")  # a precision named: that one
    assert opened == []
    side.unlink()  # no record (a run killed while it was being made): never used, and made again when asked
    opened.clear()
    predict(ckpt, [data / "val"], workers=0)
    assert opened == []
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(q, "export", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        q.int8_model(ckpt)  # the half-made entry is not taken for a whole one
    remade = q.int8_model(ckpt)
    assert remade.path == made.path and side.is_file()
    assert sorted(p.name for p in made.path.parent.iterdir()) == sorted(
        [made.path.name, made.path.with_suffix(".bin").name, side.name])  # no temporary file left


def test_int8_that_loses_accuracy_fails_and_leaves_nothing(run, tmp_path: Path, monkeypatch) -> None:
    needs_nncf()
    import headstart.export.writers as ex

    ckpt, _ = run
    real = ex.open_exported

    def swapped(path):  # every answer the other class: accuracy falls to 1 - fp32's
        m = real(path)
        run_ = m.run
        m.run = lambda batch: run_(batch)[:, ::-1].copy()
        return m

    monkeypatch.setattr(ex, "open_exported", swapped)
    with pytest.raises(ParityError, match="accuracy .* against .* in fp32.*keep fp32 or bf16"):
        export(ckpt, format="openvino", precision="int8", out=tmp_path / "m.int8.xml")
    assert not list(tmp_path.iterdir())


def test_int8_needs_openvino_and_images_to_calibrate_on(run, tmp_path: Path) -> None:
    from headstart.export.int8 import int8_model

    ckpt, _ = run
    with pytest.raises(ValueError, match="int8 is written as OpenVINO IR: add --format openvino"):
        export(ckpt, format="onnx", precision="int8")
    with pytest.raises(ValueError, match="precision 'int4' is not one of fp32, int8"):
        export(ckpt, format="openvino", precision="int4")
    alone = tmp_path / "alone.safetensors"  # outside its run folder: no dataset to calibrate on
    alone.write_bytes(ckpt.read_bytes())
    with pytest.raises(FileNotFoundError, match="--precision int8 --images DIR"):
        int8_model(alone)
    fp32 = export(ckpt, format="openvino", out=tmp_path / "m.xml")
    with pytest.raises(ValueError, match="is a fp32 export"):
        int8_model(fp32.path)


# ---------------------------------------------------------------------------------------------
# The service.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The app under uvicorn in a thread, on a free local port."""

    def __init__(self, checkpoint, **kw) -> None:
        import uvicorn

        from headstart.serve.app import Predictor, make_app

        max_upload = kw.pop("max_upload", 1 << 20)
        self.predictor = Predictor(checkpoint, **kw)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(make_app(self.predictor, max_upload=max_upload), host="127.0.0.1",
                                                    port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started and time.monotonic() < end:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.predictor.close()


def request(url: str, body: bytes | None = None, content_type: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "headstart-test-boundary"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png(colour=(220, 40, 30), seed=0) -> bytes:
    buf = io.BytesIO()
    colour_image(colour, seed=seed).save(buf, "PNG")
    return buf.getvalue()


def bomb() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture
def server(run):
    s = Server(run[0], engine="torch", max_wait=0.05)
    yield s
    s.close()


def test_the_service_answers_and_refuses_bad_input_with_4xx(server: Server) -> None:
    assert request(server.url + "/health") == (200, {"status": "ok"})
    status, model = request(server.url + "/model")
    assert status == 200 and model["classes"] == ["blue", "red"] and model["preprocessing"]["image_size"] == 32
    body, ctype = multipart([("a.png", png()), ("b.png", png((30, 40, 220), seed=1))])
    status, answer = request(server.url + "/predict", body, ctype)
    assert status == 200 and [p["file"] for p in answer["predictions"]] == ["a.png", "b.png"]
    assert [p["label"] for p in answer["predictions"]] == ["red", "blue"] and answer["seconds"] > 0
    assert all(len(p["top_k"]) == 2 for p in answer["predictions"])
    assert request(server.url + "/predict", png(), "image/png")[1]["predictions"][0]["label"] == "red"
    truncated = png()[:200]
    cases = [
        (multipart([])[0], multipart([])[1], 400, "no file"),
        (*multipart([("e.png", b"")]), 400, "e.png: the file is empty"),
        (*multipart([("notes.png", b"hello, not an image")]), 415, "notes.png: not an image"),
        (*multipart([("cut.png", truncated)]), 400, "cut.png: the image is"),
        (*multipart([("bomb.png", bomb())]), 413, "too large"),
        (b"\0" * (2 << 20), "image/png", 413, "over the limit"),
        (b'{"image": 1}', "application/json", 415, "content type 'application/json' is not read here"),
        (b"", "image/png", 400, "the request body is empty"),
    ]
    for body, ctype, want, message in cases:
        status, answer = request(server.url + "/predict", body, ctype)
        assert (status, answer["status"]) == (want, want) and message in answer["error"], (message, status, answer)
    assert request(server.url + "/health") == (200, {"status": "ok"})  # still serving
    page = urllib.request.urlopen(server.url + "/").read().decode()
    assert "Drop images here" in page and "<script>" in page and "http" not in page.split("<script>")[1]


def test_concurrent_requests_are_batched_together(server: Server) -> None:
    def one(i: int) -> int:
        return request(server.url + "/predict", png(seed=i), "image/png")[1]["batch"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(one, range(16)))
    assert max(batches) > 1, batches
    assert server.predictor.batches < 16


def test_a_bounded_load_with_malformed_requests_gets_every_answer(server: Server) -> None:
    """16 clients, 160 requests, a quarter of them malformed: each malformed one its 4xx, each good one
    its answer, nothing else."""
    good_body = png()

    def one(i: int) -> tuple[bool, int]:
        if i % 4 == 3:
            return False, request(server.url + "/predict", b"not an image", "image/png")[0]
        return True, request(server.url + "/predict", good_body, "image/png")[0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(160)))
    assert sorted({s for good, s in results if good}) == [200]
    assert sorted({s for good, s in results if not good}) == [415]
    assert sum(1 for good, _ in results if not good) == 40


@pytest.mark.slow
@needs_shared
def test_the_page_in_chromium_shows_the_class_of_a_photo_and_the_error_of_a_text_file(real_weights_home: Path,
                                                                                      tmp_path: Path, monkeypatch):
    from .conftest import chromium

    browser = chromium()
    webdriver = pytest.importorskip("selenium.webdriver")
    import shutil

    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        import os

        if os.environ.get("HEADSTART_REQUIRE_CHROMIUM"):
            pytest.fail("chromedriver is required here (HEADSTART_REQUIRE_CHROMIUM) but not installed")
        pytest.skip("chromedriver is not installed (CI installs it: apt-get install chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from .conftest import CHROME_FLAGS

    monkeypatch.setenv("HEADSTART_HOME", str(real_weights_home))
    server = Server("imagenet", arch="resnet50", engine="torch")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,900"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(server.url + "/")
        text = tmp_path / "notes.txt"
        text.write_text("not an image")
        upload = driver.find_element(By.ID, "files")
        upload.send_keys(str(PHOTOS / "dog.jpg"))
        done = WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result[data-state=done]"))
        assert done[0].get_attribute("data-label") == "malamute"
        upload.send_keys(str(text))
        failed = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result[data-state=error]"))
        assert "notes.txt: content type" in failed[0].text or "notes.txt: not an image" in failed[0].text
        from .test_report import ARTIFACTS

        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "serve.png"))
        assert (ARTIFACTS / "serve.png").stat().st_size > 20_000
    finally:
        driver.quit()
        server.close()
