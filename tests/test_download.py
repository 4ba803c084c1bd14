"""The downloader and the URL weight source, against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch

from headstart.demo import fetch_canidae
from headstart.io.download import ChecksumError, download
from headstart.io.weights import UrlWeights, load_source
from headstart.models import create_model

PAYLOAD = bytes(range(256)) * 1000  # 256 kB


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        self.hits.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path.startswith("/cut/"):
            self.wfile.write(body[: len(body) // 3])  # the connection drops mid-transfer
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("H", (_Handler,), {"files": {}, "hits": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def test_good_download_with_progress(server, tmp_path: Path) -> None:
    url, handler = server
    handler.files["/f.bin"] = PAYLOAD
    seen = []
    out = download(f"{url}/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest(),
                   progress=lambda done, total: seen.append((done, total)))
    assert out.read_bytes() == PAYLOAD
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_wrong_checksum_keeps_no_file(server, tmp_path: Path) -> None:
    url, handler = server
    handler.files["/f.bin"] = PAYLOAD
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        download(f"{url}/f.bin", tmp_path / "f.bin", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_transfer_keeps_no_file(server, tmp_path: Path) -> None:
    url, handler = server
    handler.files["/cut/f.bin"] = PAYLOAD
    with pytest.raises(ConnectionError, match="interrupted"):
        download(f"{url}/cut/f.bin", tmp_path / "f.bin")
    assert list(tmp_path.iterdir()) == []


def test_missing_file_is_a_connection_error(server, tmp_path: Path) -> None:
    url, _ = server
    with pytest.raises(ConnectionError, match="404"):
        download(f"{url}/absent.bin", tmp_path / "f.bin")


def test_url_weights_are_verified_converted_and_cached(server, tmp_path: Path) -> None:
    url, handler = server
    torch.manual_seed(0)
    src = create_model("tiny", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "tiny-weights.pth")
    body = (tmp_path / "tiny-weights.pth").read_bytes()
    handler.files["/models/tiny-weights.pth"] = body
    source = UrlWeights(f"{url}/models/tiny-weights.pth", sha256=hashlib.sha256(body).hexdigest()[:8])
    first = load_source(source)
    assert source.cached_path().suffix == ".safetensors" and source.cached_path().exists()
    again = load_source(source)
    assert handler.hits == ["/models/tiny-weights.pth"]  # the second load converts and fetches nothing
    for k, v in src.state_dict().items():
        assert torch.equal(first.state_dict[k], v) and torch.equal(again.state_dict[k], v)


def test_demo_dataset_download_and_extract(server, tmp_path: Path) -> None:
    import zipfile

    from .conftest import make_dataset

    make_dataset(tmp_path / "src" / "data" / "Canidae", per_class={"train": 2, "val": 1},
                 classes={"dogs": (200, 150, 100), "wolves": (120, 120, 120)})
    archive = tmp_path / "Canidae_data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted((tmp_path / "src").rglob("*.png")):
            z.write(p, p.relative_to(tmp_path / "src").as_posix())
    url, handler = server
    handler.files["/Canidae_data.zip"] = archive.read_bytes()
    root = fetch_canidae(url=f"{url}/Canidae_data.zip")
    assert sorted(p.name for p in (root / "train").iterdir()) == ["dogs", "wolves"]
    assert fetch_canidae(url=f"{url}/Canidae_data.zip") == root
    assert handler.hits == ["/Canidae_data.zip"]


def test_a_ckpt_by_url_keeps_its_padding_and_two_urls_never_share_a_cache_entry(server, tmp_path: Path) -> None:
    """`--weights https://.../resnet50_224_new.ckpt`, as the MindSpore tutorial downloads it."""
    import numpy as np

    from headstart.io.formats.mindspore import encode_ckpt, torch_resnet_to_mindspore

    url, handler = server
    torch.manual_seed(0)
    nets = [create_model("resnet18", num_classes=2, padding="same") for _ in range(2)]
    for i, net in enumerate(nets):  # the same file name under two folders, different weights
        handler.files[f"/run{i}/best.ckpt"] = encode_ckpt({**torch_resnet_to_mindspore(net.state_dict()),
                                                           "global_step": np.int32(1)})
    for i, net in enumerate(nets):
        model = create_model("resnet18", num_classes=2, weights=f"{url}/run{i}/best.ckpt")
        assert model.arch_kwargs == {"padding": "same"}
        assert torch.equal(model.conv1.weight, net.conv1.weight)
    create_model("resnet18", weights=f"{url}/run0/best.ckpt")
    assert handler.hits == ["/run0/best.ckpt", "/run1/best.ckpt"]  # fetched and converted once each
