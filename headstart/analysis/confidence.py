"""How far a trained model's answers can be trusted: calibrated probabilities and "none of these".

Both are fitted on the validation split after training (training/run.py) and travel in the checkpoint
(its metadata, and the training images' features as the tensor `limits.reference`); prediction,
evaluation, the service and exports apply them. Pure tensor math: no files, no networks.

- Temperature scaling: one scalar T > 0 that divides every logit, chosen to minimise the
  validation cross-entropy. The ranking of the classes, hence accuracy, is unchanged; only the
  probabilities move (T > 1: less confident). Judged by the expected calibration error (ECE,
  15 equal-width bins of the top probability).
- Unknown images: two signs that an image is unlike the training data, each turned into a
  p-value against the validation images (the share of them that score lower):
    similarity: cosine similarity of the image's pooled features to its nearest training image
    energy:     T * logsumexp(logits / T), high where some class answers strongly
  Their product, turned into a p-value against the validation images the same way, is the
  image's `familiarity` in [0, 1]: the share of validation images that look less familiar than it.
  An image is `unknown` below a threshold; familiarity 0.05 rejects about 5% of the validation
  images (the false-rejection rate), whatever the model. Costs: one (Q, F) x (F, R) product.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

BINS = 15  # the ECE's bins of the top probability, equal width over [0, 1]
FALSE_REJECTION = 0.05  # the default share of validation images that `reject="auto"` calls unknown
REFERENCE = "limits.reference"  # the checkpoint tensor: (R, F) training features, unit length, float16
MIN_VALIDATION = 20  # fewer: a familiarity of 0.05 is under the lowest validation image, no test is fitted
HALVINGS = 20  # random halvings of the validation images that the held-out ECE averages
REFERENCE_IMAGES = 4096  # at most this many training images are kept for the nearest-neighbour test


# ---------------------------------------------------------------------------------------------
# Calibration.

def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises mean cross-entropy of `logits / T` (N, C) against `labels` (N,):
    a 1-D convex problem in log T, solved by L-BFGS (milliseconds), kept in [0.05, 20].

    1.0 where the images cannot tell: fewer than 2, or none misclassified (the cross-entropy then
    falls without end as T -> 0: a validation split without errors says nothing of how sure the
    model should be)."""
    if len(labels) < 2 or bool((logits.argmax(1) == labels).all()):
        return 1.0
    x, y = logits.double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, 0.05), 20.0) if math.isfinite(t) else 1.0


@dataclass
class Bin:
    low: float
    high: float
    count: int
    confidence: float  # mean top probability of the bin's images
    accuracy: float  # share of them whose top class is right


def reliability(probabilities: torch.Tensor, labels: torch.Tensor, *, bins: int = BINS) -> list[Bin]:
    """The reliability diagram's bins: images by their top probability, each bin's mean
    confidence against its accuracy (a calibrated model has them equal)."""
    top, pred = probabilities.float().max(1)
    right = (pred == labels).float()
    where = (top * bins).long().clamp(max=bins - 1)
    out = []
    for b in range(bins):
        inside = where == b
        n = int(inside.sum())
        out.append(Bin(b / bins, (b + 1) / bins, n, float(top[inside].mean()) if n else 0.0,
                       float(right[inside].mean()) if n else 0.0))
    return out


def calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, *, bins: int = BINS) -> float:
    """Expected calibration error: sum over bins of |accuracy - confidence| weighted by the bin's
    share of the images (0 is perfect; nan for no images)."""
    n = len(labels)
    if n == 0:
        return float("nan")
    return sum(b.count / n * abs(b.accuracy - b.confidence) for b in reliability(probabilities, labels, bins=bins))


def held_out_calibration_error(logits: torch.Tensor, labels: torch.Tensor, *, repeats: int = HALVINGS,
                               seed: int = 0, bins: int = BINS) -> float:
    """The ECE of temperature scaling on images its T was not fitted on: the images are split in
    two halves at random (stratified by class), T is fitted on each half and applied to the other,
    and the ECE of those out-of-half probabilities is averaged over `repeats` splits (seeded).
    Where the in-sample ECE (T fitted and judged on the same images) flatters, this is what new
    images would see, with T fitted on half as many. nan below 4 images."""
    n = len(labels)
    if n < 4:
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    errors = []
    for _ in range(repeats):
        half = torch.zeros(n, dtype=torch.bool)
        for c in labels.unique():
            members = (labels == c).nonzero().flatten()
            half[members[torch.randperm(len(members), generator=g)][: len(members) // 2]] = True
        probs = torch.empty(logits.shape, dtype=torch.float32)
        for fit, judged in ((half, ~half), (~half, half)):
            probs[judged] = (logits[judged].float() / fit_temperature(logits[fit], labels[fit])).softmax(1)
        errors.append(calibration_error(probs, labels, bins=bins))
    return sum(errors) / len(errors)


@dataclass
class Calibration:
    temperature: float  # what to apply: `fitted`, where it lowered the held-out ECE; else 1
    fitted: float  # fit_temperature on every image
    ece_before: float  # at T = 1
    ece_after: float  # at `fitted`, on the images it was fitted on (in-sample)
    ece_held_out: float  # held_out_calibration_error: at T fitted on the other half of the images


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> Calibration:
    """Temperature scaling, kept only where it calibrates images it was not fitted on: T fitted on one
    half of the images must lower the other half's ECE (held out) below the ECE with no T at all;
    else T = 1 (a converged head is often calibrated already, and a T fitted on its few errors then
    makes new images' probabilities worse)."""
    fitted = fit_temperature(logits, labels)
    before = calibration_error(logits.float().softmax(1), labels)
    held_out = held_out_calibration_error(logits, labels)
    return Calibration(fitted if held_out < before else 1.0, fitted, before,  # (nan, under 4 images: not kept)
                       calibration_error((logits.float() / fitted).softmax(1), labels), held_out)


# ---------------------------------------------------------------------------------------------
# Unknown images.

def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N,) T * logsumexp(logits / T): high where the model answers strongly."""
    return temperature * torch.logsumexp(logits.float() / temperature, dim=1)


def nearest_similarity(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(N,) cosine similarity of each row of `features` (N, F) to its nearest row of `reference`
    (R, F, unit length)."""
    if len(reference) == 0 or len(features) == 0:
        return torch.zeros(len(features))
    return (F.normalize(features.float(), dim=1) @ reference.float().T).max(1).values


def _p_value(sorted_reference: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(1 + the number of `sorted_reference` (ascending, float64) at or below each score) / (n + 1);
    below the lowest, 1 / (n + 1) times a normal tail (the reference's mean and spread) relative to
    the lowest, so that an image far below every validation image counts as far below them."""
    n = len(sorted_reference)
    below = torch.searchsorted(sorted_reference.contiguous(), scores.contiguous(), right=True)
    p = torch.where(scores.isnan(), 0.0, (below.double() + 1) / (n + 1))
    if n > 1:
        mean, spread = sorted_reference.mean(), sorted_reference.std().clamp(min=1e-12)
        tail = torch.special.log_ndtr((scores - mean) / spread) - torch.special.log_ndtr((sorted_reference[0] - mean) / spread)
        p = torch.where(below == 0, tail.clamp(max=0).exp() / (n + 1), p)
    return p


@dataclass
class Rejection:
    """What `familiarity` needs besides the training features: the validation images' scores."""

    similarity: list[float]  # ascending: each validation image's nearest_similarity
    energy: list[float]  # ascending: each validation image's energy (at the model's temperature)
    combined: list[float]  # ascending: the product of the two p-values, per validation image
    threshold: float  # the familiarity below which `reject="auto"` says unknown
    false_rejection: float  # the share of validation images under the threshold (as measured)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Rejection":
        return cls(**{k: d[k] for k in ("similarity", "energy", "combined", "threshold", "false_rejection")})

    def familiarity(self, similarity: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """(N,) float64: the share of validation images less familiar than each image (see the module's text)."""
        product = (_p_value(torch.tensor(self.similarity, dtype=torch.float64), similarity.double())
                   * _p_value(torch.tensor(self.energy, dtype=torch.float64), energies.double()))
        combined = torch.tensor(self.combined, dtype=torch.float64)
        below = torch.searchsorted(combined.contiguous(), product.contiguous(), right=False)
        return below.double().div(max(len(combined), 1))


def fit_rejection(similarity: torch.Tensor, energies: torch.Tensor, *,
                  false_rejection: float = FALSE_REJECTION) -> Rejection:
    """The validation images' scores (N,) each, kept sorted, and the threshold at `false_rejection`.
    Each image is ranked without itself (else new images of the same kind would be rejected more
    often: 6.3% for 5% with 153 images); `false_rejection` measured is the share of these images
    under the threshold as `familiarity` scores them. Needs MIN_VALIDATION images (ValueError)."""
    if len(similarity) < MIN_VALIDATION:
        raise ValueError(f"the unknown-image test needs at least {MIN_VALIDATION} validation images, got "
                         f"{len(similarity)}")
    if not 0 <= false_rejection < 1:
        raise ValueError(f"false_rejection must be in [0, 1), got {false_rejection}")
    s, e = similarity.double().sort().values, energies.double().sort().values
    n = len(s)

    def own(p: torch.Tensor) -> torch.Tensor:  # each image left out of its own rank, as a new image would be
        return (p - 1 / (n + 1)).clamp(min=1 / (n + 1))

    combined = (own(_p_value(s, similarity.double())) * own(_p_value(e, energies.double()))).sort().values
    out = Rejection(s.tolist(), e.tolist(), combined.tolist(), false_rejection, 0.0)
    out.false_rejection = float((out.familiarity(similarity, energies) < false_rejection).double().mean())
    return out


def checkpoint_temperature(meta: dict[str, Any]) -> float:
    """The temperature a checkpoint's metadata holds (1.0: one from before temperature scaling)."""
    return float((meta.get("calibration") or {}).get("temperature", 1.0))


def checkpoint_rejection(meta: dict[str, Any], extra: dict[str, torch.Tensor]) -> Rejection | None:
    """The unknown-image test a checkpoint holds (its metadata and its REFERENCE tensor), or None."""
    return Rejection.from_dict(meta["unknown"]) if "unknown" in meta and REFERENCE in extra else None


def reference_features(features: torch.Tensor, *, limit: int = REFERENCE_IMAGES) -> torch.Tensor:
    """(R, F) float16 unit rows of `features` (N, F): all of them, or `limit` spread evenly."""
    if len(features) > limit:
        features = features[torch.linspace(0, len(features) - 1, limit).round().long()]
    return F.normalize(features.float(), dim=1).half()
