"""Network peers as the limits count them (the dashboard's login throttle and connection
caps, the metrics endpoint's caps) and the proxies ``[web] trusted_proxies`` names.

A dual-stack listener sees an IPv4 peer as an IPv4-mapped IPv6 address
(``::ffff:192.0.2.1``), and a config may write an IPv4 proxy that way too: both are taken
as the IPv4 address or network they name, everywhere here.
"""

from __future__ import annotations

import ipaddress

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Networks = tuple[Network, ...]
MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def address_of(text: str) -> Address | None:
    """``text`` as an address (IPv4-mapped as IPv4), or None if it is not one."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def network_of(entry: str) -> Network:
    """A ``trusted_proxies`` entry as a network (IPv4-mapped as IPv4); ValueError if it
    is none."""
    net = ipaddress.ip_network(entry)
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(MAPPED):
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net


def too_wide(net: Network) -> bool:
    """Whether trusting ``net`` trusts much of the internet: an IPv4 network wider than
    /8, an IPv6 one wider than /32, or one holding every IPv4-mapped address."""
    if isinstance(net, ipaddress.IPv4Network):
        return net.prefixlen < 8
    return net.prefixlen < 32 or net.supernet_of(MAPPED)


def trusted_networks(entries: tuple[str, ...]) -> Networks:
    return tuple(network_of(e) for e in entries)


def within(address: str, networks: Networks) -> bool:
    ip = address_of(address)
    return ip is not None and any(ip in n for n in networks)


def client_key(address: str) -> str:
    """``address`` as a limit counts it: an IPv6 address by its /64 (what one host is
    given, any address of which it may use), an IPv4 or IPv4-mapped IPv6 address as the
    IPv4 one, so that every spelling of one address counts as one."""
    ip = address_of(address)
    if ip is None:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
