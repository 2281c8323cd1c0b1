"""Synthetic click source with known structure, for demos, CI and quality tests.

Users are drawn from interest archetypes: archetype k clicks mostly ads of its primary
category, some of a secondary one and a little of everything (noise). Within a category
ads follow a power-law (Zipf) popularity. A tail of users has only 1-2 clicks. A share of
every category's ads is never clicked: these are the "new ads" that cold-start must serve.
Everything is drawn from one seeded generator, so equal parameters give equal clicks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adrec_assets.ml.types import AdCatalog, str_array
from adrec_assets.sources import AdReadReport, ClickReadReport, RawClicks
from adrec_assets.sources.catalog import LabelledCatalog, load_builtin_catalog
from adrec_assets.sources.files import click_files, read_clicks


@dataclass(frozen=True)
class SyntheticParams:
    n_users: int = 1000
    mean_clicks: float = 12.0  # mean clicks of a non-tail user
    tail_share: float = 0.15  # share of users with only 1-2 clicks
    primary_share: float = 0.75  # click share of the archetype's primary category
    secondary_share: float = 0.15  # ... of its secondary category; the rest is uniform noise
    popularity_exponent: float = 1.1  # Zipf exponent of ad popularity inside a category
    cold_ad_share: float = 0.2  # share of each category's ads that nobody clicks
    seed: int = 0

    def validate(self) -> None:
        if self.n_users < 2:
            raise ValueError(f"synthetic n_users must be >= 2, got {self.n_users}")
        if not 0 <= self.tail_share <= 1 or not 0 <= self.cold_ad_share < 1:
            raise ValueError("synthetic tail_share must be in [0, 1] and cold_ad_share in [0, 1)")
        if self.primary_share + self.secondary_share > 1 or min(self.primary_share, self.secondary_share) < 0:
            raise ValueError("synthetic primary_share + secondary_share must be within [0, 1]")
        if self.mean_clicks < 3:
            raise ValueError(f"synthetic mean_clicks must be >= 3, got {self.mean_clicks}")


@dataclass(frozen=True)
class SyntheticTruth:
    """Ground truth the generator used; for tests and evaluation only, never persisted."""

    categories: np.ndarray  # (n_categories,) str
    user_ids: np.ndarray  # (n_users,) raw ids
    user_archetype: np.ndarray  # (n_users,) int
    archetype_primary: np.ndarray  # (n_archetypes,) int index into categories
    archetype_secondary: np.ndarray  # (n_archetypes,) int
    cold_ad_ids: np.ndarray  # ads that received no clicks by design


class SyntheticClickGenerator:
    def __init__(self, labelled: LabelledCatalog, params: SyntheticParams = SyntheticParams()) -> None:
        params.validate()
        self.labelled = labelled
        self.params = params

    def generate(self) -> tuple[RawClicks, SyntheticTruth]:
        p = self.params
        rng = np.random.default_rng(p.seed)
        ad_ids = self.labelled.catalog.ad_ids
        categories, ad_cat = np.unique(self.labelled.categories, return_inverse=True)
        n_cat = len(categories)

        # Per category: choose the cold ads, then a Zipf popularity over the warm ones.
        cold = np.zeros(len(ad_ids), dtype=bool)
        warm_by_cat: list[np.ndarray] = []
        probs_by_cat: list[np.ndarray] = []
        for c in range(n_cat):
            members = np.flatnonzero(ad_cat == c)
            n_cold = int(round(p.cold_ad_share * len(members)))
            n_cold = min(n_cold, len(members) - 1)  # every category keeps a clickable ad
            cold[rng.choice(members, size=n_cold, replace=False)] = True
            warm = members[~cold[members]]
            ranks = rng.permutation(len(warm)) + 1
            weights = ranks.astype(np.float64) ** -p.popularity_exponent
            warm_by_cat.append(warm)
            probs_by_cat.append(weights / weights.sum())

        # Archetypes: one per category, each with a different secondary category.
        primary = np.arange(n_cat)
        secondary = (primary + 1 + rng.integers(0, n_cat - 1, size=n_cat)) % n_cat
        user_arch = rng.integers(0, n_cat, size=p.n_users)

        tail = rng.random(p.n_users) < p.tail_share
        body_clicks = 3 + rng.poisson(p.mean_clicks - 3, size=p.n_users)
        n_clicks = np.where(tail, rng.integers(1, 3, size=p.n_users), body_clicks)

        # Vectorized over all clicks: each click picks the user's primary category, the
        # secondary one, or a uniformly random one; then an ad of that category by popularity.
        users = np.repeat(np.arange(p.n_users), n_clicks)
        arch = user_arch[users]
        roll = rng.random(len(users))
        cats = np.where(
            roll < p.primary_share,
            primary[arch],
            np.where(
                roll < p.primary_share + p.secondary_share,
                secondary[arch],
                rng.integers(0, n_cat, size=len(users)),
            ),
        )
        ads = np.empty(len(users), dtype=np.int64)
        for c in range(n_cat):
            in_cat = np.flatnonzero(cats == c)
            ads[in_cat] = rng.choice(warm_by_cat[c], size=len(in_cat), p=probs_by_cat[c])

        raw_user_ids = str_array(f"user-{i:07d}" for i in range(p.n_users))
        clicks = RawClicks(
            user_vocab=raw_user_ids,
            user_codes=users.astype(np.int64),
            ad_vocab=ad_ids,
            ad_codes=ads,
            weights=np.ones(len(ads), dtype=np.float32),
        )
        truth = SyntheticTruth(
            categories=categories,
            user_ids=raw_user_ids,
            user_archetype=user_arch,
            archetype_primary=primary,
            archetype_secondary=secondary,
            cold_ad_ids=ad_ids[cold],
        )
        return clicks, truth


@dataclass(frozen=True)
class SyntheticSource:
    """The built-in source: the sample catalogue and seeded archetype clicks, plus the clicks
    the service served and wrote back into ``served_dir/clicks/`` (the loop works for the
    built-in source too: those clicks are pseudonymized, so they join as they are)."""

    params: SyntheticParams = SyntheticParams()
    name: str = "synthetic"
    served_dir: Path | None = None

    def read_ads(self) -> AdCatalog:
        return load_builtin_catalog().catalog

    def read_ads_with_report(self) -> tuple[AdCatalog, AdReadReport]:
        catalog = self.read_ads()
        return catalog, AdReadReport(n_ads=len(catalog))

    def read_clicks(self, ad_ids: np.ndarray) -> tuple[RawClicks, ClickReadReport]:
        labelled = load_builtin_catalog()
        if list(ad_ids) != labelled.catalog.ad_ids.tolist():
            raise ValueError("the synthetic source generates clicks for the built-in catalogue only")
        clicks, _truth = SyntheticClickGenerator(labelled, self.params).generate()
        report = ClickReadReport(n_files=0, n_rows=len(clicks))
        if self.served_dir is None or not click_files(self.served_dir):
            return clicks, report
        served, served_report = read_clicks(self.served_dir, np.asarray(ad_ids), self.name)
        report = ClickReadReport(
            n_files=served_report.n_files,
            n_rows=report.n_rows + served_report.n_rows,
            n_unknown_ad_rows=served_report.n_unknown_ad_rows,
            unknown_examples=served_report.unknown_examples,
        )
        return concat_clicks(clicks, served), report


def concat_clicks(first: RawClicks, second: RawClicks) -> RawClicks:
    """Both sets of clicks on one catalogue (``ad_vocab`` must be equal); users keep separate
    vocabulary entries (a raw id and a pseudonym never merge here)."""
    if list(first.ad_vocab) != list(second.ad_vocab):
        raise ValueError("concat_clicks: both click sets must be coded against the same catalogue")
    return RawClicks(
        user_vocab=np.concatenate([first.user_vocab, second.user_vocab]),
        user_codes=np.concatenate([first.user_codes, second.user_codes + len(first.user_vocab)]),
        ad_vocab=first.ad_vocab,
        ad_codes=np.concatenate([first.ad_codes, second.ad_codes]),
        weights=np.concatenate([first.weights, second.weights]).astype(np.float32),
        pseudonymized=np.concatenate([first.pseudonymized, second.pseudonymized]),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m adrec_assets.sources.synthetic OUT_DIR``: write the synthetic source in the
    folder format (atomically), so the file path is exercised with data of known structure."""
    import argparse
    from pathlib import Path

    from adrec_assets.sources.files import write_source

    parser = argparse.ArgumentParser(prog="python -m adrec_assets.sources.synthetic", description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-users", type=int, default=SyntheticParams.n_users)
    parser.add_argument("--seed", type=int, default=SyntheticParams.seed)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    args = parser.parse_args(argv)
    labelled = load_builtin_catalog()
    clicks, _ = SyntheticClickGenerator(labelled, SyntheticParams(n_users=args.n_users, seed=args.seed)).generate()
    try:
        write_source(args.out_dir, labelled.catalog, clicks, overwrite=args.overwrite)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(labelled.catalog)} ads and {len(clicks)} clicks to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
