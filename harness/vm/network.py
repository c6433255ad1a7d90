"""A guest network that reaches only what the test forwards: QEMU user networking, restricted.

The guest gets one NIC on QEMU's user-mode (slirp) network with ``restrict=on``: it can reach
neither the host nor anything beyond it, except through the explicit ``guestfwd`` rules listed
here, each of which connects one guest-side address and port to one port on the host's
loopback address. A server the harness started for the test (an NFS server, say) listens
there, so the guest can talk to it and to nothing else.

QEMU's ``guestfwd=tcp:ADDR:PORT-tcp:127.0.0.1:HOSTPORT`` opens its connection to the host
port when QEMU starts, and keeps that one connection for the VM's life: the server must be
listening before the VM launches, and protocols that open one connection per server (NFSv4)
fit it. The slirp network's built-in DHCP still answers under ``restrict=on``: the guest
gets 10.0.2.15 with gateway 10.0.2.2, or sets them itself (:data:`GUEST_ADDRESS`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from harness.outcome import ConfigError

GUEST_ADDRESS = "10.0.2.15"  # what slirp's DHCP gives the guest
GATEWAY = "10.0.2.2"
NETMASK = "255.255.255.0"
SERVICE_ADDRESS = "10.0.2.100"  # where forwarded services appear to the guest
LOOPBACK = "127.0.0.1"
_SLIRP_NET = ipaddress.ip_network("10.0.2.0/24")
# Addresses slirp itself answers on: a forward there would shadow its DHCP or gateway.
_RESERVED = {ipaddress.ip_address(a) for a in ("10.0.2.2", "10.0.2.3", "10.0.2.15")}
NICS = ("e1000", "virtio-net-pci")


@dataclass(frozen=True)
class GuestForward:
    """Guest connections to ``guest_address:guest_port`` go to ``127.0.0.1:host_port``."""

    host_port: int
    guest_port: int
    guest_address: str = SERVICE_ADDRESS

    def rule(self) -> str:
        """The ``guestfwd=`` value for QEMU's ``-netdev user``."""
        return f"tcp:{self.guest_address}:{self.guest_port}-tcp:{LOOPBACK}:{self.host_port}"


@dataclass(frozen=True)
class UserNetwork:
    """One NIC on a restricted user-mode network with explicit forwards to loopback ports.

    ``nic`` is the QEMU device model: ``e1000`` (the kernel's NFS root needs a built-in
    driver, and minimal kernels build e1000 in) or ``virtio-net-pci``.
    """

    forwards: Sequence[GuestForward] = ()
    nic: str = "e1000"
    netdev_id: str = "net0"
    mac: str = "52:54:00:12:34:56"

    def __post_init__(self) -> None:
        if self.nic not in NICS:
            raise ConfigError(f"network card {self.nic!r}: use one of {', '.join(NICS)}")
        seen: set[tuple[str, int]] = set()
        for forward in self.forwards:
            try:
                address = ipaddress.ip_address(forward.guest_address)
            except ValueError:
                raise ConfigError(
                    f"guest forward address {forward.guest_address!r} is not an IP address"
                ) from None
            if address not in _SLIRP_NET or address in _RESERVED:
                raise ConfigError(
                    f"guest forward address {address} must be in {_SLIRP_NET} and not one of "
                    f"slirp's own ({', '.join(sorted(map(str, _RESERVED)))})"
                )
            for port in (forward.guest_port, forward.host_port):
                if not 0 < port < 65536:
                    raise ConfigError(f"guest forward port {port} is out of range")
            key = (forward.guest_address, forward.guest_port)
            if key in seen:
                raise ConfigError(f"two guest forwards for {key[0]}:{key[1]}")
            seen.add(key)

    def netdev(self) -> str:
        """The ``-netdev`` value: restricted user networking plus each forward."""
        words = [f"user,id={self.netdev_id},restrict=on"]
        words += [f"guestfwd={forward.rule()}" for forward in self.forwards]
        return ",".join(words)

    def args(self) -> list[str]:
        """QEMU arguments (for ``extra_args``): the netdev and the NIC on it."""
        return [
            "-netdev",
            self.netdev(),
            "-device",
            f"{self.nic},netdev={self.netdev_id},mac={self.mac}",
        ]

    def kernel_ip(self, device: str = "eth0") -> str:
        """A static ``ip=`` kernel parameter for IP_PNP (no DHCP round trip under TCG)."""
        return f"ip={GUEST_ADDRESS}::{GATEWAY}:{NETMASK}::{device}:off"
