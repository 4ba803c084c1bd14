"""`headstart serve CKPT`: a prediction service with a web page (`serve.serve`)."""

from __future__ import annotations

import argparse
from typing import Any

from headstart.cli.console import say
from headstart.cli.options import add_precision, add_reject, add_weights_file, model_file, parse_size


def add_serve(sub: Any, full: bool) -> None:
    """`headstart serve`'s parser."""
    p = sub.add_parser("serve", help="a prediction service with a web page: POST /predict, GET /model, /health, /",
                       description="Serve a model over HTTP: POST /predict with images (multipart or raw bytes) "
                                   "gives JSON with the top classes; GET / is a page to drop images on. Concurrent "
                                   "requests are batched together. Binds to 127.0.0.1 unless --host says otherwise: "
                                   "--host 0.0.0.0 lets every machine that reaches this one use the model (there is "
                                   "no authentication).")
    p.add_argument("checkpoint", nargs="?", help="a run's best.safetensors (or --weights)")
    add_weights_file(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument("--max-upload", type=parse_size, default="8MB", help="the most a request may send (default: 8MB)")
    p.add_argument("--top-k", type=int, default=5, help="default: 5")
    p.add_argument("--max-batch", type=int, default=16, help="images batched together at most (default: 16)")
    p.add_argument("--max-wait", type=float, default=0.0,
                   help="ms a batch waits for more images after its first (default: 0: it takes what arrived while "
                        "the last batch ran)")
    add_reject(p)
    add_precision(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    from headstart.serve.app import serve

    serve(model_file(a, a.checkpoint), host=a.host, port=a.port, max_upload=a.max_upload, arch=a.arch,
          classes=a.classes, top_k=a.top_k, max_batch=a.max_batch, max_wait=a.max_wait / 1000, precision=a.precision,
          reject=a.reject, on_ready=lambda url: say(f"serving on {url} (Ctrl-C stops it)", flush=True))
    return 0
