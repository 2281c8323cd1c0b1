"""Where one training step's time goes, phase by phase, at a given scale.

Builds a power-law click graph (``--users`` users with ``--clicks-per-user`` clicks each over
``--ads`` ads, Zipf(1) popularity; random content), then runs ``--steps`` optimizer steps of
each model with the trainers' own pieces -- the samplers, ``info_nce`` with duplicate masks,
SparseAdam over a sparse user table, the projector MLP with fused AdamW -- and prints the
mean milliseconds per step spent sampling, in the forward pass, the backward pass and the
optimizer step. It complements ``scale.py`` (whole assets) with the inside of a step.

    .venv/bin/python benchmarks/step_profile.py --users 1000000 --ads 100000 --steps 400
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from adrec_assets.ml.losses import centroid_mse, info_nce
from adrec_assets.ml.models import Projector
from adrec_assets.ml.params import ProjectorParams, UserTrainingParams
from adrec_assets.ml.sampling import AdClickerPairSampler, CoClickPairSampler, clicker_centroids
from adrec_assets.ml.types import ClickGraph


def power_law_graph(n_users: int, n_ads: int, per_user: int, seed: int) -> ClickGraph:
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_ads + 1)
    codes = rng.choice(n_ads, size=n_users * per_user, p=popularity / popularity.sum())
    return ClickGraph.from_codes(
        np.array([f"{i:032x}" for i in range(n_users)]), np.repeat(np.arange(n_users), per_user),
        np.array([f"ad{i}" for i in range(n_ads)]), codes,
    )  # fmt: skip


def phases(
    name: str,
    batches: Iterator[tuple[np.ndarray, np.ndarray]],
    loss_of: Callable[[np.ndarray, np.ndarray], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
) -> None:
    spent = {"sampling": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for _ in range(steps):
        t0 = time.perf_counter()
        left, right = next(batches)
        t1 = time.perf_counter()
        loss = loss_of(left, right)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        loss.item()
        t4 = time.perf_counter()
        for key, seconds in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            spent[key] += seconds
    total = sum(spent.values())
    print(f"{name}: {1e3 * total / steps:.2f} ms/step = "
          + ", ".join(f"{k} {1e3 * v / steps:.2f}" for k, v in spent.items()), flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--ads", type=int, default=100_000)
    parser.add_argument("--clicks-per-user", type=int, default=10)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    graph = power_law_graph(args.users, args.ads, args.clicks_per_user, args.seed)
    print(f"graph: {graph.n_users:,} users, {graph.n_clicks:,} clicks, {graph.n_ads:,} ads; "
          f"{args.steps} steps per model, {args.threads} threads", flush=True)  # fmt: skip

    up = UserTrainingParams()
    pairs = CoClickPairSampler(graph, np.random.default_rng(args.seed + 1))
    table = torch.nn.Embedding.from_pretrained(
        torch.randn(graph.n_users, up.dim) / up.dim**0.5, freeze=False, sparse=True
    )
    user_opt = torch.optim.SparseAdam(list(table.parameters()), lr=up.lr)

    def user_loss(anchors: np.ndarray, positives: np.ndarray) -> torch.Tensor:
        a, p = torch.from_numpy(anchors), torch.from_numpy(positives)
        return info_nce(table(a), table(p), up.temperature, a, p, shared_namespace=True)

    phases(
        f"user_embeddings (batch {up.batch_size}, SparseAdam)",
        pairs.epoch(up.batch_size),
        user_loss,
        user_opt,
        args.steps,
    )

    pp = ProjectorParams()
    content = torch.nn.functional.normalize(torch.randn(graph.n_ads, 768), dim=-1)
    users = torch.nn.functional.normalize(table.weight.detach(), dim=-1)
    started = time.perf_counter()
    centroids = torch.from_numpy(clicker_centroids(graph, users.numpy()))
    print(f"clicker_centroids: {time.perf_counter() - started:.1f} s (once per run)", flush=True)
    model = Projector(768, up.dim, pp)
    proj_opt = torch.optim.AdamW(model.parameters(), lr=pp.lr, weight_decay=pp.weight_decay, fused=True)
    ad_pairs = AdClickerPairSampler(graph, np.random.default_rng(args.seed + 2))

    def projector_loss(ads: np.ndarray, clickers: np.ndarray) -> torch.Tensor:
        a, u = torch.from_numpy(ads), torch.from_numpy(clickers)
        distinct, inverse = torch.unique(a, return_inverse=True)
        projected = model(content[distinct])[inverse]
        return info_nce(projected, users[u], pp.temperature, a, u) + pp.centroid_weight * centroid_mse(
            projected, centroids[a]
        )

    phases(
        f"projector (batch {pp.batch_size}, AdamW)", ad_pairs.epoch(pp.batch_size), projector_loss, proj_opt, args.steps
    )


if __name__ == "__main__":
    main()
