"""SOFARPC provider URLs as sofa-rpc-node 2.10 publishes them in ZooKeeper
(lib/registry/zk/data_client.js), and the filter its subscriber applies (``_isMatch``).

A provider is one ephemeral child of ``<root>/<interface>/providers`` with no data, named
by its URL encoded as ``encodeURIComponent`` does, for example (decoded)::

    bolt://10.0.0.5:12200?startTime=1700000000000&pid=42&uniqueId=&dynamic=true&appName=
    &timeout=3000&serialization=hessian2&weight=100&accepts=100000&language=nodejs
    &rpcVer=50400&protocol=&interface=com.example.EchoService&version=1.0&group=SOFA

Pure functions: no ZooKeeper here (fastmesh.registry.zk), so they are unit-tested alone.
A child that is not a provider URL is skipped, never an error that stops the others.
"""
from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional
from urllib.parse import parse_qsl, quote, unquote, urlsplit

DEFAULT_PORT = 12200            # sofa-rpc-node's consumer: a URL without a port means this
DEFAULT_WEIGHT = 100            # SOFARPC's default provider weight
MAX_WEIGHT = 2 ** 31 - 1
# the parameters that decide routing; all the others are kept as attributes, shown in /clusters
ROUTING_KEYS = ("interface", "version", "group", "category", "enabled", "uniqueId", "weight",
                "warmupTime", "warmupWeight", "startTime", "protocol")


@dataclass(frozen=True)
class ServiceSpec:
    """What a cluster subscribes to: the Bolt service id split, and the group."""
    interface: str
    version: str
    group: str = "SOFA"
    unique_id: str = ""          # "interface:version:uniqueId" form
    protocol: str = "bolt"

    @classmethod
    def parse(cls, service: str, group: str = "SOFA", protocol: str = "bolt") -> "ServiceSpec":
        """"interface:version" (the Bolt `service` header) -> spec; ValueError if malformed."""
        interface, sep, rest = service.partition(":")
        if not sep or not interface or not rest:
            raise ValueError(f'expected "interface:version", got {service!r}')
        version, _, unique_id = rest.partition(":")
        return cls(interface, version, group, unique_id, protocol)


@dataclass(frozen=True)
class Provider:
    url: str                     # decoded
    scheme: str
    host: str                    # IP or hostname, without brackets
    port: int
    params: dict = field(compare=False, hash=False)   # query parameters (last value wins)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def weight(self, now_ms: Optional[int] = None) -> int:
        """`weight` (default 100; 0 or below: not routed to); during warm-up (startTime +
        warmupTime ahead of now) `warmupWeight` instead, as SOFARPC's Java provider does."""
        w = _int(self.params.get("weight"), DEFAULT_WEIGHT)
        warm_until = self.warm_until_ms()
        if warm_until is not None:
            now_ms = int(time.time() * 1000) if now_ms is None else now_ms
            if now_ms < warm_until:
                w = _int(self.params.get("warmupWeight"), w)
        return max(0, min(w, MAX_WEIGHT))

    def warm_until_ms(self) -> Optional[int]:
        start = _int(self.params.get("startTime"), None)
        warm = _int(self.params.get("warmupTime"), None)
        if start is None or not warm or warm <= 0 or "warmupWeight" not in self.params:
            return None
        return start + warm

    def attributes(self) -> dict:
        """The parameters that do not decide routing, for /clusters."""
        return {k: v for k, v in self.params.items() if k not in ROUTING_KEYS}


def _int(v, default):
    if v is None:
        return default
    try:
        return int(str(v).strip())
    except ValueError:
        return default


def decode_child(name: str) -> str:
    """A child node's name -> the provider URL (decodeURIComponent)."""
    return unquote(name, errors="strict")


def encode_child(url: str) -> str:
    """A provider URL -> the child node's name (encodeURIComponent's safe set)."""
    return quote(url, safe="!~*'()")


def parse_provider(url: str) -> Optional[Provider]:
    """A decoded provider URL -> Provider, or None when it is not one (no host, bad port)."""
    if not isinstance(url, str) or "://" not in url or len(url) > 65536:
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not host:
        return None
    if port is None:
        port = DEFAULT_PORT
    if not 0 < port <= 65535:
        return None
    if ":" in host:
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            return None
    elif not _plain_host(host):
        return None
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    if "interface" not in params and parts.path.strip("/"):
        params.setdefault("interface", parts.path[1:])
    return Provider(url, parts.scheme.lower(), host, port, params)


def _plain_host(host: str) -> bool:
    if len(host) > 253:
        return False
    return all(label and len(label) <= 63 and all(c.isalnum() or c in "-_" for c in label)
               for label in host.rstrip(".").split("."))


def matches(p: Provider, spec: ServiceSpec) -> bool:
    """sofa-rpc-node's subscriber filter (ZookeeperRegistry._isMatch), plus the protocol
    (a Bolt listener cannot forward to a provider of another protocol) and the uniqueId of
    an "interface:version:uniqueId" service."""
    q = p.params
    interface = q.get("interface")
    if interface and interface != spec.interface:
        return False
    category = q.get("category")
    if category and category != "providers":
        return False
    enabled = q.get("enabled")
    if enabled and enabled != "true":
        return False
    group = q.get("group") or q.get("default.group")
    if spec.group and group and group != spec.group:
        return False
    version = q.get("version") or q.get("default.version")
    if spec.version and version and version != spec.version:
        return False
    if spec.unique_id and q.get("uniqueId", "") != spec.unique_id:
        return False
    if spec.protocol:
        # the `protocol` parameter when set (sofa-rpc-node leaves it empty), else the scheme
        if (q.get("protocol") or p.scheme) != spec.protocol:
            return False
    return True


@dataclass(frozen=True)
class Selection:
    """The providers of one service as they stand: what the cluster routes to."""
    providers: tuple          # Provider, one per address, in address order
    weights: tuple            # int > 0 each, same order
    skipped: int = 0          # children that were not matching providers (or not URLs)
    next_change_ms: Optional[int] = None   # a warm-up ends then: select again

    def endpoints(self) -> dict:
        """The worker's endpoint update: {"endpoints": [...], "weights": [...]}."""
        return {"endpoints": [p.address for p in self.providers], "weights": list(self.weights)}


def select(children: Iterable[str], spec: ServiceSpec, now_ms: Optional[int] = None) -> Selection:
    """The children of the providers node -> the providers this service routes to. A
    provider published twice (two URLs, one address) counts once, with the larger weight;
    weight 0 means published but not routed to."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    by_addr: dict = {}
    skipped = 0
    next_change = None
    for name in children:
        try:
            p = parse_provider(decode_child(name))
        except (UnicodeDecodeError, ValueError):
            p = None
        if p is None or not matches(p, spec):
            skipped += 1
            continue
        w = p.weight(now_ms)
        warm = p.warm_until_ms()
        if warm is not None and warm > now_ms:
            next_change = warm if next_change is None else min(next_change, warm)
        if w <= 0:
            skipped += 1
            continue
        key = p.address
        prev = by_addr.get(key)
        if prev is None or w > prev[1]:
            by_addr[key] = (p, w)
    keys = sorted(by_addr)
    return Selection(tuple(by_addr[k][0] for k in keys), tuple(by_addr[k][1] for k in keys),
                     skipped, next_change)


def provider_url(host: str, port: int, interface: str, version: str, group: str,
                 weight: int = DEFAULT_WEIGHT, app_name: str = "", timeout_ms: int = 3000,
                 start_ms: Optional[int] = None, unique_id: str = "") -> str:
    """The URL fastmesh publishes for a service it fronts, in sofa-rpc-node's form."""
    h = f"[{host}]" if ":" in host else host
    params = [("startTime", str(start_ms if start_ms is not None else int(time.time() * 1000))),
              ("pid", str(os.getpid())), ("uniqueId", unique_id), ("dynamic", "true"),
              ("appName", app_name), ("timeout", str(timeout_ms)),
              ("serialization", "hessian2"), ("weight", str(weight)), ("accepts", "100000"),
              ("language", "python"), ("rpcVer", "50400"), ("protocol", "bolt"),
              ("interface", interface), ("version", version), ("group", group)]
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params)
    return f"bolt://{h}:{port}?{query}"


def providers_path(root: str, interface: str) -> str:
    return f"{root.rstrip('/')}/{interface}/providers"
