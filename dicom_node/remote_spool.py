"""The spool over HTTP: workers that share no filesystem with the node (``NODULEAI_SPOOL_URL``).

The node serves its spool at ``/spool/<relative path>`` to holders of ``NODULEAI_SPOOL_TOKEN``
(``Authorization: Bearer``): ``GET`` streams a file, ``PUT`` stores one durably, ``DELETE`` removes
one. Every transfer carries the SHA-256 of its content in ``Content-Digest`` (RFC 9530,
``sha-256=:<base64>:``) beside its ``Content-Length``; the receiver checks both before the content
counts (a worker before it reads the file, the node before it renames the upload into place).

A worker's :class:`HttpSpool` fetches a job's instances into a cache folder of its own data
directory, checks each against the size the node recorded when the instance arrived, and drops the
folder when the job ends (:meth:`HttpSpool.release`); the result objects it writes go straight to
the node. The shared-directory mode (:class:`dicom_node.spool.LocalSpool` on both sides) stays
the default.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import FileResponse
from pydantic import SecretStr
from starlette.concurrency import run_in_threadpool

from dicom_node.config import Settings
from dicom_node.errors import ConfigError, SpoolUnreadableError, StorageFullError
from dicom_node.spool import LocalSpool, Spool

LOGGER = logging.getLogger(__name__)

#: Where the node serves its spool.
PREFIX = "/spool"
_CHUNK = 1 << 16
#: Cache folders this process created (several workers may run in one process).
_OWN_CACHES: set[str] = set()
_DIGEST = re.compile(r"(?:^|,)\s*sha-256=:([A-Za-z0-9+/=]+):\s*(?:;[^,]*)?(?:,|$)")


def content_digest(digest: bytes) -> str:
    """The ``Content-Digest`` field value of a SHA-256 digest (RFC 9530 section 2)."""
    return f"sha-256=:{base64.b64encode(digest).decode('ascii')}:"


def parse_digest(value: str | None) -> bytes | None:
    """The SHA-256 digest a ``Content-Digest`` field carries, or ``None`` when it has none."""
    match = _DIGEST.search(value or "")
    if match is None:
        return None
    try:
        digest = base64.b64decode(match.group(1), validate=True)
    except ValueError:
        return None
    return digest if len(digest) == hashlib.sha256().digest_size else None


# ---------------------------------------------------------------------------------- node side


def spool_router(spool: LocalSpool, token: SecretStr) -> APIRouter:
    """The node's ``/spool`` routes over ``spool``, for holders of ``token`` only."""
    expected = token.get_secret_value().encode("utf-8")

    def authorised(request: Request) -> None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode("utf-8"), expected):
            raise HTTPException(401, "spool token required", {"WWW-Authenticate": "Bearer"})

    router = APIRouter(prefix=PREFIX, dependencies=[Depends(authorised)], include_in_schema=False)

    def local(relpath: str) -> Path:
        try:
            return spool.path(relpath)
        except ValueError as exc:
            raise HTTPException(400, "path outside the spool") from exc

    @router.get("/{relpath:path}")
    def fetch(relpath: str) -> FileResponse:
        path = local(relpath)
        if not path.is_file():
            raise HTTPException(404, "not in the spool")
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
        # a file replaced between hashing and sending fails the worker's check (it tries again)
        return FileResponse(
            path,
            media_type="application/octet-stream",
            headers={"Content-Digest": content_digest(digest.digest())},
        )

    @router.put("/{relpath:path}", status_code=204)
    async def upload(relpath: str, request: Request) -> Response:
        expected_digest = parse_digest(request.headers.get("content-digest"))
        if expected_digest is None:
            raise HTTPException(400, "Content-Digest with sha-256 required")
        try:
            length = int(request.headers["content-length"])
        except (KeyError, ValueError) as exc:
            raise HTTPException(411, "Content-Length required") from exc
        try:
            spool.ensure_space(length)
        except StorageFullError as exc:
            raise HTTPException(507, "spool under its free-space floor") from exc
        local(relpath)  # 400 for a path outside the spool
        staged = await run_in_threadpool(spool.stage, relpath)
        try:
            digest, size = hashlib.sha256(), 0
            async for chunk in request.stream():
                digest.update(chunk)
                size += len(chunk)
                await run_in_threadpool(staged.write, chunk)
            if size != length or not hmac.compare_digest(digest.digest(), expected_digest):
                raise HTTPException(422, "content does not match its length and digest")
            await run_in_threadpool(staged.commit)
        except BaseException:
            staged.abort()
            raise
        return Response(status_code=204)

    @router.delete("/{relpath:path}", status_code=204)
    def remove(relpath: str) -> Response:
        local(relpath)
        spool.remove(relpath)
        return Response(status_code=204)

    return router


# -------------------------------------------------------------------------------- worker side


class HttpSpool:
    """The node's spool as a worker on another host sees it.

    Parameters
    ----------
    url : str
        The node's HTTP address (``http://noduleai-node:8080``).
    token : SecretStr
        The node's ``NODULEAI_SPOOL_TOKEN``.
    cache_root : Path
        Where fetched files are kept while their job runs (in the worker's own data directory);
        each :class:`HttpSpool` uses a folder of its own in it.
    timeout : float
        Seconds to wait for a connection or for the next piece of a transfer.
    """

    def __init__(self, url: str, token: SecretStr, cache_root: Path, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            base_url=f"{self.url}{PREFIX}/",
            headers={"Authorization": f"Bearer {token.get_secret_value()}"},
            timeout=timeout,
            transport=httpx.HTTPTransport(retries=2),  # connection failures only
        )
        cache_root.mkdir(parents=True, exist_ok=True)
        _remove_stale(cache_root)
        name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        _OWN_CACHES.add(name)
        self.cache = cache_root / name

    def ensure_space(self, size: int) -> None:
        """Nothing to check here: the node refuses an upload that would cross its floor (507,
        raised as :class:`StorageFullError` by :meth:`write`)."""

    def path(self, relpath: str) -> Path:
        """The local copy of ``relpath``, fetched from the node unless already here.

        Raises
        ------
        SpoolUnreadableError
            The node cannot be reached, does not have the file, or sent content that failed its
            length or digest check twice.
        """
        local = self._local(relpath)
        if local.is_file():
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):
            try:
                self._download(relpath, local)
                return local
            except _Mismatch:
                if attempt == 2:
                    raise SpoolUnreadableError(
                        "a file fetched from the node failed its length or digest check twice"
                    ) from None
                LOGGER.warning("a file fetched from the node failed its check; fetching again")
        raise AssertionError("unreachable")

    def write(self, relpath: str, data: bytes) -> None:
        """Store ``data`` at ``relpath`` on the node (durable there when this returns)."""
        headers = {"Content-Digest": content_digest(hashlib.sha256(data).digest())}
        try:
            response = self._client.put(quote(relpath), content=data, headers=headers)
        except httpx.HTTPError as exc:
            raise SpoolUnreadableError(f"upload to the node failed: {type(exc).__name__}") from exc
        if response.status_code == 507:
            raise StorageFullError("the node's spool is under its free-space floor")
        _check(response, "upload")
        self._local(relpath).unlink(missing_ok=True)  # a cached copy is out of date now

    def remove(self, relpath: str) -> None:
        """Delete ``relpath`` on the node (and any local copy)."""
        try:
            response = self._client.delete(quote(relpath))
        except httpx.HTTPError as exc:
            raise SpoolUnreadableError(f"removal on the node failed: {type(exc).__name__}") from exc
        if response.status_code != 404:  # already gone is what was asked
            _check(response, "removal")
        self._local(relpath).unlink(missing_ok=True)

    def release(self) -> None:
        """Drop every file fetched so far (the job ended)."""
        shutil.rmtree(self.cache, ignore_errors=True)

    def close(self) -> None:
        """Drop the cache and close the connections."""
        self.release()
        self._client.close()

    def _local(self, relpath: str) -> Path:
        path = (self.cache / relpath).resolve()
        if not path.is_relative_to(self.cache.resolve()):
            raise ValueError(f"path outside the spool: {relpath!r}")
        return path

    def _download(self, relpath: str, local: Path) -> None:
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
        try:
            with self._client.stream("GET", quote(relpath)) as response:
                if response.status_code == 404:
                    raise SpoolUnreadableError("the node's spool does not have the file")
                _check(response, "fetch")
                expected = parse_digest(response.headers.get("content-digest"))
                length = int(response.headers.get("content-length", -1))
                digest, size = hashlib.sha256(), 0
                with tmp.open("wb") as file:
                    for chunk in response.iter_raw(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        file.write(chunk)
            if expected is None or size != length or digest.digest() != expected:
                raise _Mismatch
            os.replace(tmp, local)
        except httpx.HTTPError as exc:
            raise SpoolUnreadableError(f"fetch from the node failed: {type(exc).__name__}") from exc
        finally:
            tmp.unlink(missing_ok=True)


class _Mismatch(Exception):
    """Received content differs from its announced length or digest."""


def _check(response: httpx.Response, what: str) -> None:
    if response.status_code >= 300:
        raise SpoolUnreadableError(f"{what} refused by the node: HTTP {response.status_code}")


def _remove_stale(cache_root: Path) -> None:
    """Remove cache folders left by workers that died (their process no longer runs)."""
    for folder in cache_root.iterdir():
        pid_text, _, _ = folder.name.partition("-")
        if not pid_text.isdigit() or folder.name in _OWN_CACHES:
            continue
        pid = int(pid_text)
        if pid != os.getpid() and _running(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_spool(settings: Settings) -> Spool:
    """The spool as a worker reaches it: over HTTP with ``spool_url``, else the shared folder."""
    if settings.spool_url is None:
        return LocalSpool(settings.spool_dir, min_free_bytes=0)
    if settings.spool_token is None:
        raise ConfigError("NODULEAI_SPOOL_URL needs NODULEAI_SPOOL_TOKEN (the node's as well)")
    return HttpSpool(settings.spool_url, settings.spool_token, settings.data_dir / "spool-cache")
