"""Serve OHIF's prebuilt static site on loopback and proxy DICOMweb to Orthanc with basic auth.

Run as a process of the test's own (stdlib only)::

    python tests/e2e/ohif/ohif_server.py --dist DIST --config app-config.js --port PORT \
        --orthanc http://127.0.0.1:ORTHANC_PORT

Orthanc's credentials come from ``ORTHANC_USER`` / ``ORTHANC_PASSWORD`` in the environment, so
they never appear in a process listing. ``/app-config.js`` is the test's configuration;
``/dicom-web/...`` goes to Orthanc's DICOMweb plugin with an ``Authorization`` header added; any
other path is a file of the site, or ``index.html`` (the single-page application's routes).
The line ``listening on PORT`` on stdout says the server is ready.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import mimetypes
import os
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PROXIED_REQUEST_HEADERS = ("Accept", "Content-Type", "Range", "Accept-Encoding")
PROXIED_RESPONSE_HEADERS = ("Content-Type", "Content-Encoding", "Content-Range", "ETag")
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")


class OhifHandler(BaseHTTPRequestHandler):
    """Static files with SPA fallback, the test's app-config.js, and the DICOMweb proxy."""

    protocol_version = "HTTP/1.1"
    dist: Path
    config: Path
    orthanc: urllib.parse.SplitResult
    authorization: str

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.command} {self.path} {format % args}\n")

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        if self.path.startswith("/dicom-web/"):
            self._proxy()
        else:
            self._send(405, b"method not allowed", "text/plain")

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith("/dicom-web/"):
            self._proxy()
        elif path == "/app-config.js":
            self._file(self.config)
        else:
            self._static(path)

    def _static(self, path: str) -> None:
        target = (self.dist / urllib.parse.unquote(path).lstrip("/")).resolve()
        if not target.is_relative_to(self.dist) or not target.is_file():
            target = self.dist / "index.html"  # the single-page application's own routes
        self._file(target)

    def _file(self, target: Path) -> None:
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send(200, target.read_bytes(), content_type)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {h: v for h in PROXIED_REQUEST_HEADERS if (v := self.headers.get(h))}
        headers["Authorization"] = self.authorization
        connection = http.client.HTTPConnection(
            self.orthanc.hostname or "127.0.0.1", self.orthanc.port, timeout=120
        )
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except OSError as exc:
            self._send(502, f"Orthanc unreachable: {exc}".encode(), "text/plain")
            return
        finally:
            connection.close()
        self.send_response(response.status)
        for name in PROXIED_RESPONSE_HEADERS:
            if value := response.getheader(name):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--orthanc", required=True, help="Orthanc's base URL (loopback)")
    args = parser.parse_args(argv)
    credentials = f"{os.environ['ORTHANC_USER']}:{os.environ['ORTHANC_PASSWORD']}"
    OhifHandler.dist = args.dist.resolve()
    OhifHandler.config = args.config.resolve()
    OhifHandler.orthanc = urllib.parse.urlsplit(args.orthanc)
    OhifHandler.authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), OhifHandler)
    server.daemon_threads = True
    print(f"listening on {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
