"""Training loops: the user space from co-clicks, and the content -> user-space projector.

Both are deterministic for a given seed: sampling uses a seeded numpy generator, weights
and dropout the torch RNG seeded inside ``torch.random.fork_rng`` with deterministic
kernels (the caller's global RNG state and settings are restored afterwards).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from adrec_assets.ml.fields import FieldEncoder
from adrec_assets.ml.linear import ridge_fit
from adrec_assets.ml.losses import centroid_mse, info_nce
from adrec_assets.ml.models import Projector
from adrec_assets.ml.params import ProjectorParams, UserTrainingParams
from adrec_assets.ml.sampling import AdClickerPairSampler, CoClickPairSampler, clicker_centroids
from adrec_assets.ml.types import ClickGraph

ProgressFn = Callable[[int, int, float], None]  # (epoch, planned epochs, mean loss)
Cells = Mapping[str, Sequence[str]]  # an ad field's name -> one cell per ad


@contextmanager
def seeded_and_deterministic(seed: int) -> Iterator[None]:
    """Seed torch, force deterministic kernels and flush denormals for the block.

    Without deterministic kernels the scatter-add in the embedding backward pass sums in
    thread order, and two identical runs differ in the 7th decimal. Without flushing,
    tiny gradients late in training become denormal floats and x86 CPUs process them
    much more slowly (benchmarks/README.md, "Denormal floats"). The RNG state
    and the deterministic flag are restored afterwards; denormal flushing is switched
    back off (torch has no getter for it).
    """
    previous = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_flush_denormal(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous)
            torch.set_flush_denormal(False)


class TrainingDataError(ValueError):
    """The click graph cannot support training (e.g. no co-click pair at all)."""


@dataclass
class TrainingHistory:
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    pairs: int = 0  # training pairs seen, for throughput
    seconds: float = 0.0

    def late_improvement(self) -> float:
        """Relative loss drop over the last 10% of epochs: near 0 means converged; a large
        value says more steps would still help (logged so under-training is visible)."""
        losses = self.epoch_losses
        if len(losses) < 2:
            return float("nan")
        earlier = losses[max(0, int(round(0.9 * len(losses))) - 1)]
        return (earlier - losses[-1]) / max(abs(earlier), 1e-12)

    def markdown(self, max_rows: int = 12) -> str:
        """Compact loss-curve table: first, last and evenly spaced epochs."""
        n = len(self.epoch_losses)
        if n == 0:
            return "_no training steps_"
        picks = sorted(set(np.linspace(0, n - 1, num=min(n, max_rows)).round().astype(int)))
        rows = "\n".join(f"| {i + 1} | {self.epoch_losses[i]:.4f} |" for i in picks)
        return f"| epoch | mean loss |\n|---:|---:|\n{rows}"


@dataclass
class UserTrainingResult:
    vectors: np.ndarray  # (n_users, dim) float32, unit rows, aligned with graph.user_ids
    isolated: np.ndarray  # (n_users,) bool: no co-click neighbour, vector = global mean
    history: TrainingHistory


def _check_common(batch_size: int, epochs: int, temperature: float, lr: float) -> None:
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (in-batch negatives), got {batch_size}")
    if epochs < 0 or temperature <= 0 or lr <= 0:
        raise ValueError(f"need epochs >= 0, temperature > 0, lr > 0; got {epochs}, {temperature}, {lr}")


def steps_per_epoch(n_pairs: int, batch_size: int) -> int:
    """Optimizer steps of one pass over ``n_pairs`` (at least 1)."""
    return max(1, -(-n_pairs // batch_size))


def planned_epochs(epochs: int, min_steps: int, n_pairs: int, batch_size: int) -> int:
    """``epochs``, raised until the run makes at least ``min_steps`` optimizer steps.

    A pass over a small click table is only a few dozen steps; what a contrastive model
    needs to converge is a number of updates, so tiny sources get more passes. Zero
    epochs stays zero (an explicit "do not train").
    """
    if epochs == 0:
        return 0
    return max(epochs, -(-min_steps // steps_per_epoch(n_pairs, batch_size)))


def planned_steps(
    epochs: int, min_steps: int, max_steps: int, n_pairs: int, batch_size: int, at_least_one_pass: bool
) -> int:
    """Optimizer steps of a full training: :func:`planned_epochs`' steps, capped at ``max_steps``
    (0: no cap) and, with ``at_least_one_pass``, never below one pass over the pairs.

    Why a cap: what a model needs is a number of updates, not of passes. On ml-latest-small
    (100k clicks) 2,300-3,900 steps matched the 7,800 of 20 + 10 passes (cold-start
    Recall@20, ``benchmarks/README.md``), while at 10M clicks 20 passes are 390k steps
    (hours). The projector is one MLP shared by all ads, so a step budget is its whole
    schedule; the user table has a row per user, which learns only when its user is in a
    batch, so it gets at least one pass however large the source.
    """
    one_pass = steps_per_epoch(n_pairs, batch_size)
    steps = planned_epochs(epochs, min_steps, n_pairs, batch_size) * one_pass
    if max_steps > 0:
        steps = min(steps, max(max_steps, one_pass if at_least_one_pass else 0))
    return steps


def refresh_steps(full_steps: int, refresh_epochs: int, epochs: int, n_pairs: int, batch_size: int) -> int:
    """Steps of a warm-start refresh: ``refresh_epochs`` passes, but at most the same share of
    the full schedule (``refresh_epochs / epochs`` of ``full_steps``), so that a refresh stays
    a fixed fraction of a full retrain when the step cap shortens the full one."""
    passes = refresh_epochs * steps_per_epoch(n_pairs, batch_size)
    return min(passes, -(-full_steps * refresh_epochs // max(epochs, 1)))


def fit_epochs(
    epochs: int,
    batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
    batch_loss: Callable[[np.ndarray, np.ndarray], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    progress: ProgressFn | None,
    max_steps: int | None = None,
) -> TrainingHistory:
    """The loop both trainers share: one optimizer step per batch, mean loss per epoch;
    ``max_steps`` ends the run after that many steps (the last epoch may be partial)."""
    history = TrainingHistory()
    started = time.perf_counter()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for left, right in batches():
            if max_steps is not None and history.steps >= max_steps:
                break
            loss = batch_loss(left, right)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach().item() * len(left)
            count += len(left)
            history.steps += 1
        if count == 0:
            break
        history.pairs += count
        history.epoch_losses.append(total / max(count, 1))
        if progress:
            progress(epoch + 1, epochs, history.epoch_losses[-1])
    history.seconds = time.perf_counter() - started
    return history


def _schedule(params: Any, n_pairs: int, refresh_epochs: int | None, at_least_one_pass: bool) -> tuple[int, int]:
    """(epochs to iterate, steps to run) of a full training or, with ``refresh_epochs``, a refresh."""
    full = planned_steps(
        params.epochs, params.min_steps, params.max_steps, n_pairs, params.batch_size, at_least_one_pass
    )
    steps = (
        full
        if refresh_epochs is None
        else refresh_steps(full, refresh_epochs, params.epochs, n_pairs, params.batch_size)
    )
    return -(-steps // steps_per_epoch(n_pairs, params.batch_size)), steps


def normalized_mean(vectors: np.ndarray) -> tuple[np.ndarray, float]:
    """Unit-length mean direction and the raw mean's norm (1 = all identical, ~0 = spread)."""
    mean = vectors.astype(np.float64).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-12:
        raise TrainingDataError("user vectors average to zero; the global mean direction is undefined")
    return (mean / norm).astype(np.float32), norm


def train_user_embeddings(
    graph: ClickGraph,
    params: UserTrainingParams,
    progress: ProgressFn | None = None,
    init: np.ndarray | None = None,
    epochs: int | None = None,
) -> UserTrainingResult:
    """InfoNCE over co-click pairs with in-batch negatives -> one unit vector per user.

    An epoch visits every click that has a co-clicker once as an anchor, so the number of
    optimizer steps grows with the clicks, not with the user count alone. The user table
    is a sparse embedding updated by SparseAdam: a step touches only the rows in its batch,
    so its cost does not grow with the number of users (a dense optimizer would rewrite
    all n_users x dim moments every step). Users with no co-click neighbour never get a
    gradient; rather than leave them at random noise they receive the normalized mean of
    the trained users (the same cold-start prior a new user gets) and are flagged in
    ``isolated``.

    The schedule is :func:`planned_steps` (passes raised to ``min_steps``, capped at
    ``max_steps`` but never below one pass). ``init`` (n_users, dim) replaces the random
    initialization (a warm start from the previous materialization) and ``epochs`` then
    makes it a refresh of that many passes, at most that share of the full schedule
    (:func:`refresh_steps`): the step floor is for a random start, not for refining a
    converged one.
    """
    _check_common(params.batch_size, params.epochs, params.temperature, params.lr)
    if init is not None and init.shape != (graph.n_users, params.dim):
        raise ValueError(f"init must be ({graph.n_users}, {params.dim}), got {init.shape}")
    rng = np.random.default_rng(params.seed)
    sampler = CoClickPairSampler(graph, rng)
    if sampler.n_anchors == 0:
        raise TrainingDataError(
            f"click graph has {graph.n_users} users and {graph.n_clicks} clicks but no ad with two "
            "or more clickers, so there is no co-click pair to learn a user space from; add clicks"
        )
    with seeded_and_deterministic(params.seed):
        start = (
            torch.randn(graph.n_users, params.dim) / params.dim**0.5
            if init is None
            else torch.from_numpy(np.array(init, dtype=np.float32))  # a copy: training writes in place
        )
        table = torch.nn.Embedding.from_pretrained(start, freeze=False, sparse=True)
        opt = torch.optim.SparseAdam(list(table.parameters()), lr=params.lr)

        def batch_loss(anchors: np.ndarray, positives: np.ndarray) -> torch.Tensor:
            a, p = torch.from_numpy(anchors), torch.from_numpy(positives)
            left, right = table(a), table(p)
            loss = info_nce(left, right, params.temperature, a, p, shared_namespace=True)
            if params.weight_decay > 0:  # SparseAdam has no decoupled decay: L2 on the batch rows
                loss = loss + params.weight_decay * 0.5 * (left.pow(2).sum(-1) + right.pow(2).sum(-1)).mean()
            return loss

        n_epochs, steps = _schedule(params, sampler.n_anchors, epochs, at_least_one_pass=True)
        history = fit_epochs(n_epochs, lambda: sampler.epoch(params.batch_size), batch_loss, opt, progress, steps)
        vectors = torch.nn.functional.normalize(table.weight.detach(), dim=-1).numpy().astype(np.float32)
    isolated = sampler.isolated_users
    if isolated.any():
        vectors[isolated] = normalized_mean(vectors[~isolated])[0]
    return UserTrainingResult(vectors=vectors, isolated=isolated, history=history)


@dataclass
class ProjectorTrainingResult:
    model: Projector
    history: TrainingHistory
    n_trained_ads: int


def train_projector(
    graph: ClickGraph,
    ad_content: np.ndarray,
    user_vectors: np.ndarray,
    params: ProjectorParams,
    progress: ProgressFn | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
    epochs: int | None = None,
    fields: FieldEncoder = FieldEncoder(),
    field_cells: Cells | None = None,
) -> ProjectorTrainingResult:
    """Fit content -> user space on clicked ads.

    ``ad_content`` rows align with ``graph.ad_ids`` and ``user_vectors`` rows with
    ``graph.user_ids``; ``field_cells`` (name -> one cell per ``ad_content`` row) are the ads'
    structured fields, encoded by ``fields`` (:func:`~adrec_assets.ml.fields.fit_field_encoder`)
    and appended to the content, which the model keeps for new ads. Loss per batch of (ad, clicker) pairs = InfoNCE(projected ad, its
    clicker; other clickers in the batch are negatives) + ``centroid_weight`` x squared
    distance between the projected ad and the mean vector of all its clickers.

    The schedule is :func:`planned_steps` (passes raised to ``min_steps``, capped at
    ``max_steps``). ``init_state`` (a previous projector's state dict, same spec)
    warm-starts the weights and ``epochs`` then makes it a refresh of that many passes, at
    most that share of the full schedule (:func:`refresh_steps`); the popularity head is
    refitted in closed form either way.
    """
    _check_common(params.batch_size, params.epochs, params.temperature, params.lr)
    if len(ad_content) != graph.n_ads or len(user_vectors) != graph.n_users:
        raise ValueError(
            f"train_projector: ad_content has {len(ad_content)} rows for {graph.n_ads} graph ads and "
            f"user_vectors {len(user_vectors)} rows for {graph.n_users} graph users"
        )
    if graph.n_clicks < 2:
        raise TrainingDataError(f"need at least 2 clicks to train the projector, got {graph.n_clicks}")
    rng = np.random.default_rng(params.seed)
    sampler = AdClickerPairSampler(graph, rng)
    users = torch.from_numpy(np.ascontiguousarray(user_vectors, dtype=np.float32))
    centroids = torch.from_numpy(clicker_centroids(graph, user_vectors))
    with seeded_and_deterministic(params.seed):
        model = Projector(ad_content.shape[1], users.shape[1], params, fields)
        features = model.inputs(ad_content, field_cells)
        content = torch.from_numpy(features)
        if init_state is not None:
            model.load_state_dict(init_state)
        opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay, fused=True)
        model.train()

        def batch_loss(ads: np.ndarray, clickers: np.ndarray) -> torch.Tensor:
            a, u = torch.from_numpy(ads), torch.from_numpy(clickers)
            # Popular ads repeat within a batch: run the MLP once per distinct ad.
            distinct, inverse = torch.unique(a, return_inverse=True)
            projected = model(content[distinct])[inverse]
            loss = info_nce(projected, users[u], params.temperature, a, u)
            return loss + params.centroid_weight * centroid_mse(projected, centroids[a])

        n_epochs, steps = _schedule(params, graph.n_clicks, epochs, at_least_one_pass=False)
        history = fit_epochs(n_epochs, lambda: sampler.epoch(params.batch_size), batch_loss, opt, progress, steps)
    fit_popularity_head(model, graph, features, params.seed)
    model.eval()
    return ProjectorTrainingResult(model=model, history=history, n_trained_ads=int((graph.ad_degrees() > 0).sum()))


def fit_popularity_head(model: Projector, graph: ClickGraph, ad_content: np.ndarray, seed: int) -> None:
    """Ridge from the model's inputs (:meth:`Projector.inputs`) to the ad's standardized log(1 + number of clickers), over the
    clicked ads. The target is standardized, the prediction is not: where content explains
    little of popularity, predictions shrink towards 0 and the score bias stays small
    instead of being inflated into noise. Fewer than 10 clicked ads leave the head at zero."""
    degree = graph.ad_degrees()
    clicked = np.flatnonzero(degree > 0)
    target = np.log1p(degree[clicked]).astype(np.float64)
    if len(clicked) < 10 or target.std() < 1e-9:
        return
    target = (target - target.mean()) / target.std()
    x = np.asarray(ad_content[clicked], dtype=np.float64)
    weights = ridge_fit(x, target[:, None], np.random.default_rng([seed, 5]))
    with torch.no_grad():
        model.popularity.weight.copy_(torch.from_numpy(weights[:-1, 0]).float()[None, :])
        model.popularity.bias.fill_(float(weights[-1, 0]))


def _input_chunks(
    model: Projector, content: np.ndarray, field_cells: Cells | None, batch_size: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, the model's inputs) per chunk of ``batch_size`` ads: content plus encoded
    fields, built once per chunk whatever is computed from them."""
    for begin in range(0, len(content), batch_size):
        end = begin + batch_size
        cells = {name: values[begin:end] for name, values in (field_cells or {}).items()}
        yield begin, torch.from_numpy(model.inputs(content[begin:end], cells))


@torch.inference_mode()
def project_with_bias(
    model: Projector, content: np.ndarray, field_cells: Cells | None = None, batch_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`project` and :func:`score_bias` in one pass over the ads: what ``ad_projected``
    and the service compute for every ad."""
    model.eval()
    vectors = np.empty((len(content), model.out_dim), dtype=np.float32)
    bias = np.empty(len(content), dtype=np.float32)
    for begin, features in _input_chunks(model, content, field_cells, batch_size):
        vectors[begin : begin + len(features)] = model(features).numpy()
        bias[begin : begin + len(features)] = model.score_bias(features).numpy()
    return vectors, bias


@torch.inference_mode()
def score_bias(
    model: Projector, content: np.ndarray, field_cells: Cells | None = None, batch_size: int = 4096
) -> np.ndarray:
    """``popularity_weight * popularity_z`` per ad, (n,) float32: added to the cosine."""
    model.eval()
    bias = np.empty(len(content), dtype=np.float32)
    for begin, features in _input_chunks(model, content, field_cells, batch_size):
        bias[begin : begin + len(features)] = model.score_bias(features).numpy()
    return bias


@torch.inference_mode()
def project(
    model: Projector, content: np.ndarray, field_cells: Cells | None = None, batch_size: int = 4096
) -> np.ndarray:
    """Map content vectors (and the ads' structured fields, one cell per row) into user
    space (eval mode: no dropout), (n, out_dim) unit rows."""
    model.eval()
    out = np.empty((len(content), model.out_dim), dtype=np.float32)
    for begin, features in _input_chunks(model, content, field_cells, batch_size):
        out[begin : begin + len(features)] = model(features).numpy()
    return out
