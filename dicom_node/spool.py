"""The spool: received instances as files, exactly as they arrived.

The node keeps the spool in a local directory (:class:`LocalSpool`). Workers reach it either through
the same directory (one host, or a shared volume on several: the default) or over authenticated
HTTP from the node (:class:`dicom_node.remote_spool.HttpSpool`, ``NODULEAI_SPOOL_URL``), so rows and
messages carry spool-relative paths only. Both sit behind the small :class:`Spool` protocol.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Protocol

from dicom_node.errors import StorageFullError

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def safe_uid(uid: str) -> str:
    """Return ``uid`` as a safe path component.

    A conforming UID (PS3.5 9.1: digits and dots, at most 64 characters) is used as it is; anything
    else (letters, slashes, ``..``) becomes ``x`` followed by a hash, so no path can be steered by
    what a peer sends.
    """
    uid = uid.strip(" \x00")
    if _UID.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def instance_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """The spool-relative path of an instance (POSIX separators)."""
    return f"{safe_uid(study_uid)}/{safe_uid(series_uid)}/{safe_uid(sop_uid)}.dcm"


_JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def results_path(job_id: str) -> str:
    """The spool-relative folder of a job's result artifacts: ``results/<job id>``.

    Job ids are the node's own UUIDs and are used as they are; anything else is hashed like an
    unsafe UID.
    """
    return f"results/{job_id if _JOB_ID.match(job_id) else safe_uid(job_id)}"


def study_path(study_uid: str) -> str:
    """The spool-relative directory of a study."""
    return safe_uid(study_uid)


class Spool(Protocol):
    """Where instances are kept: written once, durably, and read by relative path."""

    def ensure_space(self, size: int) -> None:
        """Raise :class:`StorageFullError` when ``size`` more bytes would cross the floor."""

    def write(self, relpath: str, data: bytes) -> None:
        """Store ``data`` at ``relpath`` durably (on stable storage when this returns)."""

    def path(self, relpath: str) -> Path:
        """The local path of a stored object."""

    def remove(self, relpath: str) -> None:
        """Delete a stored object (one whose record could not be committed)."""

    def release(self) -> None:
        """Drop local copies of objects fetched for the job that just ended (if any)."""


class LocalSpool:
    """A spool in a local (or mounted shared) directory.

    Parameters
    ----------
    root : Path
        The spool directory; created if missing.
    min_free_bytes : int
        Writes that would leave less free space than this are refused.
    """

    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_bytes

    def ensure_space(self, size: int) -> None:
        """Raise :class:`StorageFullError` if writing ``size`` bytes would cross the floor."""
        free = shutil.disk_usage(self.root).free
        if free - size < self.min_free_bytes:
            raise StorageFullError(
                f"spool free space {free} B minus {size} B is under the floor of "
                f"{self.min_free_bytes} B"
            )

    def write(self, relpath: str, data: bytes) -> None:
        """Write to a temporary file, fsync it, rename it into place and fsync the directory."""
        staged = self.stage(relpath)
        try:
            staged.write(data)
            staged.commit()
        except BaseException:
            staged.abort()
            raise

    def stage(self, relpath: str) -> Staged:
        """Begin writing ``relpath`` piece by piece (an upload): :meth:`Staged.commit` makes it
        durable and visible at once, :meth:`Staged.abort` leaves nothing behind."""
        return Staged(self.path(relpath), self.root)

    def path(self, relpath: str) -> Path:
        """The local path of ``relpath``; refuses anything that would leave the spool."""
        path = (self.root / relpath).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"path outside the spool: {relpath!r}")
        return path

    def remove(self, relpath: str) -> None:
        """Delete ``relpath`` if it exists, durably (the directory is fsync'd)."""
        target = self.path(relpath)
        if target.exists():
            target.unlink()
            _fsync_dir(target.parent)

    def release(self) -> None:
        """Nothing to drop: the files are read where they are kept."""


class Staged:
    """An object being written to a :class:`LocalSpool`: a temporary file beside its target.

    Parameters
    ----------
    target : Path
        Where the object goes (inside the spool).
    root : Path
        The spool root (directories created up to it are fsync'd on commit).
    """

    def __init__(self, target: Path, root: Path) -> None:
        self.target = target
        self._created = _make_dirs(target.parent, root)
        self._tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        self._fd: int | None = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

    def write(self, data: bytes) -> None:
        """Append ``data``."""
        assert self._fd is not None, "written after commit or abort"
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def commit(self) -> None:
        """fsync the file, rename it into place, fsync the directories that changed (on a
        failure, :meth:`abort` removes what is left)."""
        assert self._fd is not None, "committed twice or after abort"
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None
        os.replace(self._tmp, self.target)
        for directory in (self.target.parent, *self._created):
            _fsync_dir(directory)

    def abort(self) -> None:
        """Remove the temporary file (the target is left as it was)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tmp.unlink(missing_ok=True)


def _make_dirs(directory: Path, root: Path) -> list[Path]:
    """Create ``directory`` and missing parents; return the parents whose entries changed."""
    if directory.is_dir():
        return []
    missing = []
    current = directory
    while not current.exists() and current != root:
        missing.append(current)
        current = current.parent
    directory.mkdir(parents=True, exist_ok=True)
    return [d.parent for d in missing]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
