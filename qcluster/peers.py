"""Network peers as the limits count them (the dashboard's login throttle and connection
caps, the metrics endpoint's caps)."""

from __future__ import annotations

import ipaddress


def client_key(address: str) -> str:
    """``address`` as a limit counts it: an IPv6 address by its /64 (what one host is
    given, any address of which it may use), an IPv4 or IPv4-mapped IPv6 address as the
    IPv4 one, so that every spelling of one address counts as one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
