"""`headstart serve`: a prediction service with a web page, on Starlette (ASGI) served by uvicorn.

    POST /predict   one or several images: a multipart form (any field names), or the raw bytes of one
                    image with an image/* (or application/octet-stream) content type
                    -> {"predictions": [{"file", "label", "probability", "top_k": [{"class",
                       "probability"}...]}...], "seconds": s, "batch": n}; probabilities at the
                    checkpoint's temperature; with its unknown-image test also "familiarity" and
                    "unknown" (the label is then "unknown")
    GET  /health    {"status": "ok"}
    GET  /model     architecture, classes, preprocessing, engine
    GET  /          a page: choose or drop images, see each with its top-k as bars and the time taken

Requests are batched together (dynamic batching): every decoded image joins a queue, and one worker
thread takes what is waiting, up to `max_batch` images (and, if `max_wait` > 0, what comes within
that many seconds of the first one), runs it as one batch through the model's Classifier (the
backend, decoder and answers that `predict` uses: infer/classifier.py), and answers each image's request. Under load the images
that arrive while a batch runs make the next one, so no waiting is needed: measured by
bench/serve.py (ResNet50, 16 clients, amx class), 128.5 img/s with no wait and 123.3 with 10 ms,
while one client alone waited 16 ms a request with none and 27 with 10 ms; hence `max_wait` 0. The event loop only reads, decodes (in a thread) and
answers, so the service stays responsive while a batch runs.

Bad input is a 4xx JSON error naming the problem, and the service goes on: no file (400), an empty
file (400), a file that is not an image (415), a truncated image (400), an image over Pillow's
decompression-bomb guard (413), an upload over `max_upload` bytes (413), a content type it does not
read (415). Nothing from an upload is written to disk: the body is read into memory, at most
`max_upload` bytes of it.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from headstart.data import IMAGE_ERRORS
from headstart.infer.classifier import Prediction
from headstart.infer.opening import load

log = logging.getLogger(__name__)

MAX_UPLOAD = 8 * 2**20  # bytes a request may send (--max-upload)
DRAIN = 4  # an upload over the limit is read and dropped up to this many times the limit
MAX_BATCH = 16
MAX_WAIT = 0.0  # s a batch waits for more images after its first one: none (see the module docstring)


class BadInput(ValueError):
    """An upload the service cannot answer: `status` is the HTTP status to say so."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    image: torch.Tensor  # uint8 (3, S, S)
    done: Future


class Predictor:
    """A Classifier (infer/classifier.py: the backend chosen there, the decode, the answers) fed by one
    worker thread that batches what is waiting."""

    def __init__(self, checkpoint: str | os.PathLike[str], *, arch: str | None = None,
                 classes: str | list[str] | None = None, top_k: int = 5, max_batch: int = MAX_BATCH,
                 max_wait: float = MAX_WAIT, precision: str = "auto", engine: str = "auto",
                 threads: int | None = None, reject: str | float = "auto") -> None:
        if top_k < 1 or max_batch < 1 or max_wait < 0:
            raise ValueError(f"need top_k >= 1, max_batch >= 1 and max_wait >= 0; got top_k={top_k}, "
                             f"max_batch={max_batch}, max_wait={max_wait}")
        self.model = load(checkpoint, precision=precision, engine=engine, threads=threads, reject=reject, arch=arch,
                          classes=classes).prepare()
        self.classes = self.model.classes
        self.top_k, self.max_batch, self.max_wait = min(top_k, len(self.classes)), max_batch, max_wait
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.batches = 0
        self.worker = threading.Thread(target=self._work, name="headstart-batcher", daemon=True)
        self.worker.start()

    def describe(self) -> dict[str, Any]:
        return {**self.model.describe(), "top_k": self.top_k, "max_batch": self.max_batch}

    def decode(self, data: bytes, name: str) -> torch.Tensor:
        """An upload's bytes -> uint8 (3, S, S) by the Classifier's decoder; BadInput."""
        if not data:
            raise BadInput(400, f"{name}: the file is empty")
        try:
            return self.model.decode(data)  # (the pixel limit of every command: data.open_image)
        except Image.DecompressionBombError as e:
            raise BadInput(413, f"{name}: the image is too large to decode ({e})") from None
        except Image.UnidentifiedImageError:
            raise BadInput(415, f"{name}: not an image (a JPEG, PNG, GIF, BMP, TIFF or WebP file)") from None
        except IMAGE_ERRORS as e:
            reason = "truncated" if "truncat" in str(e).lower() else f"cannot be decoded ({type(e).__name__}: {e})"
            raise BadInput(400, f"{name}: the image is {reason}") from None

    def submit(self, image: torch.Tensor) -> Future:
        job = _Job(image, Future())
        self.jobs.put(job)
        return job.done

    def _work(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            jobs = [first]
            deadline = time.perf_counter() + self.max_wait
            while len(jobs) < self.max_batch:
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)
                    break
                jobs.append(job)
            try:
                logits, familiarity = self.model.run(torch.stack([j.image for j in jobs]))  # uint8 (N, 3, S, S)
                answers = self.model.answers(logits, familiarity, top_k=self.top_k)
                self.batches += 1
                for j, a in zip(jobs, answers):
                    j.done.set_result((a, len(jobs)))
            except Exception as e:  # the model failed: every waiting request hears it
                for j in jobs:
                    if not j.done.done():
                        j.done.set_exception(e)

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=10)

    @staticmethod
    def answer(prediction: Prediction, name: str) -> dict[str, Any]:
        """An image's answer as JSON: top-k at the model's temperature; with an unknown-image test,
        its familiarity, and "unknown" as the label under the threshold."""
        top = [{"class": c, "probability": round(p, 6)} for c, p in prediction.top_k]
        out = {"file": name, "label": prediction.label, "probability": top[0]["probability"], "top_k": top}
        if prediction.familiarity is not None:
            out.update(unknown=prediction.unknown, familiarity=round(prediction.familiarity, 4))
        return out


def uploads(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each file of a request: a multipart form's file parts, or the raw body
    of one image. BadInput for what is not one of those."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
        if not message.is_multipart():  # (no part at all, or no boundary to find them by)
            raise BadInput(400, "no file in the form: send one or more images as file fields")
        # the file fields (a part with a file name, or one that says it is not text); plain text fields are
        # no files: left alone
        files = [(part.get_filename() or part.get_param("name", header="content-disposition") or f"file{i}",
                  part.get_payload(decode=True) or b"") for i, part in enumerate(message.iter_parts())
                 if part.get_filename() is not None or part.get_content_type() != "text/plain"]
        if not files:
            raise BadInput(400, "no file in the form: send one or more images as file fields")
        return files
    if kind.startswith("image/") or kind == "application/octet-stream":
        if not body:
            raise BadInput(400, "no file: the request body is empty")
        return [("upload", body)]
    raise BadInput(415, f"content type {kind or 'none'!r} is not read here: send multipart/form-data with image "
                        "files, or one image's bytes as image/* (e.g. image/jpeg)")


def make_app(predictor: Predictor, *, max_upload: int = MAX_UPLOAD):
    """The Starlette application around `predictor`."""
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status_code=status)

    async def read_body(request: Request) -> bytes:
        # An upload over the limit is still read (and dropped), up to DRAIN times the limit, before the
        # 413 goes out: a client that is still sending when the server closes gets a broken pipe, not
        # the answer (the "lingering close" of other servers).
        declared = request.headers.get("content-length")
        over = declared is not None and declared.isdigit() and int(declared) > max_upload
        chunks, size = [], 0
        if not over or int(declared or 0) <= DRAIN * max_upload:
            async for chunk in request.stream():
                size += len(chunk)
                if size > DRAIN * max_upload:
                    break
                if size <= max_upload:
                    chunks.append(chunk)
        if over:
            raise BadInput(413, f"the upload is {int(declared)} bytes, over the limit of {max_upload} (--max-upload)")
        if size > max_upload:
            raise BadInput(413, f"the upload is over the limit of {max_upload} bytes (--max-upload)")
        return b"".join(chunks)

    async def decode(data: bytes, name: str) -> torch.Tensor | BadInput:
        try:
            return await asyncio.to_thread(predictor.decode, data, name)
        except BadInput as e:
            return e

    async def predict(request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            files = uploads(request.headers.get("content-type", ""), await read_body(request))
        except BadInput as e:
            return error(e.status, str(e))
        except ClientDisconnect:
            return error(400, "the client went away before the upload ended")
        images = [await decode(data, name) for name, data in files]  # each file its answer, or its error
        good = [image for image in images if not isinstance(image, BadInput)]
        bad = [{"file": name, "error": str(e), "status": e.status}
               for (name, _), e in zip(files, images) if isinstance(e, BadInput)]
        if not good:  # nothing to predict: the first file's error is the request's
            return JSONResponse({"error": bad[0]["error"], "status": bad[0]["status"], "predictions": bad},
                                status_code=bad[0]["status"])
        try:
            results = iter(await asyncio.gather(*(asyncio.wrap_future(predictor.submit(image)) for image in good)))
        except Exception as e:  # noqa: BLE001  (the model failed: a 500, and the service goes on)
            log.exception("prediction failed")
            return error(500, f"the model failed: {type(e).__name__}: {e}")
        answers, batch = [], 0
        for (name, _), image in zip(files, images):
            if isinstance(image, BadInput):
                answers.append({"file": name, "error": str(image), "status": image.status})
            else:
                result, n = next(results)
                answers.append(predictor.answer(result, name))
                batch = max(batch, n)
        return JSONResponse({"predictions": answers, "seconds": round(time.perf_counter() - start, 4),
                             "batch": batch})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def model(request: Request) -> JSONResponse:
        return JSONResponse(predictor.describe())

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE.replace("__CLASSES__", json.dumps(len(predictor.classes))))

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health),
                             Route("/model", model), Route("/", page)])


def serve(checkpoint: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8000,
          max_upload: int = MAX_UPLOAD, on_ready: Callable[[str], None] | None = None, **predictor: Any) -> None:
    """Run the service until interrupted (Ctrl-C). Every option is checked, the model loaded and
    the port bound before `on_ready(url)` is called (the CLI then says where it serves)."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is not a TCP port: choose one from 1 to 65535 (0: any free one)")
    if max_upload < 1:
        raise ValueError(f"max_upload must be at least 1 byte, got {max_upload} (e.g. --max-upload 8MB)")
    p = Predictor(checkpoint, **predictor)
    try:
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as e:
            raise type(e)(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port (or "
                                   "--host)") from None
        with sock:
            bound = sock.getsockname()[1]
            if on_ready is not None:
                on_ready(f"http://{f'[{host}]' if ':' in host else host}:{bound}/")
            server = uvicorn.Server(uvicorn.Config(make_app(p, max_upload=max_upload), log_level="warning"))
            server.run(sockets=[sock])
    finally:
        p.close()


PAGE = Path(__file__).with_name("page.html").read_text(encoding="utf-8")  # plain HTML and a little JavaScript
