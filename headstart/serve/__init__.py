"""A prediction service: HTTP (starlette, uvicorn) in front of one `Classifier`, concurrent requests
batched together (app.py), and a page to drop images on (page.html)."""

from headstart.serve.app import Predictor, make_app, serve

__all__ = ["Predictor", "make_app", "serve"]
