"""Operator commands around the pipeline.

    python -m adrec_assets.cli register [SOURCE ...]   # add partitions (default: built-ins + source folders)
    python -m adrec_assets.cli summary SOURCE          # counts, shapes, timings, artifact paths
    python -m adrec_assets.cli pseudonym USER_ID ...   # a user's row id, for key holders
    python -m adrec_assets.cli recommend SOURCE USER_ID [-k 10]  # top ads (new users: global mean)
    python -m adrec_assets.cli rollback SOURCE         # back to the previous published snapshot
    python -m adrec_assets.cli gc SOURCE [--now]       # drop old snapshots and crash leftovers

``register`` and ``summary`` use the Dagster instance in ``$DAGSTER_HOME``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from adrec_assets.partitions import BUILTIN_SOURCES, click_source_partitions
from adrec_assets.privacy import pseudonymize, resolve_key
from adrec_assets.snapshots import PIPELINE_ARTIFACTS


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


def _describe(artifact: object) -> str:
    """One line per artifact type of a snapshot; an unknown type is named, never guessed at."""
    from adrec_assets.ml.models import TrainedProjector
    from adrec_assets.ml.types import AdCatalog, ClickGraph, GlobalMean
    from adrec_assets.online.index import IndexedAds
    from adrec_assets.online.position_bias import PositionBias
    from adrec_assets.online.posterior import PolicyPosterior

    if isinstance(artifact, TrainedProjector):
        n_params = sum(p.numel() for p in artifact.model.parameters())
        return f"projector {artifact.model.architecture()} params={n_params}"
    if isinstance(artifact, IndexedAds):
        index = artifact.index
        return f"{index.kind} index of {len(index)} ads, dim {index.dim}+1, recall@10 {artifact.recall_at_10:.4f}"
    if isinstance(artifact, PositionBias):
        theta = ", ".join(f"{t:.3f}" for t in artifact.theta)
        return f"theta [{theta}] ({artifact.method}, {int(artifact.impressions.sum())} impressions)"
    if isinstance(artifact, PolicyPosterior):
        return f"Thompson posterior from {artifact.n_impressions} impressions, {artifact.n_clicks} clicks"
    if isinstance(artifact, GlobalMean):
        return f"vector ({len(artifact.vector)},) norm {np.linalg.norm(artifact.vector):.5f}"
    if isinstance(artifact, ClickGraph):
        return f"{artifact.n_users} users x {artifact.n_ads} ads, {artifact.n_clicks} user-ad pairs"
    if isinstance(artifact, AdCatalog):
        return f"{len(artifact)} ads"
    if hasattr(artifact, "vectors"):  # content, user and projected vectors
        norms = np.linalg.norm(artifact.vectors, axis=1)
        return f"vectors {artifact.vectors.shape} norms {norms.min():.5f}..{norms.max():.5f}"
    return type(artifact).__name__


def summary(source: str) -> int:
    """The source's published snapshot, artifact by artifact, with the timings its latest
    materialization recorded."""
    import dagster as dg

    from adrec_assets.artifacts import resolve_root
    from adrec_assets.snapshots import SnapshotError, SnapshotStore

    store = SnapshotStore(str(resolve_root()), source)
    try:
        snapshot = store.current()
    except SnapshotError as exc:
        print(exc)
        return 1
    instance = dg.DagsterInstance.get()
    print(f"source {source!r}: snapshot {snapshot.id} (model version), published by run {snapshot.run_id}")
    print(f"  history (newest first): {', '.join(store.history())}")
    for asset in [a for a in PIPELINE_ARTIFACTS if a in snapshot.artifacts] + sorted(
        set(snapshot.artifacts) - set(PIPELINE_ARTIFACTS)
    ):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[source]), limit=1
        ).records
        meta = records[0].asset_materialization.metadata if records and records[0].asset_materialization else {}
        seconds = "".join(
            f" [{key} {meta[key].value}]"
            for key in ("encode_seconds", "train_seconds", "build_seconds", "project_seconds")
            if key in meta
        )
        path = store.path_of(asset, snapshot)
        print(f"  {asset:18s} {_describe(store.load(asset, snapshot))}{seconds}\n  {'':18s} {path}")
    return 0


def _snapshot_store(source: str):
    from adrec_assets.artifacts import resolve_root
    from adrec_assets.snapshots import SnapshotStore

    return SnapshotStore(str(resolve_root()), source)


def rollback(source: str) -> int:
    from adrec_assets.snapshots import SnapshotError

    store = _snapshot_store(source)
    before = store.current_id()
    try:
        now = store.rollback()
    except SnapshotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"source {source!r}: rolled back from {before} to {now.id} (published by run {now.run_id})")
    return 0


def gc(source: str, now: bool) -> int:
    from adrec_assets.snapshots import DEFAULT_GC_GRACE_SECONDS

    report = _snapshot_store(source).gc(grace_seconds=0 if now else DEFAULT_GC_GRACE_SECONDS)
    print(
        f"source {source!r}: removed {report.snapshots_removed} snapshots, {report.objects_removed} objects, "
        f"{report.runs_removed} stale runs, {report.temp_files_removed} temp files"
    )
    return 0


def recommend(source: str, raw_user_id: str, k: int) -> int:
    from adrec_assets.artifacts import resolve_root
    from adrec_assets.privacy import key_fingerprint
    from adrec_assets.recommender import Recommender
    from adrec_assets.snapshots import SnapshotError

    try:
        recommender = Recommender.load(str(resolve_root()), source)
    except SnapshotError as exc:
        raise SystemExit(str(exc)) from None
    key = resolve_key()
    recorded = _snapshot_store(source).current().info.get("key_fingerprint", "")
    if recorded and recorded != key_fingerprint(key):
        raise SystemExit(
            f"ADREC_ID_KEY differs from the key source {source!r} was pseudonymized with (fingerprint "
            f"{key_fingerprint(key)} vs {recorded}): every user would look new. Use the pipeline's key."
        )
    pseudonym = pseudonymize(raw_user_id, key)
    known = recommender.user_vector(pseudonym)[1]
    print(f"user {raw_user_id}: {'trained vector' if known else 'unknown -> global_mean prior'} "
          f"(model version {recommender.version})")  # fmt: skip
    for item in recommender.recommend(pseudonym, k):
        print(f"  {item.score:+.4f}  {item.ad_id}")
    return 0


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
    p_rb = sub.add_parser("rollback", help="make the source's previous snapshot current again")
    p_rb.add_argument("source")
    p_gc = sub.add_parser("gc", help="remove old snapshots, unused objects and what crashed runs left behind")
    p_gc.add_argument("source")
    p_gc.add_argument("--now", action="store_true", help="no grace period (only when no run of the source is going)")
    args = parser.parse_args(argv)
    if args.command == "register":
        register(args.sources)
        return 0
    if args.command == "summary":
        return summary(args.source)
    if args.command == "recommend":
        return recommend(args.source, args.user_id, args.k)
    if args.command == "rollback":
        return rollback(args.source)
    if args.command == "gc":
        return gc(args.source, args.now)
    key = resolve_key()
    for user_id in args.user_ids:
        print(f"{user_id}\t{pseudonymize(user_id, key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
