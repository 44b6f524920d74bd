"""The Storage SCP: C-ECHO and C-STORE over pynetdicom, with the association policy.

The handlers are thin: they hand the encoded dataset to :class:`dicom_node.ingest.Ingest` and map
what it raises to a DIMSE status through :func:`dicom_node.status.status_for`, the one place that
does so. Association policy (PS3.8 7.1.1.9 reject reasons): an unknown calling AE, or a known one
from an address not its own, gets A-ASSOCIATE-RJ *rejected-permanent, service-user, calling AE
title not recognized*; a wrong called AE gets *called AE title not recognized*; more than
``max_associations`` established associations get *rejected-transient, service-provider
(presentation), local limit exceeded* (logged, counted).

Admission that a few sockets cannot exhaust (:class:`Admission`): a new connection has
``association_request_timeout`` seconds to send its A-ASSOCIATE-RQ (instead of the ACSE timeout),
also for the rest of a PDU it began; one peer address may hold at most ``max_pending_per_peer``
connections that have not sent one yet (further connections from it are closed at once, logged);
such connections take no association slot (the cap counts established associations); all
connections together are bounded by the cap plus :data:`PENDING_LIMIT`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
import threading
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_node import reactor
from dicom_node.config import Settings
from dicom_node.errors import NoduleAIError
from dicom_node.ingest import Ingest
from dicom_node.policy import AssociationPolicy
from dicom_node.status import Status, status_for

LOGGER = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, reason): PS3.8 Table 9-21.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
#: Rejected-transient, service-provider (presentation related), local limit exceeded.
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
#: Connections that have not sent their request yet, over all peers, beyond MAX_ASSOCIATIONS
#: (pynetdicom's own check counts every connection; each holds two threads). Per peer they are
#: limited by MAX_PENDING_PER_PEER and in time by ASSOCIATION_REQUEST_TIMEOUT.
PENDING_LIMIT = 512


def decodable_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes whose pixel data this installation can decode downstream.

    The order is the acceptor's preference (pynetdicom accepts, per context, the first of these
    that the requestor proposed): encapsulated syntaxes first, so that an SCU that proposes the
    compressed syntax its file is in next to an uncompressed one sends the file as it is, instead
    of transcoding it. An SCU proposes a compressed syntax only for data it holds compressed, or
    when configured to compress.
    """
    names = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(UID(uid)).is_available:
                names.append(UID(uid))
        except NotImplementedError:
            continue
    return [str(uid) for uid in sorted(names, key=_preference)]


_LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, HTJ2K}


def _preference(uid: UID) -> tuple[int, int]:
    """Lossless compressed, lossy compressed, then native (explicit LE first), stable otherwise."""
    if uid.is_compressed:
        return (1 if uid in _LOSSY else 0, 0)
    native_order = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
    return (2, native_order.index(uid) if uid in native_order else len(native_order))


@dataclass
class _AssociationLog:
    """What one association brought: counts and SOP classes, never patient data."""

    calling_ae: str
    studies: set[str] = field(default_factory=set)
    outcomes: Counter[str] = field(default_factory=Counter)
    sop_classes: Counter[str] = field(default_factory=Counter)


class Refusal(StrEnum):
    """Why a connection or association was refused (the ``reason`` label on ``/metrics``)."""

    #: The association cap (``MAX_ASSOCIATIONS``) was reached: A-ASSOCIATE-RJ, transient.
    LOCAL_LIMIT = "local_limit"
    #: The calling AE, or its address, is not allowed by ``ae_policies``: A-ASSOCIATE-RJ.
    NOT_ALLOWED = "not_allowed"
    #: The peer holds ``MAX_PENDING_PER_PEER`` connections without a request: closed at once.
    PENDING_PER_PEER = "pending_per_peer"
    #: A malformed request: A-ABORT, closed.
    MALFORMED = "malformed"


class Refusals:
    """How many connections and associations were refused, by :class:`Refusal` (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(Refusal, 0)

    def count(self, reason: Refusal) -> None:
        """Count one refusal."""
        with self._lock:
            self._counts[reason] += 1

    def snapshot(self) -> dict[Refusal, int]:
        """The counts so far."""
        with self._lock:
            return dict(self._counts)


class Admission:
    """Connections that have not sent their A-ASSOCIATE-RQ yet, per peer address.

    Parameters
    ----------
    max_pending_per_peer : int
        The most such connections one address may hold.
    """

    def __init__(self, max_pending_per_peer: int) -> None:
        self.max_pending_per_peer = max_pending_per_peer
        self._pending: dict[int, tuple[str, Association]] = {}
        self._lock = threading.Lock()

    def allows(self, address: str) -> bool:
        """Whether ``address`` may open one more connection (it holds fewer than the limit)."""
        with self._lock:
            # An association that ended (its thread started and finished) waits no longer.
            ended = [k for k, (_a, assoc) in self._pending.items() if _ended(assoc)]
            for key in ended:
                del self._pending[key]
            held = sum(1 for a, _assoc in self._pending.values() if a == address)
            return held < self.max_pending_per_peer

    def add(self, assoc: Association, address: str) -> None:
        """A new connection from ``address``, waiting for its request."""
        with self._lock:
            self._pending[id(assoc)] = (address, assoc)

    def settle(self, assoc: Association) -> None:
        """The connection sent its request, or closed."""
        with self._lock:
            self._pending.pop(id(assoc), None)


def _ended(assoc: Association) -> bool:
    return assoc.ident is not None and not assoc.is_alive()


class _PolicyACSE(ACSE):
    """ACSE that also checks the calling AE's source address before the standard negotiation,
    and gives the association its full ACSE timeout once the request has arrived."""

    def __init__(
        self,
        assoc: Association,
        policy: AssociationPolicy,
        admission: Admission,
        acse_timeout: float,
        refusals: Refusals,
        max_associations: int,
    ) -> None:
        super().__init__(assoc)
        self._policy = policy
        self._admission = admission
        self._acse_timeout = acse_timeout
        self._refusals = refusals
        self._max_associations = max_associations

    def _negotiate_as_acceptor(self) -> None:
        self._admission.settle(self.assoc)
        self.assoc.acse_timeout = self._acse_timeout
        self.assoc.dul.artim_timer.timeout = self._acse_timeout
        _read_deadline(self.assoc, self.assoc.network_timeout)
        primitive = self.requestor.primitive
        calling_ae = primitive.calling_ae_title.strip() if primitive is not None else ""

        address = self.assoc.requestor.address
        # The cap counts established associations only: connections that have not sent their
        # request yet have their own limits (per peer, and the request deadline), so idle or
        # truncated connections cannot take the slots of a PACS. (pynetdicom's own check, in
        # the super call, counts every connection, against the cap plus PENDING_LIMIT.)
        established = [
            a
            for a in self.assoc.ae.active_associations
            if a.is_acceptor and a.is_established and a is not self.assoc
        ]
        if len(established) >= self._max_associations:
            self._refusals.count(Refusal.LOCAL_LIMIT)
            LOGGER.warning(
                "association from AE %s at %s refused: local limit (%d associations active)",
                calling_ae,
                address,
                len(established),
            )
            self.send_reject(*REJECT_LOCAL_LIMIT)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        if not self._policy.allows(calling_ae, address):
            self._refusals.count(Refusal.NOT_ALLOWED)
            LOGGER.warning(
                "association from AE %s at %s rejected: not allowed", calling_ae, address
            )
            self.send_reject(*REJECT_CALLING_AE)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()


def _read_deadline(assoc: Association, seconds: float | None) -> None:
    """The longest the association's socket waits for the rest of a PDU it began to receive.

    The DUL reads a PDU only once its first bytes arrived, then reads the rest blocking: without
    a deadline a peer that stops mid-PDU holds the connection (and its thread) for good; with
    one, pynetdicom treats the timeout as the connection closing (its event 17) and closes it.
    """
    transport = assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(seconds)


def _request_handler(
    policy: AssociationPolicy, admission: Admission, settings: Settings, refusals: Refusals
) -> type[RequestHandler]:
    class PolicyRequestHandler(RequestHandler):
        """Admits the connection, sets TCP_NODELAY, installs the event-driven reactors, the
        request deadline and the policy ACSE."""

        def handle(self) -> None:
            address = str(self.client_address[0])
            if not admission.allows(address):
                refusals.count(Refusal.PENDING_PER_PEER)
                LOGGER.warning(
                    "connection from %s closed: %d connections from it have sent no association "
                    "request yet",
                    address,
                    admission.max_pending_per_peer,
                )
                self.server.shutdown_request(self.request)
                return
            super().handle()

        def _create_association(self) -> Association:
            sock = self.request
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            malformed = functools.partial(refusals.count, Refusal.MALFORMED)
            assoc = reactor.install(super()._create_association(), malformed)
            admission.add(assoc, str(self.client_address[0]))
            assoc.acse = _PolicyACSE(
                assoc,
                policy,
                admission,
                settings.acse_timeout,
                refusals,
                settings.max_associations,
            )
            # Until its A-ASSOCIATE-RQ arrives, a connection has the request deadline only, also
            # for the rest of a PDU it began (a truncated request is closed when it passes).
            assoc.acse_timeout = settings.association_request_timeout
            assoc.dul.artim_timer.timeout = settings.association_request_timeout
            sock.settimeout(settings.association_request_timeout)
            return assoc

    return PolicyRequestHandler


class StorageSCP:
    """The node's DICOM listener.

    Parameters
    ----------
    settings : Settings
        AE title, address, timeouts, limits and TLS files.
    policy : AssociationPolicy
        Which calling AEs may associate and from where.
    ingest : Ingest
        Makes received datasets durable.
    on_release : callable
        ``on_release(calling_ae, study_uids)`` after an association is released normally.
    """

    def __init__(
        self,
        settings: Settings,
        policy: AssociationPolicy,
        ingest: Ingest,
        on_release: Any,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.ingest = ingest
        self.on_release = on_release
        self._associations: dict[int, _AssociationLog] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self.admission = Admission(settings.max_pending_per_peer)
        #: Refused connections and associations by reason (``/metrics``).
        self.refusals = Refusals()
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        syntaxes = decodable_transfer_syntaxes()
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification, syntaxes)
        ae.require_called_aet = True
        ae.require_calling_aet = self.policy.allowed_titles()
        ae.maximum_associations = s.max_associations + PENDING_LIMIT
        ae.maximum_pdu_size = s.max_pdu_size
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        return ae

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(s.tls_cert, s.tls_key)
        if s.tls_client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(s.tls_client_ca)
        return context

    @property
    def port(self) -> int:
        """The port actually bound (useful when configured as 0)."""
        if self._server is None:
            raise RuntimeError("SCP not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in a background thread."""
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        server = self.ae.make_server(
            (self.settings.dicom_host, self.settings.dicom_port),
            ae_title=self.settings.ae_title,
            ssl_context=self._ssl_context(),
            evt_handlers=handlers,
            server_class=ThreadedAssociationServer,
            request_handler=_request_handler(
                self.policy, self.admission, self.settings, self.refusals
            ),
        )
        self._server = server
        # As AE.start_server does: AE.shutdown() then stops the server and its associations.
        self.ae._servers.append(server)
        self._thread = threading.Thread(target=server.serve_forever, name="scp", daemon=True)
        self._thread.start()
        LOGGER.info(
            "SCP %s listening on %s:%d%s",
            self.settings.ae_title,
            self.settings.dicom_host,
            self.port,
            " (TLS)" if self.settings.tls_cert else "",
        )

    def stop(self) -> None:
        """Stop accepting, close open associations."""
        self.ae.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _on_conn_close(self, event: Event) -> None:
        self.admission.settle(event.assoc)

    def _on_echo(self, event: Event) -> int:
        return int(Status.SUCCESS)

    def _on_established(self, event: Event) -> None:
        calling_ae = event.assoc.requestor.ae_title.strip()
        with self._lock:
            self._associations[id(event.assoc)] = _AssociationLog(calling_ae)

    def _on_store(self, event: Event) -> int:
        log = self._association_log(event.assoc)
        sop_class = str(event.request.AffectedSOPClassUID)
        log.sop_classes[sop_class] += 1
        try:
            stored = self.ingest.store(event.encoded_dataset(), log.calling_ae)
        except NoduleAIError as exc:
            status = status_for(exc)
            log.outcomes[status.name] += 1
            LOGGER.warning(
                "C-STORE of %s from %s refused with %s (0x%04X): %s",
                sop_class,
                log.calling_ae,
                status.name,
                status,
                exc,
            )
            return int(status)
        except Exception as exc:
            status = status_for(exc)
            log.outcomes[status.name] += 1
            LOGGER.exception("C-STORE of %s from %s failed", sop_class, log.calling_ae)
            return int(status)
        if stored.own_result:  # our own result object sent back: stored, not study input
            log.outcomes["OWN_RESULT"] += 1
            return int(Status.SUCCESS)
        log.studies.add(stored.header.study_instance_uid)
        problems = [
            *(f"lacks {kw}" for kw in stored.header.missing),
            *(f"non-conforming {what}" for what in stored.header.nonconforming),
        ]
        if problems:
            log.outcomes[Status.DATASET_MISMATCH_WARNING.name] += 1
            LOGGER.warning(
                "C-STORE of %s from %s stored with warning 0xB007: %s",
                sop_class,
                log.calling_ae,
                "; ".join(problems),
            )
            return int(Status.DATASET_MISMATCH_WARNING)
        log.outcomes["DUPLICATE" if stored.duplicate else "SUCCESS"] += 1
        return int(Status.SUCCESS)

    def _association_log(self, assoc: Association) -> _AssociationLog:
        with self._lock:
            log = self._associations.get(id(assoc))
            if log is None:
                log = _AssociationLog(assoc.requestor.ae_title.strip())
                self._associations[id(assoc)] = log
            return log

    def _finish(self, assoc: Association, how: str) -> _AssociationLog | None:
        with self._lock:
            log = self._associations.pop(id(assoc), None)
        if log is not None:
            LOGGER.info(
                "association from %s %s: %s; SOP classes %s",
                log.calling_ae,
                how,
                dict(log.outcomes) or "no C-STORE",
                dict(log.sop_classes),
            )
        return log

    def _on_released(self, event: Event) -> None:
        log = self._finish(event.assoc, "released")
        if log is not None and log.studies:
            try:
                self.on_release(log.calling_ae, sorted(log.studies))
            except Exception:
                LOGGER.exception("completeness on release failed; the quiet period applies")

    def _on_aborted(self, event: Event) -> None:
        self._finish(event.assoc, "aborted")
