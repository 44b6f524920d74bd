"""Configuration: one typed settings object, built at start and passed down.

Environment variables carry the prefix ``NODULEAI_`` (``NODULEAI_DICOM_PORT=104``). Per-AE policies
and result destinations live in an optional YAML file named by ``NODULEAI_CONFIG``::

    ae_policies:
      - ae_title: ORTHANC
        hosts: [10.0.0.5, 10.0.1.0/24]   # addresses or networks the AE may call from
        completeness: quiet              # or: release (study complete on association release)
        quiet_seconds: 10                # optional; default NODULEAI_QUIET_SECONDS

Without ``ae_policies`` any calling AE is accepted with the default policy (a warning is logged).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from dicom_node.errors import ConfigError

LOGGER = logging.getLogger(__name__)

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[ -~]*[!-~][ -~]*$")]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Completeness(StrEnum):
    """When a study counts as complete for the AE that sent it."""

    QUIET = "quiet"  # no new instance for quiet_seconds
    RELEASE = "release"  # the association that sent it was released


class RetrieveMethod(StrEnum):
    """How a prior study is fetched from the PACS (PS3.4 C.4).

    ``move``: C-MOVE to our own AE title, so the PACS must know our AE's host and port (its
    instances arrive through the node's C-STORE SCP); ``get``: C-GET, the instances come back
    on the worker's own association (no registration of our AE at the PACS needed).
    """

    MOVE = "move"
    GET = "get"


class PriorsPolicy(BaseModel):
    """Comparison with the patient's prior CT (:mod:`pipelines.priors`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    #: The DIMSE destination (by name) that is also the Query/Retrieve SCP holding the priors.
    source: str
    #: Only studies at most this many days older than the current one are priors.
    max_age_days: int = Field(default=3 * 365, ge=1)
    #: The most the current result waits for the prior (query and retrieval together).
    timeout_seconds: float = Field(default=120.0, gt=0)
    retrieve: RetrieveMethod = RetrieveMethod.MOVE


class AEPolicy(BaseModel):
    """What a calling AE may do, how its studies are judged complete, where results go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: AETitle
    hosts: list[str] = Field(default_factory=list)
    completeness: Completeness = Completeness.QUIET
    quiet_seconds: float | None = Field(default=None, gt=0)
    #: Compute and keep results, send nothing to DICOM destinations (FHIR still per ``fhir``).
    shadow: bool = False
    #: Destination names for this AE's results; default: the DICOM destination with the same AE
    #: title (back to the sending PACS) and every FHIR destination.
    results_to: list[str] | None = None
    #: FHIR Identifier.system of this AE's PatientIDs (e.g. ``urn:oid:1.2.3.4`` or the
    #: hospital's MRN namespace URI); default: from IssuerOfPatientID, else none.
    patient_identifier_system: str | None = None
    #: Compare this AE's studies with the patient's prior CT (off by default).
    priors: PriorsPolicy | None = None

    def networks(self) -> list[IPNetwork]:
        """Return the networks this AE may connect from (empty: any address)."""
        return [_network(host) for host in self.hosts]


def _network(host: str) -> IPNetwork:
    """Parse an address, network or host name into a network."""
    try:
        return ipaddress.ip_network(host, strict=False)
    except ValueError:
        pass
    try:
        return ipaddress.ip_network(socket.gethostbyname(host))
    except OSError as exc:
        raise ConfigError(f"ae_policies.hosts: cannot resolve host {host!r}") from exc


class TLSFiles(BaseModel):
    """Client-side TLS for a DICOM destination."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca: Path
    cert: Path | None = None
    key: Path | None = None


class Retraction(StrEnum):
    """How a destination is told that results it holds were replaced by a rerun.

    ``iocm``: the IHE IOCM rejection note (a Key Object Selection titled "Rejected for Quality
    Reasons", DCM 113001) is stored there, after the new results were confirmed; a PACS that
    implements IOCM hides or deletes what it lists, others keep it beside the old objects.
    ``orthanc``: the replaced objects are deleted through Orthanc's REST API (``orthanc:``).
    ``none``: nothing is done; the old objects stay.
    """

    IOCM = "iocm"
    ORTHANC = "orthanc"
    NONE = "none"


class OrthancRest(BaseModel):
    """Orthanc's REST API, for deleting replaced results (``retraction: orthanc``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    username: str | None = None
    password: SecretStr | None = None


class _DicomDestination(BaseModel):
    """What every destination of DICOM objects has: a name and how reruns retract."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    retraction: Retraction = Retraction.IOCM
    orthanc: OrthancRest | None = None

    @model_validator(mode="after")
    def _orthanc_for_its_retraction(self) -> _DicomDestination:
        if self.retraction is Retraction.ORTHANC and self.orthanc is None:
            raise ValueError("retraction: orthanc needs orthanc: {url, username, password}")
        return self


class DimseDestination(_DicomDestination):
    """A DICOM C-STORE SCP (usually the PACS) that results are stored to."""

    type: Literal["dimse"] = "dimse"
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TLSFiles | None = None

    def tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        """pynetdicom's ``tls_args`` for an association with this AE (``None``: no TLS)."""
        if self.tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.tls.ca))
        context.check_hostname = False
        if self.tls.cert is not None and self.tls.key is not None:
            context.load_cert_chain(self.tls.cert, self.tls.key)
        return context, self.host


class DicomWebDestination(_DicomDestination):
    """A DICOMweb server that takes results by STOW-RS (PS3.18 10.5)."""

    type: Literal["dicomweb"] = "dicomweb"
    url: str
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None


class FhirDestination(BaseModel):
    """An HL7 FHIR R4 server that takes the DiagnosticReport and its Observations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    type: Literal["fhir"] = "fhir"
    url: str
    token: SecretStr | None = None


Destination = Annotated[
    DimseDestination | DicomWebDestination | FhirDestination, Field(discriminator="type")
]


class NodeConfig(BaseModel):
    """The YAML part of the configuration."""

    model_config = ConfigDict(extra="forbid")

    ae_policies: list[AEPolicy] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, destinations: list[Destination]) -> list[Destination]:
        names = [d.name for d in destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names listed twice: {', '.join(duplicates)}")
        return destinations

    def destinations_for(self, calling_ae: str) -> list[Destination]:
        """Where the results of a study sent by ``calling_ae`` go (none in shadow mode but FHIR).

        Raises
        ------
        ConfigError
            When the AE's ``results_to`` names an unknown destination.
        """
        policy = self.policy_of(calling_ae)
        by_name = {d.name: d for d in self.destinations}
        if policy is not None and policy.results_to is not None:
            unknown = [n for n in policy.results_to if n not in by_name]
            if unknown:
                raise ConfigError(f"ae_policies.{calling_ae}.results_to: unknown {unknown}")
            chosen = [by_name[n] for n in policy.results_to]
        else:
            chosen = [
                d
                for d in self.destinations
                if isinstance(d, FhirDestination)
                or (isinstance(d, DimseDestination) and d.ae_title == calling_ae.strip())
            ]
        if policy is not None and policy.shadow:
            chosen = [d for d in chosen if isinstance(d, FhirDestination)]
        return chosen

    def policy_of(self, calling_ae: str) -> AEPolicy | None:
        """The ``ae_policies`` entry of ``calling_ae``, if it has one."""
        return next((p for p in self.ae_policies if p.ae_title == calling_ae.strip()), None)

    def priors_of(self, calling_ae: str) -> tuple[PriorsPolicy, DimseDestination] | None:
        """The priors policy of ``calling_ae`` and its source, when comparison is enabled.

        Raises
        ------
        ConfigError
            When ``priors.source`` does not name a DIMSE destination.
        """
        policy = self.policy_of(calling_ae)
        if policy is None or policy.priors is None or not policy.priors.enabled:
            return None
        source = next((d for d in self.destinations if d.name == policy.priors.source), None)
        if not isinstance(source, DimseDestination):
            raise ConfigError(
                f"ae_policies.{policy.ae_title}.priors.source: {policy.priors.source!r} is not "
                "a DIMSE destination"
            )
        return policy.priors, source

    def patient_identifier_system(self, calling_ae: str) -> str | None:
        """The FHIR patient identifier system configured for ``calling_ae``, if any."""
        policy = self.policy_of(calling_ae)
        return policy.patient_identifier_system if policy is not None else None

    @field_validator("ae_policies")
    @classmethod
    def _unique_titles(cls, policies: list[AEPolicy]) -> list[AEPolicy]:
        titles = [p.ae_title for p in policies]
        duplicates = sorted({t for t in titles if titles.count(t) > 1})
        if duplicates:
            raise ValueError(f"AE titles listed twice: {', '.join(duplicates)}")
        return policies


class Settings(BaseSettings):
    """Every setting of the service; environment variables ``NODULEAI_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="NODULEAI_", extra="forbid")

    data_dir: Path = Path("./var")
    ae_title: AETitle = "NODULEAI"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(default=11112, ge=0, le=65535)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    db_url: SecretStr | None = None
    amqp_url: SecretStr | None = None
    amqp_queue: str = "nodule.inference"
    amqp_dead_letter_queue: str = "nodule.dead"
    quiet_seconds: float = Field(default=5.0, gt=0)
    min_free_bytes: int = Field(default=1 << 30, ge=0)
    config: Path | None = None

    max_associations: int = Field(default=16, ge=1)
    max_pdu_size: int = Field(default=65536, ge=0)
    acse_timeout: float = Field(default=30.0, gt=0)
    association_request_timeout: float = Field(default=5.0, gt=0)
    max_pending_per_peer: int = Field(default=8, ge=1)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    publish_retry_seconds: float = Field(default=2.0, gt=0)
    log_level: str = "INFO"

    backend: Literal["auto", "tensorrt", "onnx-tensorrt", "onnx-cuda", "onnx-cpu"] = "auto"
    fp16: bool = False
    models_dir: Path | None = None
    inference_threads: int | None = Field(default=None, ge=1)
    operating_threshold: float | None = Field(default=None, ge=0, le=1)
    review_band: float = Field(default=0.5, ge=0, le=1)
    #: Also send stage 1's screening heatmap as a Parametric Map (about 4 bytes per CT pixel).
    heatmap: bool = False
    min_slices: int = Field(default=20, ge=3)
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_seconds: float = Field(default=5.0, ge=0)
    job_timeout_seconds: float = Field(default=900.0, gt=0)
    workers: int = Field(default=1, ge=0)
    delivery_max_attempts: int = Field(default=6, ge=1)
    delivery_backoff_seconds: float = Field(default=2.0, ge=0)

    #: Workers on other hosts: the node's HTTP address, to fetch instances from and send results
    #: to (no shared folder needed; :mod:`dicom_node.remote_spool`). Unset: the shared folder.
    spool_url: str | None = Field(default=None, pattern=r"^https?://")
    #: The bearer token of the node's ``/spool`` routes (set on the node and on its workers).
    spool_token: SecretStr | None = None

    dashboard_token: SecretStr | None = None
    dashboard_users: SecretStr | None = None  # "alice:password,bob:password" (basic auth)
    dashboard_readers: SecretStr | None = None  # read-only users, same form
    dashboard_public_read: bool = True
    show_patient_data: bool = False

    @property
    def spool_dir(self) -> Path:
        """Directory of received instances, shared with the workers."""
        return self.data_dir / "spool"

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL; a SQLite file in ``data_dir`` unless ``db_url`` is set."""
        if self.db_url is not None:
            return self.db_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'noduleai.db').resolve()}"

    def node_config(self) -> NodeConfig:
        """Load and validate the YAML file named by ``config`` (empty when unset)."""
        if self.config is None:
            return NodeConfig()
        try:
            raw = yaml.safe_load(self.config.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"NODULEAI_CONFIG: cannot read {self.config}: {exc}") from exc
        try:
            node = NodeConfig.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(f"NODULEAI_CONFIG ({self.config}): {_describe(exc)}") from exc
        for policy in node.ae_policies:
            policy.networks()  # resolve now so that a bad host fails at start
            node.destinations_for(policy.ae_title)  # and an unknown destination name
            node.priors_of(policy.ae_title)  # and a priors source that is no DIMSE destination
        return node

    def effective(self) -> dict[str, Any]:
        """The configuration as logged at start: secrets masked."""
        return self.model_dump(mode="json")


def _describe(exc: ValidationError) -> str:
    """One line per invalid field, naming it as the user spells it."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"])
        parts.append(f"{name}: {err['msg']}")
    return "; ".join(parts)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment, failing with a message naming the setting.

    Raises
    ------
    ConfigError
        When a setting is invalid; the message names it as ``NODULEAI_<NAME>``.
    """
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            name = "NODULEAI_" + "_".join(str(p) for p in err["loc"]).upper()
            parts.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(parts)) from exc
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("NODULEAI_TLS_CERT and NODULEAI_TLS_KEY must be set together")
    if settings.spool_url is not None and settings.spool_token is None:
        raise ConfigError("NODULEAI_SPOOL_URL needs NODULEAI_SPOOL_TOKEN (the node's as well)")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError("NODULEAI_TLS_CLIENT_CA needs NODULEAI_TLS_CERT and NODULEAI_TLS_KEY")
    return settings
