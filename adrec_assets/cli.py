"""Operator commands around the pipeline.

    python -m adrec_assets.cli register [SOURCE ...]   # add partitions (default: built-ins + source folders)
    python -m adrec_assets.cli summary SOURCE          # counts, shapes, timings, artifact paths
    python -m adrec_assets.cli pseudonym USER_ID ...   # a user's row id, for key holders
    python -m adrec_assets.cli recommend SOURCE USER_ID [-k 10]  # top ads (new users: global mean)

``register`` and ``summary`` use the Dagster instance in ``$DAGSTER_HOME``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from adrec_assets.ml.pseudonyms import pseudonymize, resolve_key
from adrec_assets.partitions import BUILTIN_SOURCES, click_source_partitions

ASSET_ORDER = ("raw_ads", "click_graph", "ad_embeddings_raw", "user_embeddings", "global_mean", "projector", "ad_projected")


def register(sources: list[str]) -> None:
    import dagster as dg

    from adrec_assets.resources import ClickSourceResource
    from adrec_assets.sources.files import list_sources

    instance = dg.DagsterInstance.get()
    name = click_source_partitions.name
    existing = set(instance.get_dynamic_partitions(name))
    if not sources:
        sources = [*BUILTIN_SOURCES, *list_sources(ClickSourceResource().sources_root())]
    new = [s for s in dict.fromkeys(sources) if s not in existing]
    if new:
        instance.add_dynamic_partitions(name, new)
    print(f"click sources registered in {instance.root_directory}: {sorted(existing | set(new))}")


def _describe(path) -> str:
    from adrec_assets.io_managers import load_artifact_file

    artifact = load_artifact_file(path)
    if hasattr(artifact, "model"):
        n_params = sum(p.numel() for p in artifact.model.parameters())
        return f"projector {artifact.model.spec.to_dict()} params={n_params}"
    if hasattr(artifact, "vectors"):
        norms = np.linalg.norm(artifact.vectors, axis=1)
        return f"vectors {artifact.vectors.shape} norms {norms.min():.5f}..{norms.max():.5f}"
    if hasattr(artifact, "vector"):
        return f"vector ({len(artifact.vector)},) norm {np.linalg.norm(artifact.vector):.5f}"
    if hasattr(artifact, "indptr"):
        return f"{artifact.n_users} users x {artifact.n_ads} ads, {artifact.n_clicks} user-ad pairs"
    return f"{len(artifact)} ads"


def summary(source: str) -> int:
    import dagster as dg

    from adrec_assets.io_managers import resolve_base_dir

    instance = dg.DagsterInstance.get()
    base = resolve_base_dir(None)
    print(f"source {source!r}; artifacts under {base}")
    missing = 0
    for asset in ASSET_ORDER:
        candidates = [base / asset / f"{source}{ext}" for ext in (".npz", ".pt")]
        path = next((p for p in candidates if p.exists()), None)
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        seconds = ""
        if event and event.asset_materialization and event.asset_materialization.partition == source:
            meta = event.asset_materialization.metadata
            for key in ("encode_seconds", "train_seconds", "build_seconds", "project_seconds"):
                if key in meta:
                    seconds = f" [{key} {meta[key].value}]"
        if path is None:
            missing += 1
            print(f"  {asset:18s} MISSING")
            continue
        print(f"  {asset:18s} {_describe(path)}{seconds}\n  {'':18s} {path}")
    return 1 if missing else 0


def recommend(source: str, raw_user_id: str, k: int) -> int:
    from adrec_assets.io_managers import resolve_base_dir
    from adrec_assets.ml.scoring import top_k_ads, user_vector

    base = resolve_base_dir(None)
    load = _load_artifact
    users = load(base / "user_embeddings" / f"{source}.npz")
    prior = load(base / "global_mean" / f"{source}.npz")
    ads = load(base / "ad_projected" / f"{source}.npz")
    vector, known = user_vector(users, prior, pseudonymize(raw_user_id, resolve_key()))
    print(f"user {raw_user_id}: {'trained vector' if known else 'unknown -> global_mean prior'}")
    for ad_id, score in top_k_ads(vector, ads, users.space, k):
        print(f"  {score:+.4f}  {ad_id}")
    return 0


def _load_artifact(path):
    from adrec_assets.io_managers import load_artifact_file

    try:
        return load_artifact_file(path)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adrec_assets.cli", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_reg = sub.add_parser("register", help="add click-source partitions to the Dagster instance")
    p_reg.add_argument("sources", nargs="*")
    p_sum = sub.add_parser("summary", help="print what a materialization produced")
    p_sum.add_argument("source")
    p_ps = sub.add_parser("pseudonym", help="print user pseudonyms under $ADREC_ID_KEY")
    p_ps.add_argument("user_ids", nargs="+")
    p_rec = sub.add_parser("recommend", help="top ads for a user by cos(user, projected ad)")
    p_rec.add_argument("source")
    p_rec.add_argument("user_id")
    p_rec.add_argument("-k", type=int, default=10)
    args = parser.parse_args(argv)
    if args.command == "register":
        register(args.sources)
        return 0
    if args.command == "summary":
        return summary(args.source)
    if args.command == "recommend":
        return recommend(args.source, args.user_id, args.k)
    key = resolve_key()
    for user_id in args.user_ids:
        print(f"{user_id}\t{pseudonymize(user_id, key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
