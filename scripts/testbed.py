"""A multi-host testbed: separate hosts, LANs and home NAT routers, as Linux network namespaces.

Every host is a network namespace with its own interfaces, addresses and routes; every network
is a bridge (all bridges live in one "switch" namespace, so nothing is added to the machine's own
namespace); a router is a namespace with a WAN and a LAN interface, IP forwarding, nftables
``masquerade`` on the WAN, a stateful forward filter (``ct state established,related``) and
unsolicited traffic to the router itself dropped on the WAN, as consumer routers do: a home NAT.
(Without that input drop the router answers a hole-punching SYN with a reset, and TCP hole
punching fails every time: measured.) ``symmetric=True`` uses ``masquerade random`` (a new
external port per destination), so hole punching cannot work through it. Links can be cut and
restored. Processes run inside a host
with ``host.popen`` / ``host.argv`` (``ip netns exec``).

Needs root, ``ip`` (iproute2) and ``nft`` (nftables); :func:`unavailable` says why not, so tests
can skip loudly. Only addresses inside the namespaces made here are used. Names carry a short
per-testbed tag, so parallel runs and a crashed earlier run never collide.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

_counter = itertools.count()


def _run(argv: Sequence[str], *, input: str | None = None) -> str:
    res = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=30)
    if res.returncode != 0:
        raise TestbedError(f"{' '.join(argv)}: {res.stderr.strip() or res.returncode}")
    return res.stdout


class TestbedError(Exception):
    """A namespace, link or firewall command failed."""


def unavailable() -> str | None:
    """Why a testbed cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root, as CI does)"
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"'{tool}' is missing (apt-get install {pkg})"
    probe = f"rhprobe{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "netns", "exec", probe, "nft", "list", "tables"])
    except (TestbedError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace with nftables: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Network:
    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    gateway: str | None = None  # a router's LAN address, the hosts' default route
    _next: int = 10

    def allocate(self) -> str:
        addr = str(self.subnet.network_address + self._next)
        self._next += 1
        return addr


@dataclass
class Host:
    testbed: Testbed
    name: str
    ns: str
    addr: str
    network: Network
    port: str  # the bridge port (in the switch namespace) of this host's link
    extra: dict[str, str] = field(default_factory=dict)

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def run(self, *cmd: str) -> str:
        return _run(self.argv(*cmd))

    def popen(self, cmd: Sequence[str], **kw: object) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*cmd), **kw)  # type: ignore[call-overload]

    def cut(self) -> None:
        """Unplug this host's cable (its bridge port goes down; established connections stall)."""
        self.testbed._switch("ip", "link", "set", self.port, "down")

    def restore(self) -> None:
        self.testbed._switch("ip", "link", "set", self.port, "up")


@dataclass
class Router(Host):
    wan_addr: str = ""
    lan: Network | None = None


class Testbed:
    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"rh{os.getpid() % 100000}x{next(_counter)}"
        self.switch_ns = f"{self.tag}-sw"
        self._namespaces: list[str] = []
        self._links = itertools.count()
        self.networks: dict[str, Network] = {}
        self.hosts: dict[str, Host] = {}
        self._ns(self.switch_ns)

    # --- building ------------------------------------------------------------------------------
    def _ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])

    def _switch(self, *cmd: str) -> str:
        return _run(["ip", "netns", "exec", self.switch_ns, *cmd])

    def network(self, name: str, cidr: str) -> Network:
        bridge = f"br{len(self.networks)}"
        self._switch("ip", "link", "add", bridge, "type", "bridge")
        self._switch("ip", "link", "set", bridge, "up")
        net = Network(name, bridge, ipaddress.IPv4Network(cidr))
        self.networks[name] = net
        return net

    def _plug(self, ns: str, net: Network, ifname: str, addr: str) -> str:
        """A veth pair: ``ifname`` inside ``ns`` with ``addr``, its peer a port of ``net``'s bridge."""
        n = next(self._links)
        port, inner = f"p{n}", f"i{n}"
        self._switch("ip", "link", "add", port, "type", "veth", "peer", "name", inner)
        self._switch("ip", "link", "set", inner, "netns", ns)
        self._switch("ip", "link", "set", port, "master", net.bridge)
        self._switch("ip", "link", "set", port, "up")
        inside = ["ip", "netns", "exec", ns]
        _run([*inside, "ip", "link", "set", inner, "name", ifname])
        _run([*inside, "ip", "addr", "add", f"{addr}/{net.subnet.prefixlen}", "dev", ifname])
        _run([*inside, "ip", "link", "set", ifname, "up"])
        return port

    def host(self, name: str, net: Network, addr: str | None = None) -> Host:
        ns = f"{self.tag}-{name}"
        self._ns(ns)
        addr = addr or net.allocate()
        port = self._plug(ns, net, "eth0", addr)
        if net.gateway:
            _run(["ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", net.gateway])
        else:  # no router: multicast (mDNS) still needs a route out of eth0
            _run(["ip", "netns", "exec", ns, "ip", "route", "add", "224.0.0.0/4", "dev", "eth0"])
        h = Host(self, name, ns, addr, net, port)
        self.hosts[name] = h
        return h

    def router(self, name: str, wan: Network, lan_cidr: str, *, symmetric: bool = False) -> Router:
        """A home router: WAN address on ``wan``, a new LAN ``lan_cidr`` behind it (its .1), NAT."""
        ns = f"{self.tag}-{name}"
        self._ns(ns)
        lan = self.network(f"{name}-lan", lan_cidr)
        lan.gateway = str(lan.subnet.network_address + 1)
        wan_addr = wan.allocate()
        port = self._plug(ns, wan, "wan", wan_addr)
        self._plug(ns, lan, "lan", lan.gateway)
        inside = ["ip", "netns", "exec", ns]
        _run([*inside, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        masq = "masquerade random" if symmetric else "masquerade"
        ruleset = f"""
table ip nat {{
  chain postrouting {{ type nat hook postrouting priority srcnat; oifname "wan" {masq}; }}
}}
table ip filter {{
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan" oifname "wan" accept
  }}
}}
"""
        _run([*inside, "nft", "-f", "-"], input=ruleset)
        r = Router(self, name, ns, wan_addr, wan, port, wan_addr=wan_addr, lan=lan)
        self.hosts[name] = r
        return r

    def home(
        self, name: str, wan: Network, lan_cidr: str = "192.168.1.0/24", *, symmetric: bool = False
    ) -> tuple[Router, Host]:
        """A home: a NAT router on ``wan`` and one host behind it (the same private range in
        every home by default, as real homes have)."""
        r = self.router(f"{name}r", wan, lan_cidr, symmetric=symmetric)
        assert r.lan is not None
        return r, self.host(name, r.lan)

    def close(self) -> None:
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
