"""Atomic file and folder writes (no torch here: any command may import it).

Every artefact (checkpoint, bundle, feature chunk, report) is written completely beside its place and then
switched in with a rename, so a kill at any moment leaves the previous one loadable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

UMASK = os.umask(0)
os.umask(UMASK)  # read once: files are created readable as the umask allows (mkstemp alone gives 0600)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside ``path``, fsynced and renamed onto it when the block succeeds, removed if it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp's 0600 would hide the result from other users
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` in the place of ``out``; an old ``out`` is removed only once replaced."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and an atomic rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    """Atomically write ``arr`` as a .npy file (never pickled)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(arr), allow_pickle=False)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(d: Path) -> None:
    """fsync a directory (its entries: a rename into it is durable), where the filesystem allows."""
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


POINTER = "CURRENT"  # the file naming a versioned directory's live version


def _writer_alive(pid: str) -> bool:
    if not pid.isdigit():
        return False  # a temp folder of an older layout (no pid): its save is long over
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


class VersionedDir:
    """A directory of complete versions and the file ``CURRENT`` naming the live one: checkpoints
    (``sparc_core.checkpoint``) and index bundles (``index.manifest``) both live in one.

    A version is written into ``<temp><pid>-<name>`` inside the directory, fsynced, renamed to ``<name>``,
    and only then does ``CURRENT`` move to it (an atomic rename), so a kill at any moment leaves the
    previous version live. ``prune`` keeps the current version, the ``keep`` versions before it and any after
    it (names sort by creation; a later one may be another writer's commit in flight) and removes the older
    ones, and the temp folders whose writer process is gone.
    """

    def __init__(self, path: str | Path, prefix: str, temp: str, keep: int = 0, marker: str | None = None) -> None:
        self.path = Path(path)
        self.prefix = prefix  # every version's name starts with it
        self.temp = temp  # a version being written: <temp><pid>-<name>
        self.keep = keep  # versions kept before the current one
        self.marker = marker  # a file every complete version holds (folders without it are not versions)

    def current_name(self) -> str | None:
        """The name ``CURRENT`` holds (unchecked), or None without a ``CURRENT``."""
        pointer = self.path / POINTER
        return pointer.read_text().strip() if pointer.is_file() else None

    def valid_name(self, name: str | None) -> bool:
        """Whether ``name`` can name one of this directory's versions (no path, no hidden name)."""
        return bool(name) and name.startswith(self.prefix) and "/" not in name and not name.startswith(".")

    def versions(self) -> list[Path]:
        """The complete versions, oldest first."""
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.iterdir() if p.is_dir() and self.valid_name(p.name)]
        return sorted(p for p in found if self.marker is None or (p / self.marker).exists())

    def begin(self, name: str) -> Path:
        """A new empty temp folder to write version ``name`` into."""
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f"{self.temp}{os.getpid()}-{name}"
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, name: str) -> Path:
        """Make the complete folder ``tmp`` version ``name`` and the live one; prune; returns the version."""
        version = self.path / name
        fsync_dir(tmp)
        os.replace(tmp, version)
        fsync_dir(self.path)
        atomic_write_bytes(self.path / POINTER, (name + "\n").encode())  # the switch
        fsync_dir(self.path)
        self.prune()
        return version

    def prune(self) -> list[str]:
        """Remove every version but the current one and the ``keep`` before it, and the temp folders (and
        temp files) of writers that are gone; returns the names removed. Safe while other writers run."""
        if not self.path.is_dir():
            return []
        current = self.current_name()
        versions = [p.name for p in self.versions()]
        # Versions after the current one are kept: another writer may have renamed its version into place
        # and not yet switched CURRENT to it. Without a current version nothing is known to be stale.
        at = versions.index(current) if current in versions else 0
        kept = set(versions[max(0, at - self.keep) :])
        removed = []
        for p in self.path.iterdir():
            if p.name.startswith(self.temp):
                drop = not _writer_alive(p.name[len(self.temp) :].split("-")[0])
            else:
                drop = p.is_dir() and p.name in versions and p.name not in kept
            if drop:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed
