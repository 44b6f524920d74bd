"""Association policy: which calling AEs may connect, from where, and how their studies complete."""

from __future__ import annotations

import ipaddress
import logging

from dicom_node.config import AEPolicy, IPNetwork, NodeConfig

LOGGER = logging.getLogger(__name__)


class AssociationPolicy:
    """The per-AE rules of the YAML configuration, ready for lookups.

    Parameters
    ----------
    config : NodeConfig
        The YAML configuration. Without ``ae_policies`` every calling AE is accepted.
    default_quiet_seconds : float
        Quiet period of AEs whose policy does not set one.
    """

    def __init__(self, config: NodeConfig, default_quiet_seconds: float) -> None:
        self.config = config
        self.default_quiet_seconds = default_quiet_seconds
        self._policies = {p.ae_title: p for p in config.ae_policies}
        self._networks: dict[str, list[IPNetwork]] = {
            p.ae_title: p.networks() for p in config.ae_policies
        }

    @property
    def restricted(self) -> bool:
        """Whether only listed AEs may associate."""
        return bool(self._policies)

    def allowed_titles(self) -> list[str]:
        """The calling AE titles on the allow-list (empty: any)."""
        return sorted(self._policies)

    def for_ae(self, calling_ae: str) -> AEPolicy:
        """The policy of ``calling_ae`` (the default policy for unlisted AEs)."""
        return self._policies.get(calling_ae.strip()) or AEPolicy(
            ae_title=calling_ae.strip() or "?"
        )

    def allows(self, calling_ae: str, address: str) -> bool:
        """Whether ``calling_ae`` may associate from ``address``."""
        if not self.restricted:
            return True
        networks = self._networks.get(calling_ae.strip())
        if networks is None:
            return False
        if not networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in networks)
