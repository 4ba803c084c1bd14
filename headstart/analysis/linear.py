"""A linear head fitted to convergence on cached features: multinomial logistic regression with an
L2 penalty, solved by L-BFGS, the penalty chosen by k-fold cross-validation on the training rows.

A convex problem: one optimum, whatever the start, reached in a few hundred L-BFGS iterations
(hymenoptera's 245 x 2048 ResNet50 features: well under a second per fit here). Where the tutorial
trains the head for 10 SGD epochs and may stop far from that optimum, this is the baseline the
`gradual` and `auto` strategies start from.

    loss(W, b) = mean_i w_{y_i} * CE(W z_i + b, y_i) / mean_i w_{y_i} + l2 / 2 * |W|^2,  z = (x - mu) / sigma

The features are standardised (mean 0, variance 1 per dimension, over the training rows) so that
one penalty grid suits every backbone; the fitted head is mapped back to raw features.

The last few fits are kept in memory by a digest of their inputs (`remembered`): the label check at
the end of an auto or gradual run (with the default --seed 0) asks for the very fit its epoch 0
made, from the same features and labels, and the run of the backbone `--arch auto` chose asks for
the fit that chose it; each is read back, not solved again (ResNet50 on flowers12's 720 images: 26
L-BFGS solves, about 5 s here).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, TypeVar

import torch
import torch.nn.functional as F

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # tried from the strongest down, each fit warm-started by the last
FOLDS = 5


@dataclass
class HeadFit:
    weight: torch.Tensor  # float32 (C, F), for raw features
    bias: torch.Tensor  # float32 (C,)
    l2: float  # the penalty chosen
    cv_loss: dict[float, float] = field(default_factory=dict)  # penalty -> mean held-out cross-entropy
    train_loss: float = 0.0  # mean cross-entropy on all training rows, at the chosen penalty
    train_acc: float = 0.0
    seconds: float = 0.0


def solve_head(z: torch.Tensor, y: torch.Tensor, classes: int, l2: float, weight: torch.Tensor | None,
           start: tuple[torch.Tensor, torch.Tensor] | None, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    W = (start[0].clone() if start else torch.zeros(classes, z.shape[1], dtype=z.dtype)).requires_grad_()
    b = (start[1].clone() if start else torch.zeros(classes, dtype=z.dtype)).requires_grad_()
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ W.T + b, y, weight=weight) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def fold_of_each_row(labels: torch.Tensor, groups: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """A fold per row: stratified by class, and every row of a group (the views of one image) in the
    same fold, so that no image is both fitted and held out."""
    g = torch.Generator().manual_seed(seed)
    fold_of_group: dict[int, int] = {}
    for c in labels.unique().tolist():
        members = groups[labels == c].unique()
        for rank, k in enumerate(members[torch.randperm(len(members), generator=g)].tolist()):
            fold_of_group[k] = rank % folds
    return torch.tensor([fold_of_group[int(k)] for k in groups])


T = TypeVar("T")
_REMEMBERED: "OrderedDict[str, Any]" = OrderedDict()  # digest of a computation's inputs -> its result
REMEMBER = 16  # results kept (each a head, or (N, C) probabilities: kilobytes to a few MB); --arch auto fits 9


def digest(*tensors: torch.Tensor | None, **params: Any) -> str:
    """A digest of tensors (their dtype, shape and bytes) and parameters: equal only for equal inputs."""
    h = hashlib.blake2b(digest_size=20)
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    h.update(repr(sorted(params.items())).encode())
    return h.hexdigest()


def remembered(key: str, compute: Callable[[], T], copy: Callable[[T], T]) -> T:
    """compute(), or the result of an earlier call with the same `key` (a `digest` of every input);
    the caller gets a copy (`copy`), so the one kept cannot be changed in place."""
    result = _REMEMBERED.get(key)
    if result is None:
        result = _REMEMBERED[key] = compute()
    _REMEMBERED.move_to_end(key)
    while len(_REMEMBERED) > REMEMBER:
        _REMEMBERED.popitem(last=False)
    return copy(result)


def fit_head(features: torch.Tensor, labels: torch.Tensor, classes: int, *, groups: torch.Tensor | None = None,
             class_weight: torch.Tensor | None = None, l2_grid: tuple[float, ...] = L2_GRID, folds: int = FOLDS,
             seed: int = 0, max_iter: int = 300) -> HeadFit:
    """Fit a linear head (C, F) to `features` (N, F) and `labels` (N,), the L2 penalty chosen by
    `folds`-fold cross-validation (rows with the same `groups` entry are held out together);
    `class_weight` (C,) weighs the loss. Deterministic for a given seed (on one machine): the same
    inputs again give the fit made before (`remembered`; its `seconds` are those of that solve)."""
    groups = groups if groups is not None else torch.arange(len(labels))
    key = digest(features, labels.long(), groups, class_weight, fit="head", classes=classes, l2_grid=tuple(l2_grid),
                 folds=folds, seed=seed, max_iter=max_iter)
    fit = remembered(key, lambda: _fit_head(features, labels, classes, groups, class_weight, l2_grid, folds, seed,
                                            max_iter),
                     lambda f: replace(f, weight=f.weight.clone(), bias=f.bias.clone(), cv_loss=dict(f.cv_loss)))
    return fit


def _fit_head(features: torch.Tensor, labels: torch.Tensor, classes: int, groups: torch.Tensor,
              class_weight: torch.Tensor | None, l2_grid: tuple[float, ...], folds: int, seed: int,
              max_iter: int) -> HeadFit:
    start = time.perf_counter()
    x = features.double()
    y = labels.long()
    weight = class_weight.double() if class_weight is not None else None
    fold = fold_of_each_row(y, groups, folds, seed) if len(l2_grid) > 1 else torch.zeros(len(y), dtype=torch.long)
    cv: dict[float, float] = {}
    if len(l2_grid) > 1 and len(y.unique()) > 1:
        for k in range(folds):
            train, held = fold != k, fold == k
            if not held.any() or len(y[train].unique()) < 2:
                continue
            mu, sigma = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
            z, zh = (x[train] - mu) / sigma, (x[held] - mu) / sigma
            solution = None
            for l2 in sorted(l2_grid, reverse=True):  # strongest first: each warm-starts the next
                solution = solve_head(z, y[train], classes, l2, weight, solution, max_iter)
                held_loss = float(F.cross_entropy(zh @ solution[0].T + solution[1], y[held], weight=weight))
                cv[l2] = cv.get(l2, 0.0) + held_loss / folds
    chosen = min(cv, key=lambda l2: (cv[l2], -l2)) if cv else l2_grid[len(l2_grid) // 2]
    mu, sigma = x.mean(0), x.std(0).clamp(min=1e-6) if len(x) > 1 else torch.ones(x.shape[1], dtype=x.dtype)
    W, b = solve_head((x - mu) / sigma, y, classes, chosen, weight, None, max_iter)
    W_raw, b_raw = W / sigma, b - (W / sigma) @ mu  # W z + b = (W / sigma) x + (b - W mu / sigma)
    logits = x @ W_raw.T + b_raw
    return HeadFit(W_raw.float(), b_raw.float(), chosen, cv, float(F.cross_entropy(logits, y)),
                   float((logits.argmax(1) == y).double().mean()), time.perf_counter() - start)
