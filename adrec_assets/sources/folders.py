"""Writing a whole source folder atomically (plain Python, no Dagster).

A sensor watches the sources root and a run may read a folder at any moment, so a folder is
never written in place: it is built in a hidden sibling (names starting with "." are not
sources), flushed to disk, and renamed into place. A reader sees the old folder or the
complete new one, never a half-written one, and a failed write leaves the old one intact.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a target that is a file, or a non-empty folder unless ``overwrite``."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} exists and is not a folder")
    if any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out_dir} exists and is not empty; pass --overwrite to replace it")


def write_folder_atomically(out_dir: Path, fill: Callable[[Path], None], *, overwrite: bool = False) -> None:
    """Build the folder with ``fill(tmp)``, fsync every file and folder in it, then rename it to
    ``out_dir``. An existing non-empty ``out_dir`` (only with ``overwrite``) is moved aside
    first and deleted once the new one is in place; on any failure the temporary folder is
    removed and ``out_dir`` is as it was."""
    out_dir = Path(os.path.abspath(out_dir))
    check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    tmp.mkdir()  # honours the umask, unlike tempfile.mkdtemp's 0700
    try:
        fill(tmp)
        _fsync_tree(tmp)
        check_out_dir(out_dir, overwrite)  # again: it may have changed while fill ran
        if not out_dir.exists():
            os.rename(tmp, out_dir)
        elif not any(out_dir.iterdir()):
            out_dir.rmdir()
            os.rename(tmp, out_dir)
        else:
            old = out_dir.parent / f".{out_dir.name}.old-{tag}"
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
