"""The spool over HTTP (:mod:`dicom_node.remote_spool`): the node's ``/spool`` routes served by a
real HTTP server on loopback, and the worker's :class:`HttpSpool` against them."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Response
from pydantic import SecretStr
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from sqlalchemy import select, text

from dicom_node.config import load_settings
from dicom_node.db import Database, Instance
from dicom_node.errors import (
    ConfigError,
    DatabaseUnavailableError,
    SpoolUnreadableError,
    StorageFullError,
)
from dicom_node.ingest import Ingest
from dicom_node.migrate import upgrade
from dicom_node.remote_spool import (
    HttpSpool,
    content_digest,
    parse_digest,
    spool_router,
    worker_spool,
)
from dicom_node.spool import LocalSpool, instance_path

TOKEN = SecretStr("s3cret-spool-token")


class Server:
    """A FastAPI app served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: FastAPI) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "server did not start"
            threading.Event().wait(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _serve(spool: LocalSpool) -> Server:
    app = FastAPI()
    app.include_router(spool_router(spool, TOKEN))
    return Server(app)


@pytest.fixture
def node_spool(tmp_path: Path) -> LocalSpool:
    return LocalSpool(tmp_path / "node" / "spool", min_free_bytes=0)


@pytest.fixture
def node(node_spool: LocalSpool) -> Iterator[Server]:
    server = _serve(node_spool)
    yield server
    server.stop()


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_digest_field_round_trips_and_rejects_what_is_not_sha256() -> None:
    digest = hashlib.sha256(b"x").digest()
    assert parse_digest(content_digest(digest)) == digest
    assert parse_digest(f"sha-512=:{'A' * 88}:, {content_digest(digest)}") == digest
    assert parse_digest("sha-256=:AAAA:") is None  # not 32 bytes
    assert parse_digest("sha-256=:not base64!:") is None
    assert parse_digest(None) is None


def test_worker_fetches_writes_and_removes_through_the_node(
    node: Server, node_spool: LocalSpool, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    node_spool.write("1.2/3.4/5.6.dcm", data)
    spool = HttpSpool(node.url, TOKEN, tmp_path / "worker" / "cache")
    try:
        fetched = spool.path("1.2/3.4/5.6.dcm")
        assert fetched.read_bytes() == data
        assert fetched.is_relative_to(tmp_path / "worker")
        assert spool.path("1.2/3.4/5.6.dcm") == fetched  # cached for the job

        spool.write("results/job/1/SR-7.dcm", b"result bytes")
        assert node_spool.path("results/job/1/SR-7.dcm").read_bytes() == b"result bytes"
        spool.remove("results/job/1/SR-7.dcm")
        assert not node_spool.path("results/job/1/SR-7.dcm").exists()
        spool.remove("results/job/1/SR-7.dcm")  # already gone: nothing to do

        spool.release()
        assert not fetched.exists()
        assert spool.path("1.2/3.4/5.6.dcm").read_bytes() == data  # fetched again
    finally:
        spool.close()
    assert not spool.cache.exists()
    assert _leftovers(node_spool.root) == []


def test_a_large_upload_is_streamed_to_disk_and_checked(
    node: Server, node_spool: LocalSpool, tmp_path: Path
) -> None:
    data = os.urandom(12 << 20)
    spool = HttpSpool(node.url, TOKEN, tmp_path / "cache")
    spool.write("results/job/1/PMAP-1.dcm", data)
    spool.close()
    stored = node_spool.path("results/job/1/PMAP-1.dcm").read_bytes()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()


def test_the_node_refuses_without_the_token(node: Server, node_spool: LocalSpool) -> None:
    node_spool.write("a/b.dcm", b"secret")
    for token in (None, "Bearer wrong", "Basic czNjcmV0LXNwb29sLXRva2Vu"):
        headers = {"Authorization": token} if token else {}
        answer = httpx.get(f"{node.url}/spool/a/b.dcm", headers=headers)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
        assert b"secret" not in answer.content
    put = httpx.put(f"{node.url}/spool/a/c.dcm", content=b"x")
    assert put.status_code == 401 and not node_spool.path("a/c.dcm").exists()


def test_the_node_keeps_requests_inside_its_spool(node: Server, node_spool: LocalSpool) -> None:
    outside = node_spool.root.parent / "outside.txt"
    outside.write_text("not for workers")
    headers = {"Authorization": f"Bearer {TOKEN.get_secret_value()}"}
    answer = httpx.get(f"{node.url}/spool/..%2Foutside.txt", headers=headers)
    assert answer.status_code in (400, 404)
    assert b"not for workers" not in answer.content
    put = httpx.put(
        f"{node.url}/spool/..%2Fplanted.txt",
        content=b"x",
        headers={**headers, "Content-Digest": content_digest(hashlib.sha256(b"x").digest())},
    )
    assert put.status_code in (400, 404)
    assert not (node_spool.root.parent / "planted.txt").exists()


def test_an_upload_that_does_not_match_its_digest_leaves_nothing(
    node: Server, node_spool: LocalSpool
) -> None:
    headers = {"Authorization": f"Bearer {TOKEN.get_secret_value()}"}
    wrong = content_digest(hashlib.sha256(b"other").digest())
    answer = httpx.put(
        f"{node.url}/spool/r/x.dcm",
        content=b"payload",
        headers={**headers, "Content-Digest": wrong},
    )
    assert answer.status_code == 422
    missing = httpx.put(f"{node.url}/spool/r/x.dcm", content=b"payload", headers=headers)
    assert missing.status_code == 400
    assert not node_spool.path("r/x.dcm").exists()
    assert _leftovers(node_spool.root) == []


def test_a_full_node_spool_refuses_uploads_as_storage_full(tmp_path: Path) -> None:
    full = LocalSpool(tmp_path / "spool", min_free_bytes=1 << 62)
    server = _serve(full)
    spool = HttpSpool(server.url, TOKEN, tmp_path / "cache")
    try:
        with pytest.raises(StorageFullError):
            spool.write("results/j/1/SR-1.dcm", b"x" * 1000)
    finally:
        spool.close()
        server.stop()
    assert not full.path("results/j/1/SR-1.dcm").exists()


def test_a_missing_file_or_an_unreachable_node_is_unreadable(node: Server, tmp_path: Path) -> None:
    spool = HttpSpool(node.url, TOKEN, tmp_path / "cache")
    with pytest.raises(SpoolUnreadableError, match="does not have"):
        spool.path("no/such.dcm")
    spool.close()
    node.stop()
    gone = HttpSpool(node.url, TOKEN, tmp_path / "cache", timeout=2.0)
    with pytest.raises(SpoolUnreadableError, match="ConnectError"):
        gone.path("no/such.dcm")
    gone.close()


def test_content_that_fails_its_check_is_fetched_again_then_refused(tmp_path: Path) -> None:
    """A peer whose content does not match its digest (a corrupting proxy, a file replaced
    while it was sent): the worker tries once more, then gives up; no corrupt file is cached."""
    calls: list[str] = []
    good = hashlib.sha256(b"the real content").digest()

    app = FastAPI()

    @app.get("/spool/{relpath:path}")
    def corrupt(relpath: str) -> Response:
        calls.append(relpath)
        return Response(b"the real c0ntent", headers={"Content-Digest": content_digest(good)})

    server = Server(app)
    spool = HttpSpool(server.url, TOKEN, tmp_path / "cache")
    try:
        with pytest.raises(SpoolUnreadableError, match="digest check twice"):
            spool.path("a/b.dcm")
        assert calls == ["a/b.dcm", "a/b.dcm"]
        assert [p for p in spool.cache.rglob("*") if p.is_file()] == []
    finally:
        spool.close()
        server.stop()


def test_cache_folders_of_dead_workers_are_removed_at_start(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    dead = root / "999999999-deadbeef0000"  # no such process
    earlier_self = root / f"{os.getpid()}-0123456789ab"  # this pid, not this process's folder
    alive = root / f"{os.getppid()}-abcdefabcdef"  # another running process's folder
    for folder in (dead, earlier_self, alive):
        (folder / "x").mkdir(parents=True)
    first = HttpSpool("http://127.0.0.1:9", TOKEN, root)
    (first.cache / "y").mkdir(parents=True)
    second = HttpSpool("http://127.0.0.1:9", TOKEN, root)  # a second worker in this process
    assert not dead.exists() and not earlier_self.exists()
    assert alive.exists() and first.cache.exists()
    first.close()
    second.close()


def test_spool_url_needs_the_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="NODULEAI_SPOOL_TOKEN"):
        load_settings(data_dir=tmp_path, spool_url="http://node:8080")
    with pytest.raises(ConfigError, match="NODULEAI_SPOOL_URL"):
        load_settings(data_dir=tmp_path, spool_url="node:8080", spool_token="t")
    settings = load_settings(data_dir=tmp_path, spool_url="http://node:8080", spool_token="t")
    remote = worker_spool(settings)
    assert isinstance(remote, HttpSpool)
    remote.close()
    assert isinstance(worker_spool(load_settings(data_dir=tmp_path)), LocalSpool)


def _instance(sop_uid: str) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.5", "CT"
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_a_worker_ingests_a_retrieved_prior_into_the_nodes_spool(
    node: Server, node_spool: LocalSpool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prior fetched by C-GET is stored by the worker's Ingest through the HTTP spool: the file
    lands in the node's spool beside its row; without the row it is removed there again."""
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(db)
    spool = HttpSpool(node.url, TOKEN, tmp_path / "worker")
    try:
        data = _instance("1.2.3.6")
        stored = Ingest(db, spool).store(data, "PACS")
        assert not stored.duplicate
        relpath = instance_path("1.2.3", "1.2.3.5", "1.2.3.6")
        assert node_spool.path(relpath).read_bytes() == data
        with db.session() as session:
            row = session.scalars(select(Instance)).one()
        assert (row.path, row.size) == (relpath, len(data))
        assert Ingest(db, spool).store(data, "PACS").duplicate

        with db.engine.begin() as connection:  # the next row cannot be written
            connection.execute(text("DELETE FROM instances"))
            connection.execute(text("DROP TABLE series"))
        written: list[str] = []
        upload = spool.write

        def recorded(relpath: str, data: bytes) -> None:
            written.append(relpath)
            upload(relpath, data)

        monkeypatch.setattr(spool, "write", recorded)
        with pytest.raises(DatabaseUnavailableError):
            Ingest(db, spool).store(_instance("1.2.3.7"), "PACS")
        unrecorded = instance_path("1.2.3", "1.2.3.5", "1.2.3.7")
        assert written == [unrecorded]  # it reached the node...
        assert not node_spool.path(unrecorded).exists()  # ...and was removed there
    finally:
        spool.close()
        db.dispose()
