"""FHIR R4 delivery: a study's DiagnosticReport and its Observations, idempotently.

Every write is a *conditional update* keyed by the resource's first identifier (HL7 FHIR R4
RESTful API 3.1.0.4.3, ``PUT [type]?identifier=system|value``): the server updates the one match
or creates the resource when there is none, so a retried or redelivered job never adds a second
copy. Before writing, the client reads the current version by the same search:

- nothing found: conditional update (the server creates it);
- found and equal to what would be written (``id``/``meta``/``text`` aside): no write at all, so
  a rerun of the same results leaves no new version in the history;
- found and different: conditional update with ``If-Match: W/"<versionId>"`` (3.1.0.5, managing
  concurrency), so a concurrent writer's version is never overwritten blindly; the server answers
  412 and the caller retries (it re-reads);
- more than one found: the server would refuse (412, multiple matches); a permanent error.

Errors are translated at this boundary: connection problems, timeouts, 5xx, 409, 412 and 429
are :class:`~dicom_node.errors.TransientError`; other 4xx are
:class:`~dicom_node.errors.PermanentError`.
Messages name resource types, identifiers' systems and HTTP statuses, never patient data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

import httpx
from pydantic import SecretStr

from dicom_node.config import FhirDestination
from dicom_node.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

JSON = dict[str, Any]
FHIR_JSON: Final = "application/fhir+json"
#: HTTP statuses worth a retry besides 5xx: conflict, precondition failed (version race), busy.
RETRYABLE: Final = frozenset({409, 412, 429})
#: Elements the server owns; left out when comparing what is stored with what would be written.
SERVER_OWNED: Final = frozenset({"id", "meta", "text"})
#: Status given to an Observation that a rerun no longer reports (FHIR R4 observation-status:
#: "withdrawn following previous final release").
WITHDRAWN: Final = "entered-in-error"


@dataclass
class Written:
    """What :meth:`FhirClient.upsert` did to one resource.

    Attributes
    ----------
    resource : dict
        The resource as the server holds it now (with ``id`` and ``meta.versionId``).
    action : str
        ``created``, ``updated`` or ``unchanged``.
    """

    resource: JSON
    action: str

    @property
    def reference(self) -> str:
        """The literal reference ``Type/id``."""
        return f"{self.resource['resourceType']}/{self.resource['id']}"


@dataclass
class Published:
    """What :meth:`FhirClient.publish` wrote."""

    report: Written
    observations: list[Written] = field(default_factory=list)
    withdrawn: list[str] = field(default_factory=list)


class FhirClient:
    """A small FHIR R4 REST client for the node's reports (httpx, synchronous).

    Parameters
    ----------
    base_url : str
        The server's base URL (``.../fhir/R4``), as in the capability statement.
    token : SecretStr, optional
        Sent as ``Authorization: Bearer <token>`` (RFC 6750) on every request.
    timeout : float
        Seconds for each request (connect, read, write, pool).
    transport : httpx.BaseTransport, optional
        For tests; the default is httpx's.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: SecretStr | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
        if token is not None:
            headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        self.base_url = base_url.rstrip("/") + "/"
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    @classmethod
    def from_destination(cls, destination: FhirDestination, **kwargs: Any) -> FhirClient:
        """A client for a configured FHIR destination (its ``url`` and optional ``token``)."""
        return cls(destination.url, token=destination.token, **kwargs)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- reads ------------------------------------------------------------------------------

    def find(self, resource_type: str, identifier: Mapping[str, Any]) -> JSON | None:
        """The one ``resource_type`` with ``identifier``, or ``None``.

        Raises
        ------
        PermanentError
            When more than one matches (the identifier is no longer unique on the server).
        """
        bundle = self._request("GET", resource_type, params=_identifier_param(identifier))
        matches = [
            e["resource"]
            for e in bundle.get("entry", [])
            if e.get("search", {}).get("mode", "match") == "match"
        ]
        if len(matches) > 1:
            raise PermanentError(
                f"{len(matches)} {resource_type} resources share an identifier of system "
                f"{identifier.get('system')}; refusing to pick one"
            )
        return matches[0] if matches else None

    def history(self, resource_type: str, resource_id: str) -> list[JSON]:
        """The versions of one resource, newest first (``GET [type]/[id]/_history``)."""
        bundle = self._request("GET", f"{resource_type}/{resource_id}/_history")
        return [e["resource"] for e in bundle.get("entry", []) if "resource" in e]

    # -- writes -----------------------------------------------------------------------------

    def upsert(self, resource: Mapping[str, Any]) -> Written:
        """Create or update ``resource`` by its first identifier; never a duplicate.

        See the module docstring for the read / compare / conditional update steps.
        """
        resource_type = str(resource["resourceType"])
        identifier = resource["identifier"][0]
        current = self.find(resource_type, identifier)
        body = {k: v for k, v in resource.items() if k not in SERVER_OWNED}
        headers: dict[str, str] = {}
        if current is not None:
            if _content(current) == _content(body):
                return Written(current, "unchanged")
            body["id"] = current["id"]
            headers["If-Match"] = f'W/"{current["meta"]["versionId"]}"'
        stored = self._request(
            "PUT", resource_type, params=_identifier_param(identifier), json=body, headers=headers
        )
        action = "created" if current is None else "updated"
        log.info("FHIR %s %s (%s)", resource_type, action, identifier.get("system"))
        return Written(stored, action)

    def publish(
        self, report: Mapping[str, Any], observations: Sequence[Mapping[str, Any]]
    ) -> Published:
        """Write the Observations, then the DiagnosticReport that lists them.

        Parameters
        ----------
        report : dict
            From :func:`~dicom_node.fhir_resources.build_report` or
            :func:`~dicom_node.fhir_resources.build_results`; its
            ``result`` references (by identifier) are made literal (``Observation/<id>``).
        observations : sequence of dict
            From :func:`dicom_node.fhir_resources.build_observation`.

        Returns
        -------
        Published
            What was written. Observations the stored report listed but this one does not (a
            rerun found fewer nodules) are set to ``entered-in-error`` and named in ``withdrawn``.
            The patient reference is made literal where the server holds the patient
            (:meth:`_patient`).
        """
        subject = self._patient(report.get("subject"))
        if subject is not None:
            report = {**report, "subject": subject}
            observations = [{**obs, "subject": subject} for obs in observations]
        written = [self.upsert(obs) for obs in observations]
        by_identifier = {
            _key(obs["identifier"][0]): w.reference
            for obs, w in zip(observations, written, strict=True)
        }
        body = dict(report)
        if "result" in body:
            body["result"] = [_literal(ref, by_identifier) for ref in body["result"]]
        previous = self.find("DiagnosticReport", report["identifier"][0])
        stored = self.upsert(body)
        withdrawn = self._withdraw(previous, set(by_identifier.values()))
        return Published(stored, written, withdrawn)

    def _patient(self, subject: Mapping[str, Any] | None) -> JSON | None:
        """The patient reference made literal where the server holds that patient.

        A reference by an identifier with a system is searched (``Patient?identifier=
        system|value``); exactly one match adds ``reference: Patient/<id>`` (the identifier
        stays). No match, several, or no system: ``None``, the logical reference stands (no
        Patient resource needs to exist, and a bare value could match another issuer's).
        """
        identifier = (subject or {}).get("identifier") or {}
        if not identifier.get("system") or not identifier.get("value"):
            return None
        try:
            patient = self.find("Patient", identifier)
        except PermanentError:
            log.warning("FHIR Patient: several share the identifier; referenced by identifier")
            return None
        if patient is None:
            return None
        return {**dict(subject or {}), "reference": f"Patient/{patient['id']}"}

    def _withdraw(self, previous: JSON | None, kept: set[str]) -> list[str]:
        """Set the Observations ``previous`` listed and the new report does not to withdrawn."""
        withdrawn: list[str] = []
        for ref in (previous or {}).get("result", []):
            reference = ref.get("reference")
            if not reference or reference in kept:
                continue
            try:
                obs = self._request("GET", reference)
            except PermanentError:
                continue  # gone already
            if obs.get("status") != WITHDRAWN:
                self.upsert({**obs, "status": WITHDRAWN})
                withdrawn.append(reference)
        return withdrawn

    # -- transport --------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> JSON:
        """One request; the JSON answer, or a translated error."""
        what = f"FHIR {method} {path.split('/')[0]}"
        try:
            response = self._http.request(method, path, params=params, json=json, headers=headers)
        except httpx.TimeoutException as exc:
            raise TransientError(f"{what}: timed out") from exc
        except httpx.TransportError as exc:
            raise TransientError(f"{what}: {type(exc).__name__}") from exc
        try:
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            status = response.status_code
            detail = f"{what}: HTTP {status} {_outcome_text(response)}".rstrip()
            if status >= 500 or status in RETRYABLE:
                raise TransientError(detail) from exc
            raise PermanentError(detail) from exc
        if not response.content:
            return {}
        try:
            answer: JSON = response.json()
        except ValueError as exc:
            raise TransientError(f"{what}: answer is not JSON") from exc
        return answer


def _identifier_param(identifier: Mapping[str, Any]) -> dict[str, str]:
    """The token search parameter ``identifier=system|value`` (FHIR R4 3.1.1.4.8)."""
    value = _escape(str(identifier["value"]))
    system = identifier.get("system")
    return {"identifier": f"{_escape(str(system))}|{value}" if system else value}


def _escape(text: str) -> str:
    """Escape ``\\``, ``|``, ``,`` and ``$`` in a search value (FHIR R4 3.1.1.5.7)."""
    for char in ("\\", "|", ",", "$"):
        text = text.replace(char, "\\" + char)
    return text


def _key(identifier: Mapping[str, Any]) -> tuple[str, str]:
    return str(identifier.get("system", "")), str(identifier["value"])


def _literal(ref: Mapping[str, Any], by_identifier: Mapping[tuple[str, str], str]) -> JSON:
    """A logical reference (by identifier) made literal, keeping its identifier."""
    literal = dict(ref)
    identifier = ref.get("identifier")
    if identifier is not None and _key(identifier) in by_identifier:
        literal["reference"] = by_identifier[_key(identifier)]
    return literal


def _content(resource: Mapping[str, Any]) -> JSON:
    return {k: v for k, v in resource.items() if k not in SERVER_OWNED}


def _outcome_text(response: httpx.Response) -> str:
    """The issues of an OperationOutcome answer, shortened (diagnostics, details)."""
    try:
        outcome = response.json()
    except ValueError:
        return ""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return ""
    texts = [
        str(issue.get("details", {}).get("text") or issue.get("diagnostics") or issue.get("code"))
        for issue in outcome.get("issue", [])
    ]
    return "; ".join(texts)[:300]
