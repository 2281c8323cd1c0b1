"""All-or-nothing publication of a source's artifacts: stage, publish, load, roll back (plain Python).

A pipeline run writes many artifacts; readers (the next run, the CLI, the evaluation, the
online service) must see all of one run's outputs or none of them. Each source keeps::

    <root>/<source>/objects/<sha256>.<ext>   artifact files, content-addressed (shared by snapshots)
    <root>/<source>/runs/<run_id>/<asset>.json   what a run in progress has staged
    <root>/<source>/runs/<run_id>/base.json      the snapshot that run reads its other inputs from
    <root>/<source>/snapshots/<id>.json      a manifest: asset -> object, plus provenance
    <root>/<source>/CURRENT                  the published snapshot id and the ones before it

A run stages each output (an object file, then a small staging record, both written
atomically) and reads its inputs from its own staged outputs, else from the snapshot that
was current when the run first read (``base.json``), so a run never mixes its outputs with
another run's. Publishing validates the new snapshot (every artifact loads and they fit
together), writes its manifest and atomically replaces ``CURRENT`` -- the one moment the new
state becomes visible -- and refuses (compare-and-swap) when another run published in the
meantime. A crash or ``kill -9`` at any point leaves ``CURRENT`` naming a complete snapshot;
what it leaves behind (staging folders, unreferenced objects, temp files) is removed by
:meth:`SnapshotStore.gc`. The snapshot id is a hash of its contents: it is the model version
the service reports, and publishing identical contents again changes nothing.

Roots are local folders (a shared volume in a cluster): publication relies on POSIX
``rename`` and ``flock``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adrec_assets.artifacts import extension_of, load_file, to_bytes
from adrec_assets.settings import KEEP_SNAPSHOTS
from adrec_assets.storage import atomic_write

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

#: Staging folders, objects and temp files younger than this may belong to a run in progress.
DEFAULT_GC_GRACE_SECONDS = 6 * 3600
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: The artifacts one pipeline run stages and publishes together, in lineage order.
PIPELINE_ARTIFACTS = (
    "raw_ads", "click_graph", "ad_embeddings_raw", "user_embeddings", "projector", "ad_projected", "served_users", "served_ads",
    "global_mean", "ad_index", "position_bias", "policy_posterior",
)  # fmt: skip
#: The offline training steps among them (the rest serve them online).
OFFLINE_ARTIFACTS = PIPELINE_ARTIFACTS[: PIPELINE_ARTIFACTS.index("global_mean") + 1]


class SnapshotError(RuntimeError):
    """No published snapshot, an inconsistent one, or a publication that lost a race."""


def _check_name(value: str, what: str) -> str:
    if not _SAFE_NAME.match(value or ""):
        raise SnapshotError(
            f"{what} {value!r} is not a safe name (letters, digits, '.', '_', '-'; at most 128 characters)"
        )
    return value


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    data = (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode()
    atomic_write(path, lambda handle: handle.write(data))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{path}: unreadable {what} ({exc}); restore it or roll back") from None


@dataclass(frozen=True)
class Snapshot:
    """One published state of a source: which object holds each asset, and where it came from."""

    id: str
    source: str
    artifacts: dict[str, str]  # asset -> object file name under objects/
    run_id: str
    parent: str | None
    published_at: float
    info: dict[str, str] = field(default_factory=dict)  # e.g. user_space, encoder_id, key_fingerprint

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "source": self.source, "artifacts": dict(sorted(self.artifacts.items())),
            "run_id": self.run_id, "parent": self.parent, "published_at": self.published_at, "info": self.info,
        }  # fmt: skip

    @classmethod
    def from_json(cls, payload: Mapping[str, Any], origin: str) -> Snapshot:
        try:
            return cls(
                str(payload["id"]), str(payload["source"]), {str(k): str(v) for k, v in payload["artifacts"].items()},
                str(payload["run_id"]), payload["parent"], float(payload["published_at"]),
                {str(k): str(v) for k, v in payload.get("info", {}).items()},
            )  # fmt: skip
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise SnapshotError(f"{origin}: malformed snapshot manifest ({exc}); roll back or re-materialize") from None


def snapshot_id(artifacts: Mapping[str, str]) -> str:
    """Content id: equal artifacts give the same id, any changed byte a different one."""
    digest = hashlib.sha256(json.dumps(dict(sorted(artifacts.items()))).encode()).hexdigest()
    return f"s-{digest[:16]}"


@dataclass
class GcReport:
    snapshots_removed: int = 0
    objects_removed: int = 0
    runs_removed: int = 0
    temp_files_removed: int = 0


class SnapshotStore:
    """The snapshots of one source under an artifacts root."""

    def __init__(self, root: str | os.PathLike[str], source: str) -> None:
        self.source = _check_name(source, "source")
        self.root = Path(os.fspath(root))
        self.folder = self.root / source
        self.objects = self.folder / "objects"
        self.manifests = self.folder / "snapshots"
        self.runs = self.folder / "runs"
        self.current_file = self.folder / "CURRENT"

    # ------------------------------------------------------------------ reading

    def _pointer(self) -> dict[str, Any] | None:
        try:
            return _read_json(self.current_file, "snapshot pointer")
        except FileNotFoundError:
            return None

    def current_id(self) -> str | None:
        pointer = self._pointer()
        return str(pointer["current"]) if pointer else None

    def history(self) -> list[str]:
        """Published snapshot ids, newest (current) first."""
        pointer = self._pointer()
        return [str(i) for i in pointer["history"]] if pointer else []

    def snapshot(self, snapshot_id: str) -> Snapshot:
        path = self.manifests / f"{_check_name(snapshot_id, 'snapshot id')}.json"
        try:
            return Snapshot.from_json(_read_json(path, "snapshot manifest"), str(path))
        except FileNotFoundError:
            raise SnapshotError(f"source {self.source!r}: snapshot {snapshot_id} has no manifest at {path}") from None

    def current(self) -> Snapshot:
        """The published snapshot; raises when the source was never published."""
        current = self.current_id()
        if current is None:
            raise SnapshotError(
                f"source {self.source!r} has no published snapshot under {self.root}: materialize its pipeline "
                f"first (make run SOURCE={self.source})"
            )
        return self.snapshot(current)

    def object_path(self, name: str) -> Path:
        return self.objects / name

    def path_of(self, asset: str, snapshot: Snapshot | None = None) -> Path:
        snapshot = snapshot or self.current()
        if asset not in snapshot.artifacts:
            raise SnapshotError(
                f"source {self.source!r}: snapshot {snapshot.id} has no {asset!r} (it holds {sorted(snapshot.artifacts)}); "
                "materialize the asset together with the snapshot"
            )
        return self.object_path(snapshot.artifacts[asset])

    def load(self, asset: str, snapshot: Snapshot | None = None) -> Any:
        """An artifact of the published (or the given) snapshot."""
        return load_file(self.path_of(asset, snapshot))

    # ------------------------------------------------------------------ a run

    def _run_dir(self, run_id: str) -> Path:
        return self.runs / _check_name(run_id, "run id")

    def _put_object(self, obj: Any) -> str:
        data = to_bytes(obj)
        name = f"{hashlib.sha256(data).hexdigest()[:32]}{extension_of(obj)}"
        path = self.object_path(name)
        if path.exists() and path.stat().st_size == len(data):
            os.utime(path)  # fresh again: gc's grace period protects it while the run goes on
        else:
            atomic_write(path, lambda handle: handle.write(data))
        return name

    def stage(self, run_id: str, asset: str, obj: Any) -> Path:
        """Store ``obj`` as this run's ``asset``; invisible to readers until :meth:`publish`."""
        _check_name(asset, "asset")
        name = self._put_object(obj)
        _write_json(self._run_dir(run_id) / f"{asset}.json", {"asset": asset, "object": name})
        return self.object_path(name)

    def staged(self, run_id: str) -> dict[str, str]:
        """asset -> object of everything ``run_id`` has staged so far."""
        folder = self._run_dir(run_id)
        if not folder.is_dir():
            return {}
        out = {}
        for path in sorted(folder.glob("*.json")):
            if path.name != "base.json":
                record = _read_json(path, "staging record")
                out[str(record["asset"])] = str(record["object"])
        return out

    def base_of(self, run_id: str) -> str | None:
        """The snapshot ``run_id`` reads its inputs from: the current one at its first read, then fixed."""
        path = self._run_dir(run_id) / "base.json"
        with contextlib.suppress(FileNotFoundError):
            return _read_json(path, "run base")["snapshot"]
        with self._locked():
            with contextlib.suppress(FileNotFoundError):
                return _read_json(path, "run base")["snapshot"]
            current = self.current_id()
            _write_json(path, {"snapshot": current})
            return current

    def load_for_run(self, run_id: str, asset: str) -> Any:
        """What ``run_id`` reads as ``asset``: its own staged output, else its base snapshot's."""
        staged = self.staged(run_id)
        if asset in staged:
            return load_file(self.object_path(staged[asset]))
        base = self.base_of(run_id)
        if base is None:
            raise SnapshotError(
                f"source {self.source!r}: {asset!r} is neither produced by this run nor published yet; "
                "materialize the whole pipeline for this source"
            )
        return self.load(asset, self.snapshot(base))

    def publish(
        self,
        run_id: str,
        validate: Callable[[Callable[[str], Any], list[str]], dict[str, str]] | None = None,
        keep: int | None = None,
    ) -> Snapshot:
        """Make everything ``run_id`` staged visible at once, on top of its base snapshot.

        ``validate(load, assets)`` checks the candidate (``load(asset)`` reads one of its
        artifacts) and returns provenance to record; it raises to refuse publication. The
        publication fails, leaving the current snapshot as it was, if another run published
        since this run's base (its inputs would be stale)."""
        staged = self.staged(run_id)
        if not staged:
            raise SnapshotError(f"source {self.source!r}: run {run_id} staged nothing to publish")
        base_id = self.base_of(run_id)
        base = self.snapshot(base_id) if base_id else None
        artifacts = {**(base.artifacts if base else {}), **staged}

        def load(asset: str) -> Any:
            if asset not in artifacts:
                raise SnapshotError(f"source {self.source!r}: the snapshot would have no {asset!r}")
            return load_file(self.object_path(artifacts[asset]))

        info = validate(load, sorted(artifacts)) if validate else {}
        new_id = snapshot_id(artifacts)
        with self._locked():
            current = self.current_id()
            if current != base_id:
                raise SnapshotError(
                    f"source {self.source!r}: another run published snapshot {current} while run {run_id} was working "
                    f"from {base_id}; nothing was published, re-run to build on the newer snapshot"
                )
            if current == new_id:
                snapshot = self.snapshot(new_id)
            else:
                snapshot = Snapshot(new_id, self.source, artifacts, run_id, current, time.time(), info)
                _write_json(self.manifests / f"{new_id}.json", snapshot.to_json())
                history = [new_id, *[i for i in self.history() if i != new_id]]
                _write_json(self.current_file, {"current": new_id, "history": history[: self._keep(keep)]})
            shutil.rmtree(self._run_dir(run_id), ignore_errors=True)
        return snapshot

    def rollback(self) -> Snapshot:
        """Make the previous snapshot current again (the current one is forgotten)."""
        with self._locked():
            history = self.history()
            if len(history) < 2:
                raise SnapshotError(
                    f"source {self.source!r}: no earlier snapshot to roll back to (history: {history or 'empty'})"
                )
            previous = self.snapshot(history[1])
            for asset, name in previous.artifacts.items():
                if not self.object_path(name).exists():
                    raise SnapshotError(
                        f"source {self.source!r}: snapshot {previous.id} lost its {asset} object {name}"
                    )
            _write_json(self.current_file, {"current": previous.id, "history": history[1:]})
        return previous

    # ------------------------------------------------------------------ housekeeping

    def _keep(self, keep: int | None) -> int:
        return max(1, keep if keep is not None else KEEP_SNAPSHOTS.get())

    def gc(self, grace_seconds: float = DEFAULT_GC_GRACE_SECONDS, keep: int | None = None) -> GcReport:
        """Remove snapshots beyond the last ``keep``, objects no kept snapshot uses, and staging
        folders and temp files older than ``grace_seconds`` (what crashed runs leave behind)."""
        report = GcReport()
        cutoff = time.time() - grace_seconds
        with self._locked():
            history = self.history()[: self._keep(keep)]
            if history and history != self.history():
                _write_json(self.current_file, {"current": history[0], "history": history})
            live_objects: set[str] = set()
            for manifest in sorted(self.manifests.glob("*.json")) if self.manifests.is_dir() else []:
                if manifest.stem in history:
                    live_objects.update(self.snapshot(manifest.stem).artifacts.values())
                else:
                    manifest.unlink()
                    report.snapshots_removed += 1
            for run in sorted(self.runs.iterdir()) if self.runs.is_dir() else []:
                if _newest_mtime(run) < cutoff:  # a dead run: its objects go unless a snapshot uses them
                    shutil.rmtree(run, ignore_errors=True)
                    report.runs_removed += 1
                else:
                    live_objects.update(_staged_objects(run))
            for path in sorted(self.folder.rglob(".*.tmp-*")) if self.folder.is_dir() else []:
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    report.temp_files_removed += 1
            for path in sorted(self.objects.iterdir()) if self.objects.is_dir() else []:
                if path.name.startswith("."):
                    continue
                if path.name not in live_objects and path.stat().st_mtime < cutoff:
                    path.unlink()
                    report.objects_removed += 1
        return report

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize publish, rollback, gc and base selection of this source across processes."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a+b") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())]
    return max(times)


def _staged_objects(folder: Path) -> set[str]:
    out = set()
    for path in folder.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(path.read_text())
            if "object" in record:
                out.add(str(record["object"]))
    return out


def check_consistency(load: Callable[[str], Any], assets: list[str], required: tuple[str, ...]) -> dict[str, str]:
    """Refuse a snapshot whose artifacts do not fit together; return what it records as ``info``.

    The rules are the contracts between the pipeline's assets: one catalogue order for the
    content and projected vectors, one user list for the click graph and the user vectors,
    one user space for users, prior, projector and projected ads, one encoder throughout.
    """
    missing = [a for a in required if a not in assets]
    if missing:
        raise SnapshotError(f"the snapshot would lack {missing}: materialize the whole pipeline in one run")
    got = {a: load(a) for a in assets if a in required}
    problems = []

    def equal(a: Any, b: Any) -> bool:
        if isinstance(a, np.ndarray):
            return len(a) == len(b) and bool((a == b).all())
        return a == b

    def same(what: str, *pairs: tuple[str, Any]) -> None:
        present = [(name, value) for name, value in pairs if name in got]
        if any(not equal(present[0][1], value) for _, value in present[1:]):
            problems.append(f"{what} differ between {', '.join(name for name, _ in present)}")

    def field(asset: str, attr: str) -> tuple[str, Any]:
        return asset, getattr(got[asset], attr) if asset in got else None

    same("ad ids", field("raw_ads", "ad_ids"), field("ad_embeddings_raw", "ids"), field("ad_projected", "ids"),
         field("served_ads", "ids"))  # fmt: skip
    same("user ids", field("click_graph", "user_ids"), field("user_embeddings", "ids"), field("served_users", "ids"))
    same("user spaces", field("user_embeddings", "space"), field("served_users", "space"), field("global_mean", "space"),
         field("projector", "user_space"), field("ad_projected", "space"), field("served_ads", "space"), field("ad_index", "space"),
         field("policy_posterior", "space"))  # fmt: skip
    same("encoders", field("ad_embeddings_raw", "encoder_id"), field("projector", "encoder_id"),
         field("ad_projected", "encoder_id"), field("served_ads", "encoder_id"), field("ad_index", "encoder_id"))  # fmt: skip
    if "ad_index" in got:
        index, served = got["ad_index"].index, got.get("served_ads", got.get("ad_projected"))
        if served is not None and sorted(index.ad_ids(index.live_slots()).tolist()) != sorted(served.ids.tolist()):
            problems.append("ad_index does not hold exactly the ads of served_ads")
    if problems:
        raise SnapshotError("the artifacts of this run do not fit together: " + "; ".join(problems))
    info = {}
    if "user_embeddings" in got:
        info["user_space"] = got["user_embeddings"].space
    if "ad_embeddings_raw" in got:
        info["encoder_id"] = got["ad_embeddings_raw"].encoder_id
    if "click_graph" in got:
        info["key_fingerprint"] = got["click_graph"].key_fingerprint
    return info
