"""Real peers started by the tests: Orthanc (Debian package) as the hospital PACS.

Orthanc runs as a plain process with a JSON configuration of the test's own in a temp dir, on
free loopback ports, with HTTP basic authentication and the DICOMweb plugin. It is stopped by the
process id it was started with; its log goes to a file beside its configuration.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import free_port, log_tail, stop_process, wait_until_ready

ORTHANC_BINARY = os.environ.get("NODULEAI_TEST_ORTHANC", "Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancError(RuntimeError):
    """Orthanc did not start, or answered a request with an error."""


class Orthanc:
    """An Orthanc process of a test's own, driven over its REST API.

    Parameters
    ----------
    workdir : Path
        Holds the configuration, storage, index and log; created if missing.
    aet : str
        Orthanc's own AE title (the calling AE of what it pushes).
    startup_timeout : float
        Seconds to wait for ``/system`` to answer.
    """

    def __init__(
        self,
        workdir: Path,
        aet: str = "ORTHANC",
        startup_timeout: float = 30.0,
        store_delay: float = 0.0,
    ) -> None:
        self.workdir = workdir
        self.aet = aet
        self.startup_timeout = startup_timeout
        self.store_delay = store_delay
        self.username = "noduleai"
        self.password = secrets.token_urlsafe(12)
        self.http_port = 0
        self.dicom_port = 0
        self.config_path = workdir / "orthanc.json"
        self.log_path = workdir / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with."""
        config: dict[str, Any] = {
            "Name": "NoduleAI test PACS",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {},
            "SaveJobs": False,
            "HttpTimeout": 60,
            "DicomScuTimeout": 30,
            "Plugins": [],
        }
        if self.store_delay > 0:
            # A slow PACS: each received instance waits, so a test can stop it mid-transfer.
            script = self.workdir / "slow.lua"
            script.write_text(
                "function ReceivedInstanceFilter(dicom, origin, info)\n"
                f"  local t = os.clock() while os.clock() - t < {self.store_delay} do end\n"
                "  return true\n"
                "end\n"
            )
            config["LuaScripts"] = [str(script)]
        if DICOMWEB_PLUGIN.is_file():
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        return config

    def start(self) -> Orthanc:
        """Start Orthanc and return once its REST API answers; raise with its log otherwise."""
        if shutil.which(ORTHANC_BINARY) is None:
            raise OrthancError(f"{ORTHANC_BINARY} is not installed (apt-get install orthanc)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A restart keeps the ports, as a PACS coming back after maintenance would.
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [ORTHANC_BINARY, str(self.config_path)],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._client = httpx.Client(
            base_url=self.url, auth=(self.username, self.password), timeout=120.0
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        wait_until_ready(
            self._process,
            lambda: self.client.get("/system", timeout=2.0).status_code,
            self.startup_timeout,
            lambda why: OrthancError(f"Orthanc {why}\n{self.log()}"),
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process started by :meth:`start`; kill it if it lingers."""
        if self._client is not None:
            self._client.close()
            self._client = None
        process, self._process = self._process, None
        stop_process(process, timeout)

    def crash(self) -> None:
        """SIGKILL Orthanc (by its pid), as a PACS that goes away mid-transfer would."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=30)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self, tail: int = 200) -> str:
        """The last ``tail`` lines of Orthanc's log."""
        return log_tail(self.log_path, tail, "(no Orthanc log)")

    @property
    def client(self) -> httpx.Client:
        """The authenticated HTTP client (only while started)."""
        if self._client is None:
            raise OrthancError("Orthanc is not started")
        return self._client

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_error:
            raise OrthancError(
                f"{response.request.method} {response.request.url.path} answered "
                f"{response.status_code}: {response.text[:2000]}"
            )
        return response

    def get(self, path: str, **params: Any) -> Any:
        """``GET path`` and return the decoded JSON."""
        return self._check(self.client.get(path, params=params or None)).json()

    def post(self, path: str, body: Any) -> Any:
        """``POST path`` with a JSON body and return the decoded JSON."""
        return self._check(self.client.post(path, json=body)).json()

    def upload(self, path: Path) -> dict[str, Any]:
        """Store one DICOM file through ``POST /instances``; return Orthanc's answer."""
        response = self.client.post(
            "/instances",
            content=path.read_bytes(),
            headers={"Content-Type": "application/dicom"},
        )
        answer: dict[str, Any] = self._check(response).json()
        return answer

    def lookup_study(self, study_uid: str) -> str:
        """The Orthanc id of the study with this StudyInstanceUID (``POST /tools/lookup``)."""
        response = self._check(self.client.post("/tools/lookup", content=study_uid.encode()))
        studies = [hit["ID"] for hit in response.json() if hit.get("Type") == "Study"]
        if len(studies) != 1:
            raise OrthancError(f"study {study_uid} not found once in Orthanc: {response.json()}")
        return str(studies[0])

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Register (or replace) a DICOM modality through ``PUT /modalities/{name}``."""
        body = {"AET": aet, "Host": host, "Port": port}
        self._check(self.client.put(f"/modalities/{name}", json=body))

    def echo(self, modality: str) -> None:
        """C-ECHO the modality (``POST /modalities/{name}/echo``); raise if it fails."""
        self._check(self.client.post(f"/modalities/{modality}/echo", json={}))

    def push_study(self, modality: str, orthanc_id: str) -> dict[str, Any]:
        """C-STORE a resource to a modality synchronously; return the job's answer."""
        body = {"Resources": [orthanc_id], "Synchronous": True}
        answer: dict[str, Any] = self.post(f"/modalities/{modality}/store", body)
        return answer

    def instances_of_study(self, orthanc_id: str) -> list[dict[str, Any]]:
        """The instances Orthanc holds for a study (``GET /studies/{id}/instances``)."""
        instances: list[dict[str, Any]] = self.get(f"/studies/{orthanc_id}/instances")
        return instances
