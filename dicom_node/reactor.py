"""Event-driven reactors for accepted associations: wait for work instead of sleep-polling.

What pynetdicom does
--------------------
Each association runs two threads (pynetdicom 3.0.4):

* the DUL service provider (:meth:`pynetdicom.dul.DULServiceProvider.run_reactor`) loops over
  "encode one primitive queued by the service user, or read one PDU from the socket, then run one
  state-machine event", and when a pass finds nothing to do it sleeps ``_run_loop_delay``
  (1 ms) before polling the socket again with a zero-timeout ``select``;
* the association reactor (:meth:`pynetdicom.association.Association._run_reactor`) sleeps 1 ms at
  the top of *every* pass, then polls the DIMSE provider for a complete message and the DUL for an
  A-RELEASE or A-ABORT.

Why that is slow
----------------
A storage SCU such as ``storescu`` sends one C-STORE and waits for its response, so each instance
pays the association reactor's 1 ms sleep before its handler runs and, usually, the DUL's idle sleep
before the response is encoded and sent, plus the same on the next request's PDUs. On Linux a
``time.sleep(0.001)`` lasts about 1.1 ms; with a handler that does real work the stock SCP tops out
near 280 instances/s whatever the handler, while DCMTK's ``storescp`` does about 1,500/s.

What this module changes
------------------------
:func:`install` turns a freshly created acceptor :class:`~pynetdicom.association.Association`
(not yet started) into one whose two reactors *block until there is work*, with the same loop
bodies as 3.0.4 otherwise:

* the DUL waits in ``select()`` on the peer socket and on a wake-up socket pair, written to when
  the service user queues a primitive (:meth:`~pynetdicom.dul.DULServiceProvider.send_pdu`) or the
  reactor is asked to stop; a TLS socket with decrypted bytes pending is not waited on;
* after each state-machine action that leaves a complete DIMSE message or an ACSE primitive for
  the service user, the DUL sets a :class:`threading.Event` that the association reactor waits
  on instead of sleeping; killing the association or the DUL thread ending sets it too;
* the association reactor reports itself paused while it waits (it touches nothing until it has
  passed pynetdicom's ``_reactor_checkpoint`` again), so ``release()``/``abort()`` do not spin.

Both waits have a bounded timeout (:data:`IDLE_WAIT`, 50 ms) so that timers (ARTIM, the network
idle timeout) and anything that bypasses the wake-ups (a connection closed from another thread)
are still noticed, at 20 wake-ups a second per idle thread instead of a thousand. Nothing spins.

Measured on the two-core development VM (``benchmarks/ingest.py``): an idle open association
costs the node process about 60 voluntary context switches/s instead of 1,800; the time per
512 KB C-STORE spent outside the handler fell from about 3.0 ms to 2.1-2.5 ms. What remains is
Python work (PDU decoding, DIMSE assembly, the dataset copy, the response) and the durable
handler itself, whose fsyncs dominate on a shared disk.

Robustness
----------
The loop bodies are copies of pynetdicom 3.0.4's, with these additions: an exception while the
DUL state machine handles an event (a malformed PDU from the peer), or while the association
thread negotiates a request that decoded but makes no sense, aborts the association instead of
killing the thread; and a DIMSE request lacking a required command element (a C-STORE without
its Affected SOP Instance UID, say), which pynetdicom drops without a word so that the sender waits
out its timeout, is answered: a C-STORE with its Message ID gets 0xA900 (data set does not match
the SOP class), anything else an A-ABORT. With any other version, with
``pynetdicom._config.PASS_CONTEXTVARS`` set, or for a requestor association, :func:`install`
logs a warning (once) and leaves the association as it is: stock behaviour, just slower.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
from collections.abc import Callable
from typing import cast

import pynetdicom
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE, DimseServiceType
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import _PDUPrimitiveType

from dicom_node.status import Status

LOGGER = logging.getLogger(__name__)

#: The pynetdicom versions whose reactor loops this module reproduces.
SUPPORTED_VERSIONS = frozenset({"3.0.4"})

#: Longest a reactor waits without a wake-up (seconds): bounds timer and shutdown latency.
IDLE_WAIT = 0.05

_warned = False


def supported() -> str | None:
    """Return why the event-driven reactors cannot be used here, or ``None`` when they can."""
    if pynetdicom.__version__ not in SUPPORTED_VERSIONS:
        return (
            f"pynetdicom {pynetdicom.__version__} is not one of "
            f"{', '.join(sorted(SUPPORTED_VERSIONS))}"
        )
    if _config.PASS_CONTEXTVARS:
        return "pynetdicom._config.PASS_CONTEXTVARS is set"
    return None


def install(assoc: Association, on_malformed: Callable[[], None] | None = None) -> Association:
    """Make the acceptor ``assoc`` (created, not yet started) wait for work instead of polling.

    Returns ``assoc`` itself, changed in place, or unchanged (stock pynetdicom behaviour, with a
    warning logged once) when :func:`supported` says no or ``assoc`` is not an acceptor.
    ``on_malformed`` is called when the peer's malformed request is aborted (for counting).
    """
    global _warned
    reason = supported()
    if reason is None and not assoc.is_acceptor:
        reason = "the association is not an acceptor"
    if reason is None and (assoc.is_alive() or assoc.dul.is_alive()):
        reason = "the association has already started"
    if reason is not None:
        if not _warned:
            LOGGER.warning("event-driven reactor not installed (%s): stock 1 ms polling", reason)
            _warned = True
        return assoc
    # pynetdicom's RequestHandler constructs Association and DULServiceProvider itself, so the
    # subclasses are applied to the new, not yet started instances: they add methods and the few
    # attributes set here, and change nothing else about the objects.
    assoc.__class__ = EventDrivenAssociation
    dul = assoc.dul
    dul.__class__ = EventDrivenDUL
    activity = threading.Event()
    cast(EventDrivenAssociation, assoc)._activity = activity
    cast(EventDrivenDUL, dul)._init_wakeups(activity, on_malformed)
    return assoc


class EventDrivenAssociation(Association):
    """An acceptor association whose reactor blocks on an event instead of sleeping 1 ms."""

    _activity: threading.Event

    def kill(self) -> None:
        """Kill the association thread, waking its reactor at once."""
        self._kill = True
        self._activity.set()
        super().kill()

    def run(self) -> None:
        """The thread body; :class:`threading.Thread` would call the target bound when the
        stock class was constructed, so ``run`` is overridden to reach :meth:`run_reactor`."""
        self.run_reactor()

    def run_reactor(self) -> None:
        """pynetdicom's association thread body, with a crash-proof boundary: a request that
        decodes but cannot be negotiated (a presentation context without an abstract syntax,
        say) raises in the negotiation; the association is aborted and closed instead of the
        thread ending with the peer unanswered."""
        try:
            super().run_reactor()
        except Exception as exc:
            LOGGER.warning(
                "malformed request from the peer (%s: %s); association aborted",
                type(exc).__name__,
                exc,
            )
            dul = cast(EventDrivenDUL, self.dul)
            dul._abort_on_error()
            if dul._on_malformed is not None:
                dul._on_malformed()

    def _serve_request(self, msg: DimseServiceType, context_id: int) -> None:
        """pynetdicom's dispatch, but an incomplete request is answered, never dropped."""
        if msg.is_valid_request or self._sent_release:
            super()._serve_request(msg, context_id)
            return
        on_malformed = cast(EventDrivenDUL, self.dul)._on_malformed
        if on_malformed is not None:
            on_malformed()
        if isinstance(msg, C_STORE) and msg.MessageID is not None:
            LOGGER.warning("C-STORE request without a required element: answered 0xA900")
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = msg.MessageID
            if msg.AffectedSOPClassUID is not None:
                rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
            rsp.Status = int(Status.DATASET_MISMATCH)
            self.dimse.send_msg(rsp, context_id)
            return
        LOGGER.warning("incomplete %s request without a Message ID: aborted", msg.msg_type)
        self.abort()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's acceptor loop, waiting for activity instead of ``sleep(0.001)``."""
        self._is_paused = False
        busy = False
        while not self._kill:
            # Paused while waiting: nothing is touched until the checkpoint below is passed.
            self._is_paused = True
            if not busy:
                self._activity.wait(IDLE_WAIT)
            self._activity.clear()
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            busy = msg is not None
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class EventDrivenDUL(DULServiceProvider):
    """A DUL provider that waits in ``select()`` on the peer socket and a wake-up socket."""

    _activity: threading.Event
    _wake_r: socket.socket | None
    _wake_w: socket.socket | None
    _wake_pending: bool
    _on_malformed: Callable[[], None] | None

    def _init_wakeups(
        self, activity: threading.Event, on_malformed: Callable[[], None] | None = None
    ) -> None:
        self._activity = activity
        self._wake_r = self._wake_w = None
        self._wake_pending = False
        self._on_malformed = on_malformed

    def wake(self) -> None:
        """Wake the reactor if it is waiting (callable from any thread; cheap when repeated)."""
        wake_w = self._wake_w
        if wake_w is None or self._wake_pending or threading.get_ident() == self.ident:
            return  # not running (queues are checked before any wait), already woken, or self
        self._wake_pending = True
        # OSError: closed (the reactor has ended) or full (a wake-up is pending anyway).
        with contextlib.suppress(OSError):
            wake_w.send(b"\0")

    def send_pdu(self, primitive: _PDUPrimitiveType) -> None:
        """Queue a primitive for the peer (see pynetdicom) and wake the reactor to send it."""
        super().send_pdu(primitive)
        self.wake()

    def kill_dul(self) -> None:
        """Stop the reactor, waking it."""
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        """Stop the reactor if in Sta1 (see pynetdicom), waking it so that it exits at once."""
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.wake()
        return bool(super().stop_dul())

    def run(self) -> None:
        """The thread body: the reactor, then a last wake-up for the association reactor.

        :class:`threading.Thread` would call the target bound when the stock class was
        constructed, so ``run`` is overridden to reach :meth:`run_reactor` here.
        """
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        try:
            self.run_reactor()
        finally:
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = None
            wake_r.close()
            wake_w.close()
            self._activity.set()

    def _wait(self) -> None:
        """Block until the socket is readable, a wake-up arrives, or :data:`IDLE_WAIT` passes."""
        if self.event_queue.queue or self.to_provider_queue.queue:
            return
        assoc_sock = self.socket
        sock = assoc_sock.socket if assoc_sock is not None else None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        wake_r = cast(socket.socket, self._wake_r)
        waiting: list[socket.socket] = [wake_r]
        if sock is not None and sock.fileno() >= 0:
            waiting.append(sock)
        try:
            readable, _, _ = select.select(waiting, [], [], IDLE_WAIT)
        except (OSError, ValueError):
            return  # the socket was closed under us: the loop body reports it
        if wake_r in readable:
            self._wake_pending = False
            try:
                while wake_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

    def _abort_on_error(self) -> None:
        """Send an A-ABORT (service provider, reason not specified), close, end both reactors."""
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        if self.socket is not None:
            with contextlib.suppress(OSError):
                self.socket.send(abort_pdu.encode())
            with contextlib.suppress(OSError):
                self.socket.close()
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True
        # An acceptor still waiting for its A-ASSOCIATE-RQ takes ``None`` as the end of its ACSE
        # wait (pynetdicom 3.0.4 Association.run_reactor): it ends now, not after acse_timeout,
        # and its slot is free again.
        self.to_user_queue.put(None)  # type: ignore[arg-type]

    def _user_has_work(self) -> bool:
        return bool(self.assoc.dimse.msg_queue.queue or self.to_user_queue.queue)

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's DUL loop, waiting in ``select()`` instead of sleeping 1 ms."""
        self._idle_timer.start()
        wait = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                wait = True

            if wait:
                self._wait()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                if self.socket is None or self.socket.socket is None:
                    # Not in pynetdicom 3.0.4, which logs a traceback here: the association's
                    # own thread closed the connection (a rejection, a kill) while this one was
                    # about to read from it. That is the end of the connection, not a fault.
                    LOGGER.debug("connection closed while reading (%s)", type(exc).__name__)
                else:
                    LOGGER.error("Exception in DUL.run(), aborting association")
                    LOGGER.exception(exc)
                self._abort_on_error()
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                wait = True
                continue

            try:
                self.state_machine.do_action(event)
            except Exception as exc:
                # Not in pynetdicom 3.0.4, whose thread dies here (a peer's malformed PDU, such
                # as an even presentation context ID, raises while the state machine handles it)
                # and leaves the peer unanswered and the slot held: abort and close instead.
                LOGGER.warning(
                    "malformed request from the peer (%s: %s); association aborted",
                    type(exc).__name__,
                    exc,
                )
                self._abort_on_error()
                if self._on_malformed is not None:
                    self._on_malformed()
                return
            wait = False
            if self._user_has_work():
                self._activity.set()
