"""Deterministic UIDs for the objects NoduleAI writes (PS3.5 B.2, "2.25" UUID-derived UIDs).

Results are delivered at least once: a redelivered job, or a rerun of the same series with the
same model, must produce byte-identical identities so that a PACS stores each object once. Every
UID written by the encoders is therefore ``2.25.<integer of a uuid5>`` of a fixed project
namespace and the inputs that define the result (:func:`derive_uid`).

What each UID depends on (:class:`ResultUIDs`):

* **Series** (SEG, SR, GSPS SeriesInstanceUID): the source SeriesInstanceUID, the model version
  and the object kind. Reruns of the same source series with the same model put their objects in
  the same result series, so a rerun after late instances adds a new version next to its
  predecessor instead of scattering series.
* **Instances** (SOPInstanceUID of SEG, SR, GSPS) and **per-nodule tracking UIDs**
  (TrackingUniqueIdentifier, TID 1500 / TID 4108): additionally the *sorted set* of source
  SOPInstanceUIDs. Reprocessing the same instances gives the same UIDs; a different instance set
  (late instances arrived) gives new ones, and the new SR names its predecessor
  (PredecessorDocumentsSequence, PS3.3 C.17.2.3).
* **Revision**: a study's first result is revision 1; a result that replaces an earlier one of
  different content is the next revision (its InstanceNumber), and from revision 2 on the
  revision is part of the instance and tracking UIDs too, so that one UID never names two
  contents (a model rolled back to an earlier version on the same instances, say).
* **Key images** (:meth:`ResultUIDs.key_image_uids`): one series per source series and model,
  one instance per finding, derived like the tracking UIDs.
* **Rejection note** (:meth:`ResultUIDs.rejection_uids`): its own series per source series and
  model; its instance from the SR it accompanies and the set of UIDs it rejects.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

#: The project namespace for uuid5 (fixed forever: changing it changes every result UID).
NAMESPACE = uuid.UUID("0b8f6f3e-5f55-5a4e-9c1d-6e6f64756c65")

#: Object kinds that get their own series and instance UIDs.
KINDS = ("seg", "sr", "gsps")


def derive_uid(*parts: str) -> str:
    """A ``2.25`` UID (PS3.5 B.2) from a uuid5 of the project namespace and ``parts``.

    Parameters
    ----------
    *parts : str
        The identity of the object; joined with a unit separator, so ``("a", "bc")`` and
        ``("ab", "c")`` differ.

    Returns
    -------
    str
        ``"2.25."`` followed by the uuid's 128-bit integer (at most 44 characters, within the
        64-character UI limit).
    """
    return f"2.25.{uuid.uuid5(NAMESPACE, chr(0x1F).join(parts)).int}"


def prior_identity(study_uid: str, instance_uids: Iterable[str], findings_from: str) -> str:
    """The identity of a comparison's prior in the result UIDs: the prior study, the instances
    it was read from and where its nodules came from."""
    return f"prior {study_uid} {instance_set_digest(instance_uids)} {findings_from}"


def instance_set_digest(sop_instance_uids: Iterable[str]) -> str:
    """SHA-256 of the sorted, de-duplicated SOPInstanceUIDs (order of arrival does not matter)."""
    joined = "\n".join(sorted(set(sop_instance_uids)))
    return hashlib.sha256(joined.encode("ascii", "replace")).hexdigest()


@dataclass(frozen=True)
class ResultUIDs:
    """Every UID of one encoding run, derived from its inputs.

    Parameters
    ----------
    source_series_uid : str
        SeriesInstanceUID of the CT series the nodules were found in.
    source_instance_uids : tuple of str
        SOPInstanceUIDs of the instances used (any order; they are sorted).
    model_version : str
        Model name and version (e.g. ``"noduleai-stage2 1.2.0"``); a new model gives new objects.
    revision : int
        1 for a study's first result; from 2 on part of the instance and tracking UIDs.
    prior : str
        What the result was compared with (:func:`prior_identity`; "" for none): part of the
        instance and tracking UIDs when set, since a comparison changes the content.
    """

    source_series_uid: str
    source_instance_uids: tuple[str, ...]
    model_version: str
    revision: int = 1
    prior: str = ""
    instance_digest: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "source_instance_uids", tuple(sorted(set(self.source_instance_uids)))
        )
        object.__setattr__(self, "instance_digest", instance_set_digest(self.source_instance_uids))

    @classmethod
    def create(
        cls,
        source_series_uid: str,
        source_instance_uids: Iterable[str],
        model_version: str,
        revision: int = 1,
        prior: str = "",
    ) -> ResultUIDs:
        """Build from any iterable of instance UIDs."""
        return cls(source_series_uid, tuple(source_instance_uids), model_version, revision, prior)

    def _identity(self) -> tuple[str, ...]:
        """What instance and tracking UIDs derive from (the revision only from 2 on and the
        prior only when set, so that first results keep the UIDs they always had)."""
        base: tuple[str, ...] = (self.source_series_uid, self.instance_digest, self.model_version)
        if self.prior:
            base = (*base, self.prior)
        return base if self.revision == 1 else (*base, f"revision {self.revision}")

    def series_uid(self, kind: str) -> str:
        """SeriesInstanceUID of the ``kind`` (``seg``, ``sr``, ``gsps``) result series."""
        _check_kind(kind)
        return derive_uid("series", kind, self.source_series_uid, self.model_version)

    def instance_uid(self, kind: str) -> str:
        """SOPInstanceUID of the ``kind`` object for this exact instance set."""
        _check_kind(kind)
        return derive_uid("instance", kind, *self._identity())

    def tracking_uid(self, index: int) -> str:
        """TrackingUniqueIdentifier of nodule ``index`` (0-based, in the order reported)."""
        return derive_uid("nodule", str(index), *self._identity())

    def key_image_uids(self, index: int) -> tuple[str, str]:
        """(SeriesInstanceUID, SOPInstanceUID) of finding ``index``'s key image (0-based)."""
        series = derive_uid("series", "key-images", self.source_series_uid, self.model_version)
        return series, derive_uid("key-image", str(index), *self._identity())

    def heatmap_uids(self) -> tuple[str, str]:
        """(SeriesInstanceUID, SOPInstanceUID) of the screening heatmap (Parametric Map)."""
        series = derive_uid("series", "heatmap", self.source_series_uid, self.model_version)
        return series, derive_uid("instance", "heatmap", *self._identity())

    def rejection_uids(self, rejected: Iterable[str]) -> tuple[str, str]:
        """(SeriesInstanceUID, SOPInstanceUID) of the rejection note listing ``rejected``."""
        series = derive_uid("series", "rejection", self.source_series_uid, self.model_version)
        instance = derive_uid(
            "instance", "rejection", self.sr_instance_uid, instance_set_digest(rejected)
        )
        return series, instance

    @property
    def seg_series_uid(self) -> str:
        """SEG SeriesInstanceUID."""
        return self.series_uid("seg")

    @property
    def seg_instance_uid(self) -> str:
        """SEG SOPInstanceUID."""
        return self.instance_uid("seg")

    @property
    def sr_series_uid(self) -> str:
        """SR SeriesInstanceUID."""
        return self.series_uid("sr")

    @property
    def sr_instance_uid(self) -> str:
        """SR SOPInstanceUID."""
        return self.instance_uid("sr")

    @property
    def gsps_series_uid(self) -> str:
        """GSPS SeriesInstanceUID."""
        return self.series_uid("gsps")

    @property
    def gsps_instance_uid(self) -> str:
        """GSPS SOPInstanceUID."""
        return self.instance_uid("gsps")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown result kind {kind!r}; expected one of {KINDS}")
