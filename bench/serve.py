"""`headstart serve` under load: dynamic batching against one image a batch.

    python bench/serve.py [--clients 16] [--requests 320] [--arch resnet50]

The ImageNet model (1000 classes) is served in this process by uvicorn on 127.0.0.1, on the engine
`predict` uses; `--clients` threads send hymenoptera's validation images (one JPEG per request, its
raw bytes) until `--requests` are answered. batched: up to 16 images a batch, with no waiting
(serve's default: what arrived while the last batch ran) and with 10 ms of waiting after the
first; unbatched: one image a batch. Then the same with a quarter of the requests malformed (every one
must get its 4xx, every good one its answer), and one client alone (a request at a time). Prints
throughput and p50/p95/p99 latency of each; last line serve_speedup=<batched / unbatched img/s>.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import socket
import threading
import time
import urllib.error
import urllib.request

from _common import HYMENOPTERA, cpu_line, machine, table

from headstart.data import list_images
from headstart.serve.app import MAX_WAIT, Predictor, make_app


class Server:
    def __init__(self, arch: str, *, max_batch: int, max_wait: float) -> None:
        import uvicorn

        self.predictor = Predictor("imagenet", arch=arch, max_batch=max_batch, max_wait=max_wait)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(make_app(self.predictor), host="127.0.0.1", port=self.port,
                                                    log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.predictor.close()


def load(port: int, bodies: list[bytes], clients: int, requests: int, *, bad_every: int = 0) -> dict:
    """Send `requests` requests from `clients` threads; latencies (s), statuses, wall time."""
    url = f"http://127.0.0.1:{port}/predict"

    def one(i: int) -> tuple[float, int, bool]:
        bad = bool(bad_every) and i % bad_every == bad_every - 1
        body = b"this is not an image" if bad else bodies[i % len(bodies)]
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "image/jpeg"})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            e.read()
            status = e.code
        return time.perf_counter() - t, status, bad

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    lat = sorted(r[0] for r in results)
    good = [r for r in results if not r[2]]
    return {"wall": wall, "img_s": len(good) / wall, "p50": lat[len(lat) // 2], "p95": lat[int(len(lat) * 0.95)],
            "p99": lat[int(len(lat) * 0.99)], "ok": sum(r[1] == 200 for r in good) == len(good),
            "bad_4xx": all(400 <= r[1] < 500 for r in results if r[2]), "n": len(results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--arch", default="resnet50")
    args = ap.parse_args()
    bodies = [p.read_bytes() for p in list_images(HYMENOPTERA / "val")]
    rows, speeds = [], {}
    configs = {f"batched (16, {ms:g} ms wait{', the default' if ms == MAX_WAIT * 1000 else ''})": (16, ms / 1000)
               for ms in sorted({0, 10, MAX_WAIT * 1000})}
    default = next(name for name in configs if "default" in name)
    configs["unbatched (1)"] = (1, 0.0)
    for name, (max_batch, max_wait) in configs.items():
        server = Server(args.arch, max_batch=max_batch, max_wait=max_wait)
        try:
            load(server.port, bodies, args.clients, 2 * args.clients)  # warm-up: conversion, compilation
            for label, kw in ((f"{args.clients} clients", {}), (f"{args.clients} clients, 1/4 malformed",
                                                                {"bad_every": 4})):
                r = load(server.port, bodies, args.clients, args.requests, **kw)
                rows.append([name, label, r["n"], f"{r['img_s']:.1f}", f"{r['p50'] * 1000:.0f}",
                             f"{r['p95'] * 1000:.0f}", f"{r['p99'] * 1000:.0f}",
                             "yes" if r["ok"] and r["bad_4xx"] else "NO"])
                speeds.setdefault(name, r["img_s"])
            r = load(server.port, bodies, 1, max(args.requests // 8, 20))
            rows.append([name, "1 client", r["n"], f"{r['img_s']:.1f}", f"{r['p50'] * 1000:.0f}",
                         f"{r['p95'] * 1000:.0f}", f"{r['p99'] * 1000:.0f}", "yes" if r["ok"] else "NO"])
            engine = server.predictor.model.backend
        finally:
            server.close()
    print(f"machine: {machine()}")
    print(cpu_line())
    print(f"model: {args.arch} ImageNet (1000 classes); engine: {engine}")
    print(table(rows, ["service", "load", "requests", "img/s", "p50 ms", "p95 ms", "p99 ms", "every answer right"]))
    print(f"serve_speedup={speeds[default] / speeds['unbatched (1)']:.2f}")


if __name__ == "__main__":
    main()
