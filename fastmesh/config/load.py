"""Load a config file into the typed model (``fastmesh.config.model``), validating everything.

Public API::

    load_file(path) -> Config           # YAML (or JSON) file
    load_text(text, source) -> Config   # YAML (or JSON) text
    load_dict(data, source) -> Config   # already-parsed data (dicts, lists, scalars)

Each of them also takes an Envoy v3 bootstrap, recognised by its top-level keys
(``fastmesh.config.envoy.looks_like_bootstrap``) and translated by ``fastmesh.config.envoy``.
    to_dict(cfg) -> dict                # back to plain JSON-serialisable data (admin config dump)
    ConfigError                         # .errors: list of "<path>: <message>", all problems found

Validation never stops at the first problem: every section is checked and all errors are
reported together, each prefixed with the path of the offending value, for example
``route_tables.web.virtual_hosts[0].routes[1].cluster: no cluster named 'x'``.
Defaults are not repeated here; anything not given is left to the dataclass defaults in model.py.
"""
from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
from typing import Any, Optional

import yaml

from .model import (
    SAN_TYPES,
    STRING_MATCH_KINDS,
    TLS_VERSIONS,
    XFCC_DETAILS,
    XFCC_MODES,
    SanMatch,
    TlsContext,
    UpstreamTls,
    Http2Settings,
    HTTP2_LIMITS,
    DEFAULT_ADMIN_ADDRESS,
    LB_POLICIES,
    INSPECTORS,
    LISTENER_PROTOCOLS,
    PROTOCOLS,
    TRANSPORT_PROTOCOLS,
    ChainMatch,
    FilterChain,
    OriginalDst,
    Address,
    Admin,
    Cluster,
    CircuitBreakers,
    HASH_POLICY_KINDS,
    HashPolicy,
    HTTP_FILTERS,
    Fault,
    HealthCheck,
    LocalRateLimit,
    Mirror,
    OutlierDetection,
    RETRY_ON,
    RetryPolicy,
    Config,
    DirectResponse,
    Discovery,
    Publish,
    ZookeeperDiscovery,
    ZookeeperPublish,
    HeaderMatch,
    Listener,
    Route,
    RouteMatch,
    RouteTable,
    VirtualHost,
    WeightedCluster,
)

__all__ = ["ConfigError", "load_file", "load_text", "load_dict", "to_dict"]


class ConfigError(Exception):
    """The config is invalid. ``errors`` lists every problem as ``"<path>: <message>"``."""

    def __init__(self, errors: list[str], source: str = "<string>") -> None:
        self.errors: list[str] = list(errors)
        self.source = source
        super().__init__(self.errors, source)

    def __str__(self) -> str:
        return "\n".join(self.errors)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def load_file(path: str) -> Config:
    """Read and validate the YAML config file at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config file: {e.strerror or e}"], path) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: config file is not valid UTF-8: {e}"], path) from None
    return load_text(text, source=path)


def load_text(text: str, source: str = "<string>") -> Config:
    """Parse YAML ``text`` (safe loader) and validate it. ``source`` names it in messages."""
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        data = _json_fallback(text)
        if data is _MISSING:
            raise ConfigError([_yaml_error(e, source)], source) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{source}: invalid YAML: {e}"], source) from None
    finally:
        loader.dispose()
    dup_errors = [f"{source}:{line}:{col}: duplicate key {key!r}"
                  for line, col, key in sorted(loader.duplicate_keys, key=lambda d: d[:2])]
    try:
        cfg = load_dict(data, source=source)
    except ConfigError as e:
        raise ConfigError(dup_errors + e.errors, source) from None
    if dup_errors:
        raise ConfigError(dup_errors, source)
    return cfg


def _json_fallback(text: str) -> Any:
    """JSON that PyYAML cannot read as YAML (tabs for indentation, say): parsed as JSON."""
    if not text.lstrip().startswith("{"):
        return _MISSING
    import json
    try:
        return json.loads(text)
    except ValueError:
        return _MISSING


def load_dict(data: Any, source: str = "<string>", clusters: Optional[dict] = None) -> Config:
    """Validate already-parsed config data and build the typed ``Config``
    (an Envoy v3 bootstrap is handed to ``fastmesh.config.envoy``).

    ``clusters``: cluster models checked before (name -> ``Cluster``), taken as they are in
    addition to the data's own ``clusters``: a config source that changes a few clusters
    of thousands sends only those (see ``to_dict(cfg, except_clusters=...)``)."""
    from .envoy import load_bootstrap, looks_like_bootstrap
    if clusters and looks_like_bootstrap(data):
        raise ConfigError([f"{source}: prebuilt clusters go with the native form only"], source)
    if looks_like_bootstrap(data):
        return load_bootstrap(data, source)
    if data is None:
        raise ConfigError([f"{source}: empty config (expected a mapping with a 'listeners' key)"],
                          source)
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: expected a mapping at the top level, got {_show(data)}"],
                          source)
    c = _Checker()
    for k in data:
        if k not in _TOP_KEYS:
            c.err(str(k), "unknown key")

    clusters_raw = data.get("clusters", [])
    tables_raw = data.get("route_tables", {})
    # Names are collected up front, so references can be checked in document order and a
    # cluster or table with an error of its own does not also cause "no cluster named" noise.
    # None means "section unusable": reference checks are skipped rather than all failing.
    known_clusters: Optional[set] = None
    if isinstance(clusters_raw, list):
        known_clusters = {e["name"] for e in clusters_raw
                          if isinstance(e, dict) and isinstance(e.get("name"), str)}
        known_clusters.update(clusters or ())
    known_tables: Optional[set] = None
    if isinstance(tables_raw, dict):
        known_tables = {k for k in tables_raw if isinstance(k, str)}

    admin = _admin(c, data.get("admin", _MISSING))
    if "listeners" not in data:
        c.err("listeners", "missing required key")
    listeners = _listeners(c, data.get("listeners", []), known_tables, known_clusters, admin)
    route_tables = _route_tables(c, tables_raw, known_clusters)
    listeners = [_with_http_filters(c, lst, route_tables) if lst is not None else lst
                 for lst in listeners]
    for lst, ch in [(lst, ch) for lst in listeners if lst is not None for ch in lst.chains()]:
        # what only one protocol's path does is refused where it would be ignored
        table = route_tables.get(ch.route_table) if ch.route_table else None
        for vh in table.virtual_hosts if table is not None else ():
            for i, r in enumerate(vh.routes):
                rp = r.retry_policy if r is not None else None
                if rp is None:
                    continue
                where = f"route_tables.{ch.route_table}.routes[{i}].retry_policy"
                if ch.protocol == "http1" and rp.bolt_statuses:
                    c.err(f"{where}.bolt_statuses", f"used by http1 listener {lst.name!r}: "
                          "Bolt statuses are for Bolt routes")
                if ch.protocol == "bolt" and (rp.retriable_status_codes or rp.per_try_timeout_ms
                                              or rp.backoff_max_ms is not None):
                    c.err(where, f"used by bolt listener {lst.name!r}: retriable_status_codes, "
                          "per_try_timeout_ms and back-off are for HTTP routes (Bolt: "
                          "bolt_statuses; a call is sent again at once)")
    prebuilt = clusters or {}
    clusters = _clusters(c, clusters_raw)
    for name, cl in prebuilt.items():
        if name in clusters:
            c.err("clusters", f"duplicate cluster name {name!r} (also given prebuilt)")
        else:
            clusters[name] = cl

    kw: dict[str, Any] = {}
    if "workers" in data:
        w = data["workers"]
        if w == "auto":
            kw["workers"] = os.cpu_count() or 1
        elif isinstance(w, bool) or not isinstance(w, int) or w < 0:
            c.err("workers", f'expected a non-negative integer or "auto", got {_show(w)} '
                             f'(0: one process serves everything, for sidecars)')
        else:
            kw["workers"] = w
    if "drain_timeout_ms" in data:
        kw["drain_timeout_ms"] = c.integer(data["drain_timeout_ms"], "drain_timeout_ms", lo=0)
    if "engine" in data:
        e = data["engine"]
        if e not in ("auto", "io_uring", "epoll", "uvloop"):
            c.err("engine", f"expected one of auto, io_uring, epoll, uvloop, got {_show(e)}")
        else:
            kw["engine"] = e

    if c.errors:
        raise ConfigError(c.errors, source)
    return Config(admin=admin, listeners=tuple(listeners), route_tables=route_tables,
                  clusters=clusters, source=source, **kw)


def to_dict(cfg: Config, except_clusters: frozenset | set = frozenset()) -> dict:
    """The config as plain JSON-serialisable data, in the same shape ``load_dict`` accepts.

    Every field is written out (defaults included), except unset optional ones (None) and empty
    tuples; addresses become "host:port" strings; route tables always use ``virtual_hosts``.
    ``load_dict(to_dict(cfg), cfg.source) == cfg``. The clusters named in ``except_clusters``
    are left out (the receiver has them: ``load_dict(..., clusters=...)``).
    """
    return {
        "admin": None if cfg.admin is None else {"address": str(cfg.admin.address)},
        "listeners": [_plain(lst) for lst in cfg.listeners],
        "route_tables": {name: {"virtual_hosts": [_plain(vh) for vh in rt.virtual_hosts],
                                "strip_host_port": rt.strip_host_port}
                         for name, rt in cfg.route_tables.items()},
        "clusters": [_plain_cluster(cl) for name, cl in cfg.clusters.items()
                     if name not in except_clusters],
        "workers": cfg.workers,
        "drain_timeout_ms": cfg.drain_timeout_ms,
        "engine": cfg.engine,
    }


def _plain_cluster(cl: Cluster) -> dict:
    """A cluster as plain data: kept for the model object (models are immutable), since a
    control plane's configs share most of their clusters from one version to the next."""
    hit = _PLAIN_CLUSTERS.get(id(cl))
    if hit is not None and hit[0] is cl:
        return hit[1]
    if len(_PLAIN_CLUSTERS) >= _PLAIN_CLUSTERS_MAX:
        _PLAIN_CLUSTERS.clear()
    d = _plain(cl)
    _PLAIN_CLUSTERS[id(cl)] = (cl, d)
    return d


_PLAIN_CLUSTERS: dict = {}      # id(Cluster) -> (that Cluster, its plain data), read only
_PLAIN_CLUSTERS_MAX = 65536


def _plain(obj: Any) -> Any:
    if isinstance(obj, Address):
        return str(obj)
    if isinstance(obj, Cluster):
        d = _plain_fields(obj)
        d.pop("weights", None)
        if obj.weights:
            d["endpoints"] = [{"address": str(a), "weight": w}
                              for a, w in zip(obj.endpoints, obj.weights)]
        else:
            d["endpoints"] = [str(a) for a in obj.endpoints]
        return d
    if isinstance(obj, Listener) and (obj.access_log_format or obj.access_log_json):
        d = _plain_fields(obj)
        d.pop("access_log_format", None)
        d.pop("access_log_json", None)
        d["access_log"] = {"path": obj.access_log}
        if obj.access_log_json:
            d["access_log"]["json_format"] = dict(obj.access_log_json)
        else:
            d["access_log"]["format"] = obj.access_log_format
        return d
    if isinstance(obj, TlsContext) and obj.sds_path:
        d = _plain_fields(obj)
        for k in ("sds_path", "sds_secret", "sds_watched_directory", "cert_chain_file",
                  "private_key_file"):
            d.pop(k, None)
        d["sds"] = {"path": obj.sds_path, "secret": obj.sds_secret}
        if obj.sds_watched_directory:
            d["sds"]["watched_directory"] = obj.sds_watched_directory
        return d
    if isinstance(obj, SanMatch):
        m = {obj.kind: obj.value}
        if obj.ignore_case:
            m["ignore_case"] = True
        return {obj.san_type: m}
    if isinstance(obj, Route):
        d = _plain_fields(obj)
        if obj.request_headers_to_add:
            d["request_headers_to_add"] = [{"name": n, "value": v}
                                           for n, v in obj.request_headers_to_add]
        return d
    if isinstance(obj, LocalRateLimit):
        d = _plain_fields(obj)
        if obj.response_headers_to_add:
            d["response_headers_to_add"] = [{"name": n, "value": v}
                                            for n, v in obj.response_headers_to_add]
        return d
    if isinstance(obj, HealthCheck) and obj.type != "http":
        # expected_statuses has a default, which a tcp or bolt check must not be written with
        return {k: v for k, v in _plain_fields(obj).items() if k != "expected_statuses"}
    if dataclasses.is_dataclass(obj):
        return _plain_fields(obj)
    if isinstance(obj, (tuple, list)):
        return [_plain(x) for x in obj]
    return obj


def _plain_fields(obj: Any) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is None or v == ():
            continue
        out[f.name] = _plain(v)
    return out


# ---------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """The safe loader, additionally recording duplicate mapping keys (PyYAML keeps the last)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[tuple[int, int, Any]] = []

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if (not isinstance(key_node, yaml.ScalarNode)
                        or key_node.tag == "tag:yaml.org,2002:merge"):
                    continue
                key = self.construct_object(key_node)
                try:
                    if key in seen:
                        mark = key_node.start_mark
                        self.duplicate_keys.append((mark.line + 1, mark.column + 1, key))
                    seen.add(key)
                except TypeError:       # unhashable: the base constructor reports it
                    pass
        return super().construct_mapping(node, deep=deep)


def _yaml_error(e: yaml.MarkedYAMLError, source: str) -> str:
    mark = e.problem_mark or e.context_mark
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    parts = [p for p in (e.context, e.problem) if p]
    return f"{where}: invalid YAML: {'; '.join(parts) or e}"


# ---------------------------------------------------------------------------------------------
# Checking helpers
# ---------------------------------------------------------------------------------------------

_MISSING: Any = object()

_TOP_KEYS = ("admin", "listeners", "route_tables", "clusters", "workers", "drain_timeout_ms",
             "engine")


def _show(v: Any) -> str:
    """A value as it appears in messages: YAML-ish for null/booleans/collections, else repr."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, (list, tuple)):
        return "a list"
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _key(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _name_path(path: str, name: Any) -> str:
    """``route_tables.web``, or ``route_tables['my table']`` when the name is not plain."""
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return f"{path}.{name}"
    return f"{path}[{name!r}]"


_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?", re.ASCII | re.IGNORECASE)
_PORT_RE = re.compile(r"[0-9]{1,5}", re.ASCII)


@functools.lru_cache(maxsize=65536)       # a control plane resends the same addresses
def _valid_hostname(host: str) -> bool:
    """A DNS name or an IPv4 literal (IPv6 literals are handled by the callers)."""
    if len(host) > 254 or not _HOSTNAME_RE.fullmatch(host):
        return False
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
    return True


@functools.lru_cache(maxsize=65536)
def _valid_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _addr_key(a: Address) -> tuple[str, int]:
    """For "same address" checks: hostnames case-folded, IP literals in canonical form."""
    return _canonical_host(a.host), a.port


@functools.lru_cache(maxsize=65536)
def _canonical_host(host: str) -> str:
    host = host.lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


class _Checker:
    """Collects errors; every check reports and returns a best-effort value (None if invalid).

    Objects may therefore be built from invalid values; they are thrown away because
    ``load_dict`` raises whenever ``errors`` is non-empty.
    """

    def __init__(self) -> None:
        self.errors: list[str] = []

    def err(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")

    def mapping(self, v: Any, path: str, allowed: Any) -> Optional[dict]:
        if not isinstance(v, dict):
            self.err(path, f"expected a mapping, got {_show(v)}")
            return None
        for k in v:
            if k not in allowed:
                self.err(_key(path, k), "unknown key")
        return v

    def required(self, m: dict, path: str, key: str) -> Any:
        if key not in m:
            self.err(_key(path, key), "missing required key")
            return _MISSING
        return m[key]

    def seq(self, v: Any, path: str, nonempty: bool = False) -> list:
        if not isinstance(v, list):
            self.err(path, f"expected a list, got {_show(v)}")
            return []
        if nonempty and not v:
            self.err(path, "expected a non-empty list")
        return v

    def text(self, v: Any, path: str, nonempty: bool = True) -> Optional[str]:
        if v is _MISSING:
            return None
        if not isinstance(v, str):
            hint = " (quote it)" if isinstance(v, (int, float)) else ""
            self.err(path, f"expected a string, got {_show(v)}{hint}")
            return None
        if nonempty and not v:
            self.err(path, "expected a non-empty string")
            return None
        return v

    def integer(self, v: Any, path: str, lo: int = 1, hi: Optional[int] = None) -> Optional[int]:
        if v is _MISSING:
            return None
        if hi is not None:
            what = f"an integer in {lo}..{hi}"
        elif lo == 1:
            what = "a positive integer"
        elif lo == 0:
            what = "a non-negative integer"
        else:
            what = f"an integer >= {lo}"
        if (isinstance(v, bool) or not isinstance(v, int) or v < lo
                or (hi is not None and v > hi)):
            self.err(path, f"expected {what}, got {_show(v)}")
            return None
        return v

    def boolean(self, v: Any, path: str) -> Optional[bool]:
        if not isinstance(v, bool):
            self.err(path, f"expected true or false, got {_show(v)}")
            return None
        return v

    def choice(self, v: Any, path: str, what: str, choices: tuple) -> Optional[str]:
        if not isinstance(v, str) or v not in choices:
            self.err(path, f"unknown {what} {_show(v)} (expected one of: {', '.join(choices)})")
            return None
        return v

    def regex(self, v: Any, path: str) -> Optional[str]:
        s = self.text(v, path)
        if s is None:
            return None
        try:
            re.compile(s)
        except re.error as e:
            self.err(path, f"invalid regular expression: {e}")
            return None
        return s

    def address(self, v: Any, path: str, min_port: int) -> Optional[Address]:
        bad = f'expected "host:port", got {_show(v)}'
        if not isinstance(v, str):
            self.err(path, bad)
            return None
        if v.startswith("["):
            m = re.fullmatch(r"\[([^\]]*)\]:([^:]*)", v)
            if not m:
                self.err(path, bad)
                return None
            host, port_s = m.group(1), m.group(2)
            if not _valid_ipv6(host):
                self.err(path, f"invalid IPv6 address {host!r}")
                return None
        else:
            host, sep, port_s = v.rpartition(":")
            if not sep or not host or not port_s:
                self.err(path, bad)
                return None
            if ":" in host and (_valid_ipv6(host) or _valid_ipv6(v)):
                self.err(path, f'IPv6 addresses go in brackets, like "[::1]:80", got {_show(v)}')
                return None
            if not _valid_hostname(host):
                self.err(path, f"invalid host {host!r}")
                return None
        if not _PORT_RE.fullmatch(port_s):
            self.err(path, f"invalid port {port_s!r}")
            return None
        port = int(port_s)
        if not min_port <= port <= 65535:
            self.err(path, f"port {port} out of range ({min_port}..65535)")
            return None
        return Address(host, port)

    def unique_name(self, v: Any, path: str, what: str, seen: dict) -> Optional[str]:
        """A required non-empty string name, unique among ``seen`` (name -> path of first)."""
        name = self.text(v, path)
        if name is None:
            return None
        if name in seen:
            self.err(path, f"duplicate {what} name {name!r} (also {seen[name]})")
        else:
            seen[name] = path.rsplit(".", 2)[-2]      # "listeners[0]", "virtual_hosts[1]"
        return name


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def _admin(c: _Checker, raw: Any) -> Optional[Admin]:
    if raw is _MISSING:
        return Admin(_default_admin_address())
    if raw is None:
        return None
    m = c.mapping(raw, "admin", ("address",))
    if m is None:
        return None
    if "address" not in m:
        return Admin(_default_admin_address())
    return Admin(c.address(m["address"], "admin.address", min_port=0))


def _default_admin_address() -> Address:
    host, _, port = DEFAULT_ADMIN_ADDRESS.rpartition(":")
    return Address(host.strip("[]"), int(port))


_LISTENER_FIELDS = {f.name: f for f in dataclasses.fields(Listener)
                    if f.name not in ("access_log_format", "access_log_json")}  # in access_log
TCP_IDLE_TIMEOUT_MS = 3600000      # a tcp listener's default idle timeout: Envoy's tcp_proxy's
_LISTENER_INT_MIN = {"max_request_body_bytes": 0,    # every other int field: >= 1
                     "stream_idle_timeout_ms": 0, "sniff_timeout_ms": 0}
_LISTENER_KEYS = set(_LISTENER_FIELDS) | {"bolt_route_table"}


def _listeners(c: _Checker, raw: Any, known_tables: Optional[set],
               known_clusters: Optional[set], admin: Optional[Admin]) -> list[Listener]:
    out = []
    names: dict = {}
    addrs: dict = {}
    if admin is not None and admin.address is not None and admin.address.port != 0:
        addrs[_addr_key(admin.address)] = "admin.address"
    for i, item in enumerate(c.seq(raw, "listeners")):
        p = f"listeners[{i}]"
        m = c.mapping(item, p, _LISTENER_KEYS)
        if m is None:
            continue
        kw: dict[str, Any] = {}
        kw["name"] = c.unique_name(c.required(m, p, "name"), f"{p}.name", "listener", names)
        addr_raw = c.required(m, p, "address")
        addr = None if addr_raw is _MISSING else c.address(addr_raw, f"{p}.address", min_port=0)
        kw["address"] = addr
        if addr is not None and addr.port != 0:
            key = _addr_key(addr)
            if key in addrs:
                c.err(f"{p}.address", f"{str(addr)!r} is already used by {addrs[key]}")
            else:
                addrs[key] = f"{p}.address"

        protocol = _LISTENER_FIELDS["protocol"].default
        if "protocol" in m:
            protocol = c.choice(m["protocol"], f"{p}.protocol", "protocol",
                                LISTENER_PROTOCOLS)
            kw["protocol"] = protocol
        if "filter_chains" in m:
            if "protocol" in m and protocol != "auto":
                c.err(f"{p}.protocol", "with filter_chains: the chain chooses the protocol "
                                       "(leave protocol out, or say auto)")
            for key in ("route_table", "cluster", "bolt_route_table"):
                if key in m:
                    c.err(f"{p}.{key}", "with filter_chains: set it on each chain")
            kw["protocol"] = protocol = "auto"
            kw["filter_chains"] = _filter_chains(c, m["filter_chains"], f"{p}.filter_chains",
                                                 known_tables, known_clusters)
        elif protocol == "auto":
            kw["filter_chains"] = _sniffed_chains(c, m, p, kw["name"], known_tables,
                                                  known_clusters)
        else:
            if "bolt_route_table" in m:
                c.err(f"{p}.bolt_route_table", "only with protocol: auto")
            kw["route_table"], kw["cluster"] = _chain_target(c, m, p, protocol, known_tables,
                                                             known_clusters)
        if m.get("tls") is not None:
            if kw.get("filter_chains"):
                c.err(f"{p}.tls", "with filter_chains (or protocol: auto): set tls on each "
                                  "chain (the chain chooses its certificate)")
            else:
                kw["tls"] = _tls(c, m["tls"], f"{p}.tls", protocol)
        _interception(c, m, p, kw)
        chains = kw.get("filter_chains") or ()
        protocols = {ch.protocol for ch in chains} if chains else {protocol}
        if "access_log" in m:
            _access_log(c, m["access_log"], f"{p}.access_log", protocols, kw)
        if "accept_http_10" in m:
            kw["accept_http_10"] = c.boolean(m["accept_http_10"], f"{p}.accept_http_10")
        if "codec" in m:
            kw["codec"] = c.choice(m["codec"], f"{p}.codec", "codec", ("http1", "auto"))
            if kw["codec"] == "auto" and protocol not in ("http1", "auto"):
                c.err(f"{p}.codec", "only http1 listeners (and the http1 chains of others) "
                                    "have a codec choice")
        for name, parse in (("fault", _fault), ("local_rate_limit", _local_rate_limit)):
            if m.get(name) is not None:
                if "http1" not in protocols:
                    c.err(f"{p}.{name}", "only http1 listeners have HTTP filters")
                kw[name] = parse(c, m[name], f"{p}.{name}")
        if m.get("http_filters"):
            fp = f"{p}.http_filters"
            chain = [c.choice(x, f"{fp}[{i}]", "HTTP filter", HTTP_FILTERS)
                     for i, x in enumerate(c.seq(m["http_filters"], fp))]
            if len(set(chain)) != len(chain):
                c.err(fp, "each filter at most once")
            kw["http_filters"] = tuple(n for n in chain if n is not None)
        if m.get("publish") is not None:
            if protocol != "bolt":
                c.err(f"{p}.publish", "only bolt listeners publish SOFARPC services")
            kw["publish"] = _publish(c, m["publish"], f"{p}.publish", addr)
        for f in _LISTENER_FIELDS.values():
            if f.type == "int" and f.name in m:
                lo = _LISTENER_INT_MIN.get(f.name, 1)
                kw[f.name] = c.integer(m[f.name], f"{p}.{f.name}", lo=lo)
        if protocol == "tcp" and "idle_timeout_ms" not in kw:
            kw["idle_timeout_ms"] = TCP_IDLE_TIMEOUT_MS     # as Envoy's tcp_proxy
        if m.get("http2") is not None:
            kw["http2"] = http2_settings(c, m["http2"], f"{p}.http2")
        low = kw.get("low_water_bytes", _LISTENER_FIELDS["low_water_bytes"].default)
        high = kw.get("high_water_bytes", _LISTENER_FIELDS["high_water_bytes"].default)
        if isinstance(low, int) and isinstance(high, int) and low >= high:
            c.err(f"{p}.low_water_bytes",
                  f"must be less than high_water_bytes ({low} >= {high})")
        out.append(Listener(**kw))
    return out


def _chain_target(c: _Checker, m: dict, p: str, protocol: Optional[str],
                  known_tables: Optional[set], known_clusters: Optional[set]) -> tuple:
    """(route_table, cluster) of one protocol's chain: tcp needs a cluster, http1 and bolt a
    route table."""
    rt = cl = None
    if protocol == "tcp":
        if "route_table" in m:
            c.err(f"{p}.route_table", "not allowed for tcp listeners")
        cl = c.text(c.required(m, p, "cluster"), f"{p}.cluster")
        if cl is not None and known_clusters is not None and cl not in known_clusters:
            c.err(f"{p}.cluster", f"no cluster named {cl!r}")
    elif protocol is not None:
        if "cluster" in m:
            c.err(f"{p}.cluster", f"not allowed for {protocol} listeners (only tcp)")
        if "route_table" not in m:
            c.err(f"{p}.route_table", f"missing required key (for {protocol} listeners)")
        else:
            rt = c.text(m["route_table"], f"{p}.route_table")
            if rt is not None and known_tables is not None and rt not in known_tables:
                c.err(f"{p}.route_table", f"no route table named {rt!r}")
    return rt, cl


def _sniffed_chains(c: _Checker, m: dict, p: str, name: Optional[str],
                    known_tables: Optional[set], known_clusters: Optional[set]) -> tuple:
    """protocol: auto, the short form: HTTP requests (HTTP/1, or HTTP/2 with prior
    knowledge: Envoy's codec_type AUTO) to route_table, Bolt calls to bolt_route_table,
    anything else (TLS included, passed through) to cluster."""
    chains = []
    name = name or "listener"
    if "route_table" in m:
        rt, _ = _chain_target(c, {"route_table": m["route_table"]}, p, "http1", known_tables,
                              known_clusters)
        chains.append(FilterChain(name=f"{name}/http1", protocol="http1", route_table=rt,
                                  match=ChainMatch(application_protocols=HTTP1_PROTOCOLS)))
        chains.append(FilterChain(name=f"{name}/http2", protocol="http2", route_table=rt,
                                  match=ChainMatch(application_protocols=("h2c",))))
    if "bolt_route_table" in m:
        rt, _ = _chain_target(c, {"route_table": m["bolt_route_table"]}, p, "bolt",
                              known_tables, known_clusters)
        chains.append(FilterChain(name=f"{name}/bolt", protocol="bolt", route_table=rt,
                                  match=ChainMatch(application_protocols=("bolt",))))
    if "cluster" in m:
        _, cl = _chain_target(c, {"cluster": m["cluster"]}, p, "tcp", known_tables,
                              known_clusters)
        chains.append(FilterChain(name=f"{name}/tcp", protocol="tcp", cluster=cl, default=True))
    if not chains:
        c.err(p, "protocol: auto needs at least one of route_table (HTTP), bolt_route_table "
                 "(Bolt) and cluster (anything else, as TCP)")
    return tuple(chains)


HTTP1_PROTOCOLS = ("http/1.0", "http/1.1")
_CHAIN_KEYS = ("name", "match", "protocol", "route_table", "cluster", "default", "tls",
               "access_log")
_MATCH_FIELDS = {f.name: f for f in dataclasses.fields(ChainMatch)}


def _filter_chains(c: _Checker, raw: Any, p: str, known_tables: Optional[set],
                   known_clusters: Optional[set]) -> tuple:
    out = []
    names: dict = {}
    seen: dict = {}
    defaults = 0
    for i, item in enumerate(c.seq(raw, p, nonempty=True)):
        ip = f"{p}[{i}]"
        m = c.mapping(item, ip, _CHAIN_KEYS)
        if m is None:
            continue
        name = f"chain_{i}"
        if "name" in m:
            name = c.unique_name(m["name"], f"{ip}.name", "filter chain", names) or name
        protocol = c.choice(c.required(m, ip, "protocol"), f"{ip}.protocol", "protocol",
                            PROTOCOLS) if "protocol" in m else \
            ("tcp" if "cluster" in m else "http1")
        rt, cl = _chain_target(c, m, ip, protocol, known_tables, known_clusters)
        match = _chain_match(c, m.get("match") or {}, f"{ip}.match")
        default = bool(m.get("default")) and c.boolean(m["default"], f"{ip}.default")
        if default:
            defaults += 1
            if defaults > 1:
                c.err(f"{ip}.default", "only one chain can be the default")
        elif match in seen:
            c.err(f"{ip}.match", f"the same match as filter_chains[{seen[match]}]: a "
                                 "connection could not choose between them")
        else:
            seen[match] = i
        tls = _tls(c, m["tls"], f"{ip}.tls", protocol) if m.get("tls") is not None else None
        logs = c.boolean(m["access_log"], f"{ip}.access_log") if "access_log" in m else True
        out.append(FilterChain(name=name, protocol=protocol or "http1", match=match,
                               route_table=rt, cluster=cl, default=default, tls=tls,
                               access_log=logs is not False))
    return tuple(out)


def _chain_match(c: _Checker, raw: Any, p: str) -> ChainMatch:
    m = c.mapping(raw, p, _MATCH_FIELDS)
    if m is None:
        return ChainMatch()
    kw: dict = {}
    if "destination_port" in m:
        kw["destination_port"] = c.integer(m["destination_port"], f"{p}.destination_port",
                                           lo=0, hi=65535)
    for key in ("destination_cidrs", "source_cidrs"):
        if key in m:
            cidrs = []
            for j, x in enumerate(c.seq(m[key], f"{p}.{key}")):
                t = c.text(x, f"{p}.{key}[{j}]")
                if t is None:
                    continue
                try:
                    cidrs.append(str(ipaddress.ip_network(t, strict=False)))
                except ValueError:
                    c.err(f"{p}.{key}[{j}]", f"{t!r} is not an IP address or CIDR")
            kw[key] = tuple(cidrs)
    if "server_names" in m:
        kw["server_names"] = tuple(
            t.lower() for j, x in enumerate(c.seq(m["server_names"], f"{p}.server_names"))
            if (t := c.text(x, f"{p}.server_names[{j}]")) is not None)
    if "transport_protocol" in m:
        kw["transport_protocol"] = c.choice(m["transport_protocol"], f"{p}.transport_protocol",
                                            "transport protocol", TRANSPORT_PROTOCOLS)
    if "application_protocols" in m:
        kw["application_protocols"] = tuple(
            t for j, x in enumerate(c.seq(m["application_protocols"],
                                          f"{p}.application_protocols"))
            if (t := c.text(x, f"{p}.application_protocols[{j}]")) is not None)
    if "source_ports" in m:
        kw["source_ports"] = tuple(
            v for j, x in enumerate(c.seq(m["source_ports"], f"{p}.source_ports"))
            if (v := c.integer(x, f"{p}.source_ports[{j}]", lo=1, hi=65535)) is not None)
    return ChainMatch(**{k: v for k, v in kw.items() if v is not None})


_TLS_KEYS = tuple(f.name for f in dataclasses.fields(TlsContext)
                  if not f.name.startswith("sds_")) + ("sds",)


def _tls(c: _Checker, raw: Any, p: str, protocol: Optional[str]) -> Optional[TlsContext]:
    """A listener's or chain's ``tls:``: certificate and key files, versions, ciphers, ALPN,
    client certificates (trusted CA, CRL, SAN matchers), the client-cert header (HTTP)."""
    m = c.mapping(raw, p, _TLS_KEYS)
    if m is None:
        return None
    kw: dict = {}
    if "sds" in m:
        sp = f"{p}.sds"
        sm = c.mapping(m["sds"], sp, ("path", "secret", "watched_directory"))
        if sm is not None:
            kw["sds_path"] = c.text(c.required(sm, sp, "path"), f"{sp}.path")
            kw["sds_secret"] = c.text(c.required(sm, sp, "secret"), f"{sp}.secret")
            if sm.get("watched_directory") is not None:
                kw["sds_watched_directory"] = c.text(sm["watched_directory"],
                                                     f"{sp}.watched_directory")
        for key in ("cert_chain_file", "private_key_file"):
            if key in m:
                c.err(f"{p}.{key}", "not with sds (the secret holds the certificate)")
        kw["cert_chain_file"] = kw["private_key_file"] = ""
    else:
        # each of the two from a file or inline PEM
        for what in ("cert_chain", "private_key"):
            f, t = f"{what}_file", f"{what}_pem"
            if t in m:
                kw[t] = _pem(c, m[t], f"{p}.{t}")
                if f in m:
                    c.err(f"{p}.{f}", f"not with {t} (one or the other)")
                kw[f] = ""
            else:
                kw[f] = c.text(c.required(m, p, f), f"{p}.{f}")
    _tls_shared(c, m, p, kw)
    if "alpn" in m:
        alpn = tuple(t for j, x in enumerate(c.seq(m["alpn"], f"{p}.alpn"))
                     if (t := c.text(x, f"{p}.alpn[{j}]")) is not None)
        allowed = {"http1": ("h2", "http/1.1", "http/1.0"), "http2": ("h2",),
                   "bolt": ("bolt",), "tcp": None}
        ok = allowed.get(protocol or "http1")
        for j, a in enumerate(alpn):
            if a in ("h2c", "h3"):
                c.err(f"{p}.alpn[{j}]", f"{a!r}: not a protocol TLS negotiates here (h2, "
                                        "http/1.1)")
            elif ok is not None and a not in ok:
                c.err(f"{p}.alpn[{j}]", f"{a!r}: a {protocol} chain speaks "
                                        f"{' or '.join(ok)}")
        kw["alpn"] = alpn
    if "require_client_certificate" in m:
        kw["require_client_certificate"] = c.boolean(m["require_client_certificate"],
                                                     f"{p}.require_client_certificate")
    if kw.get("require_client_certificate") and kw.get("trusted_ca_file") is None:
        c.err(f"{p}.require_client_certificate", "needs trusted_ca_file (the CAs a client "
                                                 "certificate must chain to)")
    if "handshake_timeout_ms" in m:
        kw["handshake_timeout_ms"] = c.integer(m["handshake_timeout_ms"],
                                               f"{p}.handshake_timeout_ms", lo=0)
    if "forward_client_cert" in m:
        if protocol not in (None, "http1") and m["forward_client_cert"] != "sanitize":
            c.err(f"{p}.forward_client_cert", "only http1 chains carry headers")
        kw["forward_client_cert"] = c.choice(m["forward_client_cert"],
                                             f"{p}.forward_client_cert", "mode", XFCC_MODES)
    if "forward_client_cert_details" in m:
        dp = f"{p}.forward_client_cert_details"
        kw["forward_client_cert_details"] = tuple(
            d for j, x in enumerate(c.seq(m["forward_client_cert_details"], dp))
            if (d := c.choice(x, f"{dp}[{j}]", "detail", XFCC_DETAILS)) is not None)
    if any(v is None for v in kw.values()):
        return None
    if "sds_path" in kw:
        kw["cert_chain_file"] = kw["private_key_file"] = None
    for key in ("cert_chain_file", "private_key_file"):
        if kw.get(key) == "":
            kw[key] = None                      # given as PEM
    if kw.get("trusted_ca_file") == "":
        kw["trusted_ca_file"] = None            # the CAs are trusted_ca_pem
    t = TlsContext(**kw)
    check_tls(c, t, p)
    return t


def _tls_shared(c: _Checker, m: dict, p: str, kw: dict) -> None:
    """What both sides' `tls:` have: the trusted CA (and CRL, SAN matchers) the peer's
    certificate is checked against, versions, TLS 1.2 cipher suites, the ECDH curve."""
    for key in ("trusted_ca_file", "crl_file", "ecdh_curve"):
        if m.get(key) is not None:
            kw[key] = c.text(m[key], f"{p}.{key}")
    if m.get("trusted_ca_pem") is not None:
        kw["trusted_ca_pem"] = _pem(c, m["trusted_ca_pem"], f"{p}.trusted_ca_pem")
        if "trusted_ca_file" in kw:
            c.err(f"{p}.trusted_ca_pem", "not with trusted_ca_file (one or the other)")
        else:
            kw["trusted_ca_file"] = ""          # "a CA is set" for the checks below
    for key in ("min_version", "max_version"):
        if key in m:
            v = m[key]
            v = str(v) if isinstance(v, float) else v      # min_version: 1.2 unquoted
            kw[key] = c.choice(v, f"{p}.{key}", "TLS version", TLS_VERSIONS)
    if kw.get("min_version") and kw.get("max_version") and \
            TLS_VERSIONS.index(kw["min_version"]) > TLS_VERSIONS.index(kw["max_version"]):
        c.err(f"{p}.min_version", f"above max_version ({kw['min_version']} > "
                                  f"{kw['max_version']})")
    if "ciphers" in m:
        v = m["ciphers"]
        names = v.split(":") if isinstance(v, str) else [
            c.text(x, f"{p}.ciphers[{j}]") for j, x in enumerate(c.seq(v, f"{p}.ciphers"))]
        names = [n for n in names if n]
        if not names:
            c.err(f"{p}.ciphers", "expected at least one cipher suite")
        kw["ciphers"] = tuple(names)
    if "crl_leaf_only" in m:
        kw["crl_leaf_only"] = c.boolean(m["crl_leaf_only"], f"{p}.crl_leaf_only")
    if kw.get("crl_file") and kw.get("trusted_ca_file") is None:
        c.err(f"{p}.crl_file", "needs trusted_ca_file")
    if "match_subject_alt_names" in m:
        mp = f"{p}.match_subject_alt_names"
        out = []
        for j, item in enumerate(c.seq(m["match_subject_alt_names"], mp)):
            sm = _san_match(c, item, f"{mp}[{j}]")
            if sm is not None:
                out.append(sm)
        if out and kw.get("trusted_ca_file") is None:
            c.err(mp, "needs trusted_ca_file (names are checked on verified certificates)")
        kw["match_subject_alt_names"] = tuple(out)


_UPSTREAM_TLS_KEYS = tuple(f.name for f in dataclasses.fields(UpstreamTls))


def _upstream_tls(c: _Checker, raw: Any, p: str, http2: bool) -> Optional[UpstreamTls]:
    """A cluster's ``tls:``: TLS to its endpoints (SNI, the upstream certificate's checks,
    our client certificate, versions, ALPN, session resumption)."""
    m = c.mapping(raw, p, _UPSTREAM_TLS_KEYS)
    if m is None:
        return None
    kw: dict = {}
    _tls_shared(c, m, p, kw)
    if kw.get("min_version") == "1.3" and "max_version" not in m:
        kw["max_version"] = "1.3"       # the client default (1.2) would be below it
    if m.get("sni") is not None:
        kw["sni"] = c.text(m["sni"], f"{p}.sni")
    for form, conv in (("file", c.text), ("pem", lambda v, path: _pem(c, v, path))):
        keys = (f"cert_chain_{form}", f"private_key_{form}")
        have = [k for k in keys if m.get(k) is not None]
        if len(have) == 1:
            c.err(f"{p}.{have[0]}", f"a client certificate needs both {keys[0]} and {keys[1]}")
        for key in have:
            kw[key] = conv(m[key], f"{p}.{key}")
    if kw.get("cert_chain_file") and kw.get("cert_chain_pem"):
        c.err(f"{p}.cert_chain_pem", "not with cert_chain_file (one or the other)")
    if "alpn" in m:
        kw["alpn"] = tuple(t for j, x in enumerate(c.seq(m["alpn"], f"{p}.alpn"))
                           if (t := c.text(x, f"{p}.alpn[{j}]")) is not None)
        want = "h2" if http2 else "http/1.1"
        if kw["alpn"] and want not in kw["alpn"]:
            c.err(f"{p}.alpn", f"{list(kw['alpn'])}: the cluster speaks {want}")
    if "max_session_keys" in m:
        kw["max_session_keys"] = c.integer(m["max_session_keys"], f"{p}.max_session_keys",
                                           lo=0)
    if any(v is None for v in kw.values()):
        return None
    if kw.get("trusted_ca_file") == "":
        kw["trusted_ca_file"] = None            # the CAs are trusted_ca_pem
    t = UpstreamTls(**kw)
    check_upstream_tls(c, t, p)
    return t


def check_upstream_tls(c: _Checker, t: UpstreamTls, p: str) -> None:
    """Build the client context once now: a bad file or setting is an error at its path."""
    from fastmesh.tls import TlsConfigError, build_client_context
    try:
        build_client_context(t, False)
    except TlsConfigError as exc:
        c.err(p, str(exc))


def http2_settings(c: _Checker, raw: Any, p: str) -> Optional[Http2Settings]:
    """`http2: {max_concurrent_streams, initial_stream_window_bytes,
    initial_connection_window_bytes, hpack_table_bytes}`"""
    m = c.mapping(raw, p, tuple(HTTP2_LIMITS))
    if m is None:
        return None
    kw = {k: c.integer(v, f"{p}.{k}", lo=HTTP2_LIMITS[k][0], hi=HTTP2_LIMITS[k][1])
          for k, v in m.items() if k in HTTP2_LIMITS}
    if any(v is None for v in kw.values()):
        return None
    return Http2Settings(**kw)


def _pem(c: _Checker, raw: Any, p: str) -> Optional[str]:
    """PEM text (certificates or a key) given inline."""
    v = c.text(raw, p)
    if v is not None and "-----BEGIN " not in v:
        c.err(p, "expected PEM text (-----BEGIN ...)")
        return None
    return v


def _san_match(c: _Checker, raw: Any, p: str) -> Optional[SanMatch]:
    """{uri: {exact: spiffe://...}} / {dns: {suffix: .example.com, ignore_case: true}}"""
    m = c.mapping(raw, p, SAN_TYPES)
    if m is None:
        return None
    if len(m) != 1:
        c.err(p, f"expected exactly one of {', '.join(SAN_TYPES)}")
        return None
    (typ, spec), = m.items()
    sp = f"{p}.{typ}"
    sm = c.mapping(spec, sp, STRING_MATCH_KINDS + ("ignore_case",))
    if sm is None:
        return None
    kinds = [k for k in STRING_MATCH_KINDS if k in sm]
    if len(kinds) != 1:
        c.err(sp, f"expected exactly one of {', '.join(STRING_MATCH_KINDS)}")
        return None
    kind = kinds[0]
    value = c.regex(sm[kind], f"{sp}.{kind}") if kind == "regex" else \
        c.text(sm[kind], f"{sp}.{kind}")
    ic = c.boolean(sm["ignore_case"], f"{sp}.ignore_case") if "ignore_case" in sm else False
    if value is None or ic is None:
        return None
    return SanMatch(san_type=typ, kind=kind, value=value, ignore_case=ic)


def check_tls(c: _Checker, t: TlsContext, p: str) -> None:
    """Build the context once now, so that a bad file or setting is an error at its path
    rather than at the first connection."""
    from fastmesh.tls import TlsConfigError, build_context, sds_certificate
    try:
        build_context(t, sds_certificate(t)[1] if t.sds_path else None)
    except TlsConfigError as exc:
        c.err(f"{p}.sds" if t.sds_path else p, str(exc))


def _interception(c: _Checker, m: dict, p: str, kw: dict) -> None:
    """original_dst, use_original_dst, bind_to_port, the inspectors and their timeout."""
    for key in ("original_dst", "use_original_dst", "bind_to_port", "sniff_timeout_continue"):
        if key in m:
            kw[key] = c.boolean(m[key], f"{p}.{key}")
    if kw.get("use_original_dst"):
        kw["original_dst"] = True           # as Envoy: hand-off needs the original address
    chains = kw.get("filter_chains") or ()
    needs = any(ch.match.server_names or ch.match.transport_protocol
                or ch.match.application_protocols for ch in chains)
    if "inspectors" in m:
        ins = [c.choice(x, f"{p}.inspectors[{j}]", "inspector", INSPECTORS)
               for j, x in enumerate(c.seq(m["inspectors"], f"{p}.inspectors"))]
        kw["inspectors"] = tuple(x for x in INSPECTORS if x in ins)
    elif needs:
        kw["inspectors"] = INSPECTORS
    if kw.get("bind_to_port") is False and not any(
            k in m for k in ("filter_chains", "protocol", "route_table", "cluster")):
        c.err(p, "bind_to_port: false: the listener still needs what it serves")


def _route_tables(c: _Checker, raw: Any, known_clusters: Optional[set]) -> dict:
    out: dict = {}
    if not isinstance(raw, dict):
        c.err("route_tables", f"expected a mapping of table name to table, got {_show(raw)}")
        return out
    for name, table in raw.items():
        if not isinstance(name, str) or not name:
            c.err("route_tables", f"table names must be non-empty strings, got {_show(name)}")
            continue
        p = _name_path("route_tables", name)
        m = c.mapping(table, p, ("virtual_hosts", "routes", "strip_host_port"))
        if m is None:
            continue
        tkw: dict[str, Any] = {}
        if "strip_host_port" in m:
            tkw["strip_host_port"] = c.boolean(m["strip_host_port"], f"{p}.strip_host_port")
        if ("virtual_hosts" in m) == ("routes" in m):
            c.err(p, "expected exactly one of virtual_hosts, routes"
                  + (" (got both)" if "routes" in m else ""))
            continue
        if "routes" in m:
            routes = _routes(c, m["routes"], f"{p}.routes", known_clusters)
            vhosts = (VirtualHost(name="default", domains=("*",), routes=routes),)
        else:
            vhosts = _virtual_hosts(c, m["virtual_hosts"], f"{p}.virtual_hosts", known_clusters)
        out[name] = RouteTable(name=name, virtual_hosts=vhosts, **tkw)
    return out


def _virtual_hosts(c: _Checker, raw: Any, path: str,
                   known_clusters: Optional[set]) -> tuple[VirtualHost, ...]:
    out = []
    names: dict = {}
    domains_seen: dict = {}       # domain -> "virtual_hosts[i].domains[j]"
    list_name = path.rsplit(".", 1)[-1]
    for i, item in enumerate(c.seq(raw, path, nonempty=True)):
        p = f"{path}[{i}]"
        m = c.mapping(item, p, ("name", "domains", "routes"))
        if m is None:
            continue
        name = c.unique_name(c.required(m, p, "name"), f"{p}.name", "virtual host", names)
        domains = []
        dp = f"{p}.domains"
        d_raw = c.required(m, p, "domains")
        for j, d in enumerate(c.seq(d_raw, dp, nonempty=True) if d_raw is not _MISSING else []):
            dom = _domain(c, d, f"{dp}[{j}]")
            if dom is None:
                continue
            where = f"{list_name}[{i}].domains[{j}]"
            if dom in domains_seen:
                if dom == "*":
                    c.err(f"{dp}[{j}]", f'only one "*" domain is allowed per route table '
                                        f"(also at {domains_seen[dom]})")
                else:
                    c.err(f"{dp}[{j}]", f"duplicate domain {dom!r} (also at {domains_seen[dom]})")
            else:
                domains_seen[dom] = where
            domains.append(dom)
        r_raw = c.required(m, p, "routes")
        routes = () if r_raw is _MISSING else _routes(c, r_raw, f"{p}.routes", known_clusters)
        out.append(VirtualHost(name=name, domains=tuple(domains), routes=routes))
    return tuple(out)


def _domain(c: _Checker, v: Any, path: str) -> Optional[str]:
    s = c.text(v, path)
    if s is None:
        return None
    d = s.lower()
    if d == "*":
        return d
    if d.startswith("*."):
        ok = _valid_hostname(d[2:])
    else:
        host, port = d, None
        m = re.fullmatch(r"\[([^\]]*)\](?::([^:]*))?", d)
        if m:
            host, port = m.group(1), m.group(2)
            ok = _valid_ipv6(host)
        else:
            if ":" in d:
                host, _, port = d.rpartition(":")
            ok = _valid_hostname(host)
        if ok and port is not None:
            ok = bool(_PORT_RE.fullmatch(port)) and 1 <= int(port) <= 65535
    if not ok:
        c.err(path, f'invalid domain {s!r} (expected "*", "*.suffix", or a host with an '
                    f'optional ":port")')
        return None
    return d


_ROUTE_KEYS = ("match", "cluster", "weighted_clusters", "direct_response", "timeout_ms",
               "grpc_timeout_header_max_ms", "grpc_timeout_header_offset_ms",
               "request_headers_to_add", "request_headers_to_remove", "retry_policy",
               "hash_policy", "mirrors", "attempt_count_header", "fault",
               "local_rate_limit")
_ACTIONS = ("cluster", "weighted_clusters", "direct_response")


def _routes(c: _Checker, raw: Any, path: str,
            known_clusters: Optional[set]) -> tuple[Route, ...]:
    return tuple(_route(c, item, f"{path}[{i}]", known_clusters)
                 for i, item in enumerate(c.seq(raw, path, nonempty=True)))


def _cluster_ref(c: _Checker, v: Any, path: str,
                 known_clusters: Optional[set]) -> Optional[str]:
    name = c.text(v, path)
    if name is not None and known_clusters is not None and name not in known_clusters:
        c.err(path, f"no cluster named {name!r}")
    return name


def _route(c: _Checker, item: Any, p: str, known_clusters: Optional[set]) -> Optional[Route]:
    m = c.mapping(item, p, _ROUTE_KEYS)
    if m is None:
        return None
    kw: dict[str, Any] = {"match": _match(c, m.get("match"), f"{p}.match")}

    actions = [a for a in _ACTIONS if a in m]
    if len(actions) != 1:
        got = f" (got {', '.join(actions)})" if actions else ""
        c.err(p, f"expected exactly one of {', '.join(_ACTIONS)}{got}")
    if "cluster" in m:
        kw["cluster"] = _cluster_ref(c, m["cluster"], f"{p}.cluster", known_clusters)
    if "weighted_clusters" in m:
        wp = f"{p}.weighted_clusters"
        wcs = []
        seen: dict = {}
        for i, w in enumerate(c.seq(m["weighted_clusters"], wp, nonempty=True)):
            ip = f"{wp}[{i}]"
            wm = c.mapping(w, ip, ("cluster", "weight"))
            if wm is None:
                continue
            cl_raw = c.required(wm, ip, "cluster")
            cl = None if cl_raw is _MISSING else _cluster_ref(c, cl_raw, f"{ip}.cluster",
                                                              known_clusters)
            if cl is not None:
                if cl in seen:
                    c.err(f"{ip}.cluster",
                          f"duplicate cluster {cl!r} (also weighted_clusters[{seen[cl]}])")
                else:
                    seen[cl] = i
            weight = c.integer(c.required(wm, ip, "weight"), f"{ip}.weight", lo=1)
            wcs.append(WeightedCluster(cluster=cl, weight=weight))
        kw["weighted_clusters"] = tuple(wcs)
    if "direct_response" in m:
        dp = f"{p}.direct_response"
        dm = c.mapping(m["direct_response"], dp, ("status", "body"))
        if dm is not None:
            status = c.integer(c.required(dm, dp, "status"), f"{dp}.status", lo=200, hi=599)
            dkw = {}
            if "body" in dm:
                dkw["body"] = c.text(dm["body"], f"{dp}.body", nonempty=False)
            kw["direct_response"] = DirectResponse(status=status, **dkw)
    if "timeout_ms" in m:
        kw["timeout_ms"] = c.integer(m["timeout_ms"], f"{p}.timeout_ms", lo=0)
    for key in ("grpc_timeout_header_max_ms", "grpc_timeout_header_offset_ms"):
        if key in m:
            kw[key] = c.integer(m[key], f"{p}.{key}", lo=0)
    if kw.get("grpc_timeout_header_offset_ms") and "grpc_timeout_header_max_ms" not in kw:
        c.err(f"{p}.grpc_timeout_header_offset_ms", "without grpc_timeout_header_max_ms the "
              "grpc-timeout header is not used, so an offset has nothing to apply to (set "
              "grpc_timeout_header_max_ms: 0 for no cap)")
    if "request_headers_to_add" in m:
        kw["request_headers_to_add"] = _headers_to_add(c, m["request_headers_to_add"],
                                                       f"{p}.request_headers_to_add")
    if "request_headers_to_remove" in m:
        rp = f"{p}.request_headers_to_remove"
        items = c.seq(m["request_headers_to_remove"], rp)
        names = (c.text(n, f"{rp}[{i}]") for i, n in enumerate(items))
        kw["request_headers_to_remove"] = tuple(n.lower() for n in names if n is not None)
    if m.get("retry_policy") is not None:
        kw["retry_policy"] = _retry_policy(c, m["retry_policy"], f"{p}.retry_policy")
    if m.get("hash_policy"):
        out = []
        for ip, hm in _mappings(c, m["hash_policy"], f"{p}.hash_policy",
                                ("kind", "name", "terminal")):
            kind = c.choice(c.required(hm, ip, "kind"), f"{ip}.kind", "hash policy kind",
                            HASH_POLICY_KINDS)
            hkw: dict[str, Any] = {"kind": kind}
            if kind in ("header", "cookie", "query_parameter"):
                name = c.text(c.required(hm, ip, "name"), f"{ip}.name")
                hkw["name"] = name.lower() if kind == "header" and name else name
            elif hm.get("name") not in (None, ""):
                c.err(f"{ip}.name", f"not for a {kind} hash policy")
            if "terminal" in hm:
                hkw["terminal"] = c.boolean(hm["terminal"], f"{ip}.terminal")
            if None not in hkw.values():
                out.append(HashPolicy(**hkw))
        kw["hash_policy"] = tuple(out)
    if m.get("fault") is not None:
        kw["fault"] = _fault(c, m["fault"], f"{p}.fault")
    if m.get("local_rate_limit") is not None:
        kw["local_rate_limit"] = _local_rate_limit(c, m["local_rate_limit"],
                                                   f"{p}.local_rate_limit")
    if "attempt_count_header" in m:
        kw["attempt_count_header"] = c.boolean(m["attempt_count_header"],
                                               f"{p}.attempt_count_header")
    if m.get("mirrors"):
        out = []
        for ip, mm in _mappings(c, m["mirrors"], f"{p}.mirrors",
                                ("cluster", "per_million", "host_suffix")):
            mkw: dict[str, Any] = {"cluster": _cluster_ref(c, c.required(mm, ip, "cluster"),
                                                           f"{ip}.cluster", known_clusters)}
            if "per_million" in mm:
                mkw["per_million"] = c.integer(mm["per_million"], f"{ip}.per_million", lo=0,
                                               hi=1000000)
            if "host_suffix" in mm:
                mkw["host_suffix"] = c.boolean(mm["host_suffix"], f"{ip}.host_suffix")
            if None not in mkw.values():
                out.append(Mirror(**mkw))
        kw["mirrors"] = tuple(out)
    return Route(**kw)


_FAULT_FIELDS = {f.name: f for f in dataclasses.fields(Fault)}
_RL_FIELDS = {f.name: f for f in dataclasses.fields(LocalRateLimit)}


def _fault(c: _Checker, raw: Any, p: str) -> Optional[Fault]:
    m = c.mapping(raw, p, _FAULT_FIELDS)
    if m is None:
        return None
    kw: dict[str, Any] = {}
    for name, f in _FAULT_FIELDS.items():
        if name not in m:
            continue
        if f.type == "bool":
            kw[name] = c.boolean(m[name], f"{p}.{name}")
        elif name.endswith("per_million") or name.endswith("header_unit"):
            kw[name] = c.integer(m[name], f"{p}.{name}", lo=0, hi=1000000)
        elif name == "abort_status":            # 0: none (a header may give one)
            kw[name] = c.integer(m[name], f"{p}.{name}", lo=0, hi=599)
            if kw[name] is not None and 0 < kw[name] < 200:
                c.err(f"{p}.{name}", f"expected 0 or a status in 200..599, got {kw[name]}")
        else:
            kw[name] = c.integer(m[name], f"{p}.{name}", lo=0)
    if None in kw.values():
        return None
    return Fault(**kw)


def _local_rate_limit(c: _Checker, raw: Any, p: str) -> Optional[LocalRateLimit]:
    m = c.mapping(raw, p, _RL_FIELDS)
    if m is None:
        return None
    kw: dict[str, Any] = {"max_tokens": c.integer(c.required(m, p, "max_tokens"),
                                                   f"{p}.max_tokens", lo=1)}
    for name in ("tokens_per_fill", "fill_interval_ms"):
        if name in m:
            kw[name] = c.integer(m[name], f"{p}.{name}", lo=1)
    for name in ("enabled_per_million", "enforced_per_million"):
        if name in m:
            kw[name] = c.integer(m[name], f"{p}.{name}", lo=0, hi=1000000)
    if "status" in m:
        kw["status"] = c.integer(m["status"], f"{p}.status", lo=200, hi=599)
    if "x_ratelimit_headers" in m:
        kw["x_ratelimit_headers"] = c.boolean(m["x_ratelimit_headers"],
                                              f"{p}.x_ratelimit_headers")
    if "response_headers_to_add" in m:
        kw["response_headers_to_add"] = _headers_to_add(c, m["response_headers_to_add"],
                                                        f"{p}.response_headers_to_add")
    if None in kw.values():
        return None
    return LocalRateLimit(**kw)


def _with_http_filters(c: _Checker, lst: Listener, tables: dict) -> Listener:
    """An http1 listener (chain) runs the HTTP filters that it or its routes configure (in
    the order of its `http_filters`, else fault before local_rate_limit); a route's filter
    config needs its listener to run that filter."""
    used: set = set()
    for ch in lst.chains():
        table = tables.get(ch.route_table) if ch.route_table else None
        routes = [r for vh in (table.virtual_hosts if table else ()) if vh is not None
                  for r in vh.routes if r is not None]
        here = {name for name in HTTP_FILTERS
                if getattr(lst, name) is not None or any(getattr(r, name) is not None
                                                         for r in routes)}
        if ch.protocol == "http1":
            used |= here
        elif ch.protocol == "bolt":
            # a Bolt route may have its own token bucket (calls beyond it: status 4)
            bad = here - {"local_rate_limit"} if getattr(lst, "local_rate_limit") is None \
                else here
            if bad:
                c.err(f"route_tables.{ch.route_table}", f"{', '.join(sorted(bad))} on bolt "
                      f"listener {lst.name!r} or its routes: HTTP filters are for HTTP (a "
                      f"Bolt route may have a local_rate_limit)")
    if lst.http_filters:
        for name in sorted(used - set(lst.http_filters)):
            c.err(f"listeners.{lst.name}.http_filters", f"{name} is configured (on the "
                  f"listener or its routes) but not in http_filters")
        return lst
    if not used:
        return lst
    return dataclasses.replace(lst, http_filters=tuple(n for n in HTTP_FILTERS if n in used))


def _mappings(c: _Checker, raw: Any, path: str, keys: tuple):
    """(path of item i, item) for each item of a list that is a mapping of those keys."""
    for i, item in enumerate(c.seq(raw, path)):
        ip = f"{path}[{i}]"
        m = c.mapping(item, ip, keys)
        if m is not None:
            yield ip, m


_RETRY_FIELDS = {f.name for f in dataclasses.fields(RetryPolicy)}


def _retry_policy(c: _Checker, raw: Any, p: str) -> Optional[RetryPolicy]:
    m = c.mapping(raw, p, _RETRY_FIELDS)
    if m is None:
        return None
    kw: dict[str, Any] = {}
    on = c.seq(c.required(m, p, "retry_on"), f"{p}.retry_on", nonempty=True) \
        if "retry_on" in m else []
    kw["retry_on"] = tuple(c.choice(x, f"{p}.retry_on[{i}]", "retry condition", RETRY_ON)
                           for i, x in enumerate(on))
    for name, lo in (("num_retries", 0), ("per_try_timeout_ms", 0), ("backoff_base_ms", 1),
                     ("backoff_max_ms", 1), ("host_selection_retry_max_attempts", 1)):
        if m.get(name) is not None:
            kw[name] = c.integer(m[name], f"{p}.{name}", lo=lo)
    if "previous_hosts" in m:
        kw["previous_hosts"] = c.boolean(m["previous_hosts"], f"{p}.previous_hosts")
    if "bolt_statuses" in m:
        kw["bolt_statuses"] = tuple(
            c.integer(x, f"{p}.bolt_statuses[{i}]", lo=1, hi=255)
            for i, x in enumerate(c.seq(m["bolt_statuses"], f"{p}.bolt_statuses")))
        if None in kw["bolt_statuses"]:
            return None
    if "retriable_status_codes" in m:
        kw["retriable_status_codes"] = tuple(
            c.integer(x, f"{p}.retriable_status_codes[{i}]", lo=100, hi=599)
            for i, x in enumerate(c.seq(m["retriable_status_codes"],
                                        f"{p}.retriable_status_codes")))
    if kw.get("backoff_max_ms") is not None and kw.get("backoff_base_ms") is not None \
            and kw["backoff_max_ms"] < kw["backoff_base_ms"]:
        c.err(f"{p}.backoff_max_ms", "must be at least backoff_base_ms")
    if any(v is None for v in kw.values()) or None in kw["retry_on"] or \
            None in kw.get("retriable_status_codes", ()):
        return None
    return RetryPolicy(**kw)


def _headers_to_add(c: _Checker, raw: Any, path: str) -> tuple[tuple[str, str], ...]:
    out = []
    if isinstance(raw, dict):
        for name, value in raw.items():
            if not isinstance(name, str) or not name:
                c.err(path, f"header names must be non-empty strings, got {_show(name)}")
                continue
            v = c.text(value, _key(path, name), nonempty=False)
            if v is not None:
                out.append((name.lower(), v))
    elif isinstance(raw, list):
        for i, item in enumerate(raw):
            ip = f"{path}[{i}]"
            m = c.mapping(item, ip, ("name", "value"))
            if m is None:
                continue
            n = c.text(c.required(m, ip, "name"), f"{ip}.name")
            v = c.text(c.required(m, ip, "value"), f"{ip}.value", nonempty=False)
            if n is not None and v is not None:
                out.append((n.lower(), v))
    else:
        c.err(path, f"expected a list of {{name, value}} or a mapping of name to value, "
                    f"got {_show(raw)}")
    return tuple(out)


_PATH_MATCHES = ("path", "prefix", "regex")
_HEADER_MATCHES = ("exact", "prefix", "regex", "present")


def _match(c: _Checker, raw: Any, path: str) -> RouteMatch:
    if raw is None:                               # omitted, `match:` or `match: null`
        return RouteMatch()
    m = c.mapping(raw, path, _PATH_MATCHES + ("headers",))
    if m is None:
        return RouteMatch()
    kinds = [k for k in _PATH_MATCHES if k in m]
    if len(kinds) > 1:
        c.err(path, f"at most one of path, prefix, regex (got {', '.join(kinds)})")
    kw: dict[str, Any] = {}
    for k in ("path", "prefix"):
        if k in m:
            s = c.text(m[k], f"{path}.{k}")
            if s is not None and not s.startswith("/"):
                c.err(f"{path}.{k}", f'must start with "/", got {s!r}')
            kw[k] = s
    if "regex" in m:
        kw["regex"] = c.regex(m["regex"], f"{path}.regex")
    if "headers" in m:
        hp = f"{path}.headers"
        kw["headers"] = tuple(_header_match(c, h, f"{hp}[{i}]")
                              for i, h in enumerate(c.seq(m["headers"], hp)))
    return RouteMatch(**kw)


def _header_match(c: _Checker, raw: Any, p: str) -> Optional[HeaderMatch]:
    m = c.mapping(raw, p, ("name",) + _HEADER_MATCHES)
    if m is None:
        return None
    name = c.text(c.required(m, p, "name"), f"{p}.name")
    kinds = [k for k in _HEADER_MATCHES if k in m]
    if len(kinds) != 1:
        got = f" (got {', '.join(kinds)})" if kinds else ""
        c.err(p, f"expected exactly one of {', '.join(_HEADER_MATCHES)}{got}")
    kw: dict[str, Any] = {}
    for k in ("exact", "prefix"):
        if k in m:
            kw[k] = c.text(m[k], f"{p}.{k}", nonempty=False)
    if "regex" in m:
        kw["regex"] = c.regex(m["regex"], f"{p}.regex")
    if "present" in m:
        kw["present"] = c.boolean(m["present"], f"{p}.present")
    return HeaderMatch(name=name.lower() if name is not None else None, **kw)


def _zk_common(c: _Checker, m: dict, p: str, kw: dict) -> None:
    """servers, group, root, session_timeout_ms: shared by discovery and publish."""
    servers = c.text(c.required(m, p, "servers"), f"{p}.servers")
    if servers is not None:
        parts = [s.strip() for s in servers.split(",")]
        for s in parts:
            if c.address(s, f"{p}.servers", min_port=1) is None:
                break
        servers = ",".join(parts)
    kw["servers"] = servers
    if "group" in m:
        kw["group"] = c.text(m["group"], f"{p}.group")
    if "root" in m:
        root = c.text(m["root"], f"{p}.root")
        if root is not None and (not root.startswith("/") or root.endswith("/") and root != "/"
                                 or "//" in root):
            c.err(f"{p}.root", f'expected an absolute ZooKeeper path like "/sofa-rpc", '
                  f"got {_show(root)}")
        kw["root"] = root
    if "session_timeout_ms" in m:
        kw["session_timeout_ms"] = c.integer(m["session_timeout_ms"], f"{p}.session_timeout_ms",
                                             lo=1000, hi=600000)


def _service_id(c: _Checker, v: Any, path: str) -> Optional[str]:
    s = c.text(v, path)
    if s is None:
        return None
    iface, sep, version = s.partition(":")
    if not sep or not iface or not version or "/" in iface or any(ch.isspace() for ch in s):
        c.err(path, f'expected a SOFARPC service id "interface:version", got {_show(s)}')
        return None
    return s


def _zookeeper_block(c: _Checker, raw: Any, p: str, fields) -> tuple:
    """`{zookeeper: {...}}` (the only registry so far) -> (its mapping, its path), or
    (None, path) after reporting what is wrong."""
    zp = f"{p}.zookeeper"
    m = c.mapping(raw, p, ("zookeeper",))
    if m is None:
        return None, zp
    if "zookeeper" not in m:
        c.err(p, "expected a registry: zookeeper")
        return None, zp
    return c.mapping(m["zookeeper"], zp, fields), zp


def _discovery(c: _Checker, raw: Any, p: str) -> Optional[Discovery]:
    z, zp = _zookeeper_block(c, raw, p, _ZK_DISCOVERY_FIELDS)
    if z is None:
        return None
    kw: dict[str, Any] = {}
    _zk_common(c, z, zp, kw)
    kw["service"] = _service_id(c, c.required(z, zp, "service"), f"{zp}.service")
    if "protocol" in z:
        kw["protocol"] = c.text(z["protocol"], f"{zp}.protocol")
    if "initial_fetch_timeout_ms" in z:
        kw["initial_fetch_timeout_ms"] = c.integer(z["initial_fetch_timeout_ms"],
                                                   f"{zp}.initial_fetch_timeout_ms", lo=0,
                                                   hi=600000)
    if any(v is None for v in kw.values()):
        return None
    return Discovery(ZookeeperDiscovery(**kw))


def _publish(c: _Checker, raw: Any, p: str, addr: Optional[Address]) -> Optional[Publish]:
    z, zp = _zookeeper_block(c, raw, p, _ZK_PUBLISH_FIELDS)
    if z is None:
        return None
    kw: dict[str, Any] = {}
    _zk_common(c, z, zp, kw)
    services = c.required(z, zp, "services")
    services = [] if services is _MISSING else c.seq(services, f"{zp}.services", nonempty=True)
    kw["services"] = tuple(_service_id(c, s, f"{zp}.services[{i}]")
                           for i, s in enumerate(services))
    if "advertise_host" in z:
        host = c.text(z["advertise_host"], f"{zp}.advertise_host")
        if host is not None and not (_valid_hostname(host) or _valid_ipv6(host)):
            c.err(f"{zp}.advertise_host", f"invalid host {host!r}")
        kw["advertise_host"] = host
    elif addr is not None and _canonical_host(addr.host) in ("0.0.0.0", "::"):
        c.err(f"{zp}.advertise_host", "required when the listener listens on every address "
              "(the address callers are to use)")
    if "advertise_port" in z:
        kw["advertise_port"] = c.integer(z["advertise_port"], f"{zp}.advertise_port", lo=0,
                                         hi=65535)
    if "weight" in z:
        kw["weight"] = c.integer(z["weight"], f"{zp}.weight", lo=1, hi=2**31 - 1)
    if "app_name" in z:
        kw["app_name"] = c.text(z["app_name"], f"{zp}.app_name", nonempty=False)
    if any(v is None for v in kw.values()) or None in kw["services"]:
        return None
    return Publish(ZookeeperPublish(**kw))


_ZK_DISCOVERY_FIELDS = {f.name for f in dataclasses.fields(ZookeeperDiscovery)}
_ZK_PUBLISH_FIELDS = {f.name for f in dataclasses.fields(ZookeeperPublish)}


# (weights are given with the endpoints: {address, weight})
_CLUSTER_FIELDS = {f.name: f for f in dataclasses.fields(Cluster) if f.name != "weights"}
_CLUSTER_KEYS = set(_CLUSTER_FIELDS) | {"type"}
CLUSTER_TYPES = ("static", "original_dst")


_HC_FIELDS = {f.name: f for f in dataclasses.fields(HealthCheck)}
_OD_FIELDS = {f.name: f for f in dataclasses.fields(OutlierDetection)}


def _health_check(c: _Checker, raw: Any, p: str) -> Optional[HealthCheck]:
    m = c.mapping(raw, p, _HC_FIELDS)
    if m is None:
        return None
    kw: dict[str, Any] = {}
    kind = c.choice(c.required(m, p, "type"), f"{p}.type", "health check type",
                    ("http", "tcp", "bolt"))
    kw["type"] = kind
    for name in ("timeout_ms", "interval_ms"):
        kw[name] = c.integer(c.required(m, p, name), f"{p}.{name}", lo=1)
    for name in ("unhealthy_threshold", "healthy_threshold", "no_traffic_interval_ms",
                 "unhealthy_interval_ms"):
        if m.get(name) is not None:
            kw[name] = c.integer(m[name], f"{p}.{name}", lo=1)
    for name in ("interval_jitter_ms", "initial_jitter_ms"):
        if name in m:
            kw[name] = c.integer(m[name], f"{p}.{name}", lo=0)
    if "interval_jitter_pct" in m:
        kw["interval_jitter_pct"] = c.integer(m["interval_jitter_pct"],
                                              f"{p}.interval_jitter_pct", lo=0, hi=100)
    http_only = ("path", "host", "expected_statuses")
    tcp_only = ("send_hex", "receive_hex")
    for name in (tcp_only if kind == "http" else http_only if kind == "tcp"
                 else http_only + tcp_only if kind == "bolt" else ()):
        if m.get(name) is not None and m.get(name) != ():
            c.err(f"{p}.{name}", f"not for a {kind} health check")
    if kind == "http":
        path = c.text(c.required(m, p, "path"), f"{p}.path")
        if path is not None and not path.startswith("/"):
            c.err(f"{p}.path", f"expected a path starting with /, got {_show(path)}")
        kw["path"] = path
        if m.get("host") is not None:
            kw["host"] = c.text(m["host"], f"{p}.host")
        if "expected_statuses" in m:
            ranges = []
            for i, item in enumerate(c.seq(m["expected_statuses"], f"{p}.expected_statuses",
                                           nonempty=True)):
                ip = f"{p}.expected_statuses[{i}]"
                if isinstance(item, int) and not isinstance(item, bool) \
                        and 100 <= item <= 599:
                    ranges.append((item, item + 1))
                elif (isinstance(item, list) and len(item) == 2
                      and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
                      and 100 <= item[0] < item[1] <= 600):
                    ranges.append((item[0], item[1]))
                else:
                    c.err(ip, f"expected a status (100..599) or a [start, end) pair, got "
                              f"{_show(item)}")
            kw["expected_statuses"] = tuple(ranges)
    elif kind == "tcp":
        if m.get("send_hex") is not None:
            kw["send_hex"] = _hex(c, m["send_hex"], f"{p}.send_hex")
        if m.get("receive_hex"):
            kw["receive_hex"] = tuple(_hex(c, x, f"{p}.receive_hex[{i}]") for i, x in
                                      enumerate(c.seq(m["receive_hex"], f"{p}.receive_hex")))
    if any(v is None for v in kw.values()):
        return None
    return HealthCheck(**kw)


def _hex(c: _Checker, v: Any, path: str) -> Optional[str]:
    s = c.text(v, path)
    if s is None:
        return None
    if not re.fullmatch(r"(?:[0-9a-fA-F]{2})+", s):
        c.err(path, f"expected bytes in hex (an even number of 0-9a-f), got {_show(s)}")
        return None
    return s.lower()


def _outlier_detection(c: _Checker, raw: Any, p: str) -> Optional[OutlierDetection]:
    m = c.mapping(raw, p, _OD_FIELDS)
    if m is None:
        return None
    kw: dict[str, Any] = {}
    for name in m:
        if name not in _OD_FIELDS:
            continue
        if name == "split_external_local_origin_errors":
            kw[name] = c.boolean(m[name], f"{p}.{name}")
        elif name.endswith("_pct"):
            kw[name] = c.integer(m[name], f"{p}.{name}", lo=0, hi=100)
        elif name.startswith("consecutive_"):
            kw[name] = c.integer(m[name], f"{p}.{name}", lo=0)      # 0: this detector off
        else:
            kw[name] = c.integer(m[name], f"{p}.{name}", lo=1)
    if any(v is None for v in kw.values()):
        return None
    return OutlierDetection(**kw)


NOT_YET = "not supported yet"


def _original_dst(c: _Checker, raw: Any, p: str) -> Optional[OriginalDst]:
    m = c.mapping(raw, p, {f.name for f in dataclasses.fields(OriginalDst)})
    if m is None:
        return None
    kw: dict = {}
    if "use_http_header" in m:
        kw["use_http_header"] = c.boolean(m["use_http_header"], f"{p}.use_http_header")
    if "http_header_name" in m:
        h = c.text(m["http_header_name"], f"{p}.http_header_name")
        kw["http_header_name"] = h.lower() if h else h
    if "port_override" in m:
        kw["port_override"] = c.integer(m["port_override"], f"{p}.port_override", lo=0,
                                        hi=65535)
    if "cleanup_interval_ms" in m:
        kw["cleanup_interval_ms"] = c.integer(m["cleanup_interval_ms"],
                                              f"{p}.cleanup_interval_ms", lo=1)
    return OriginalDst(**{k: v for k, v in kw.items() if v is not None})


def _clusters(c: _Checker, raw: Any) -> dict:
    out: dict = {}
    names: dict = {}
    if not isinstance(raw, list):
        c.err("clusters", f"expected a list, got {_show(raw)}")
        return out
    for i, item in enumerate(raw):
        p = f"clusters[{i}]"
        m = c.mapping(item, p, _CLUSTER_KEYS)
        if m is None:
            continue
        kw: dict[str, Any] = {}
        name = c.unique_name(c.required(m, p, "name"), f"{p}.name", "cluster", names)
        kw["name"] = name
        ep = f"{p}.endpoints"
        ctype = c.choice(m["type"], f"{p}.type", "cluster type", CLUSTER_TYPES) \
            if "type" in m else ("original_dst" if m.get("original_dst") is not None
                                 else "static")
        if ctype == "original_dst":
            kw["original_dst"] = _original_dst(c, m.get("original_dst") or {},
                                               f"{p}.original_dst")
            if m.get("endpoints"):
                c.err(ep, "an original_dst cluster has no endpoints: each connection goes "
                          "where its client addressed it")
            for key in ("health_check", "outlier_detection", "discovery"):
                if m.get(key) is not None:
                    c.err(f"{p}.{key}", f"not for original_dst clusters: {NOT_YET}")
            if m.get("lb_policy") not in (None, "round_robin"):
                c.err(f"{p}.lb_policy", "an original_dst cluster balances by destination")
        elif m.get("original_dst") is not None:
            c.err(f"{p}.original_dst", "only for type: original_dst")
        if m.get("discovery") is not None and ctype != "original_dst":
            kw["discovery"] = _discovery(c, m["discovery"], f"{p}.discovery")
        if ctype == "original_dst" or "discovery" in kw:
            e_raw = m.get("endpoints", [])   # with a registry: the providers last known
        else:
            e_raw = c.required(m, p, "endpoints")
        endpoints = []
        seen: dict = {}
        # an empty list is allowed: the cluster answers 503 no_healthy_upstream until it has
        # endpoints (from a control plane or a registry), as an Envoy cluster without hosts
        weights = []
        for j, e in enumerate(c.seq(e_raw, ep) if e_raw is not _MISSING else []):
            w = 1
            if isinstance(e, dict):             # {address: "host:port", weight: N}
                em = c.mapping(e, f"{ep}[{j}]", ("address", "weight"))
                e = c.required(em, f"{ep}[{j}]", "address")
                if "weight" in em:
                    w = c.integer(em["weight"], f"{ep}[{j}].weight", lo=1, hi=2**31 - 1)
                if e is _MISSING:
                    continue
                a = c.address(e, f"{ep}[{j}].address", min_port=1)
            else:
                a = c.address(e, f"{ep}[{j}]", min_port=1)
            if a is None:
                continue
            weights.append(w)
            if _addr_key(a) in seen:
                c.err(f"{ep}[{j}]",
                      f"duplicate endpoint {str(a)!r} (also endpoints[{seen[_addr_key(a)]}])")
            else:
                seen[_addr_key(a)] = j
            endpoints.append(a)
        kw["endpoints"] = tuple(endpoints)
        if any(w != 1 for w in weights) and None not in weights:
            kw["weights"] = tuple(weights)
            if m.get("lb_policy") == "maglev":
                c.err(ep, "unequal weights with maglev: " + "not supported yet")
        if "lb_policy" in m:
            kw["lb_policy"] = c.choice(m["lb_policy"], f"{p}.lb_policy", "policy", LB_POLICIES)
        if "http_protocol" in m:
            kw["http_protocol"] = c.choice(m["http_protocol"], f"{p}.http_protocol",
                                           "HTTP protocol", ("http1", "http2"))
        for f in _CLUSTER_FIELDS.values():
            if f.type == "int" and f.name in m and f.name != "healthy_panic_threshold_pct":
                kw[f.name] = c.integer(m[f.name], f"{p}.{f.name}", lo=1)
        mts = kw.get("maglev_table_size")
        if isinstance(mts, int) and (mts < 2 or any(mts % d == 0 for d in
                                                    range(2, int(mts ** 0.5) + 1))):
            c.err(f"{p}.maglev_table_size", f"{mts} is not a prime number")
        if isinstance(kw.get("max_ring_size"), int) and \
                kw["max_ring_size"] < kw.get("min_ring_size", 1024):
            c.err(f"{p}.max_ring_size", "must be at least min_ring_size")
        if "healthy_panic_threshold_pct" in m:
            kw["healthy_panic_threshold_pct"] = c.integer(
                m["healthy_panic_threshold_pct"], f"{p}.healthy_panic_threshold_pct", lo=0,
                hi=100)
        if m.get("health_check") is not None:
            kw["health_check"] = _health_check(c, m["health_check"], f"{p}.health_check")
        if m.get("circuit_breakers") is not None:
            cb = c.mapping(m["circuit_breakers"], f"{p}.circuit_breakers",
                           {f.name for f in dataclasses.fields(CircuitBreakers)})
            if cb is not None:
                kw["circuit_breakers"] = CircuitBreakers(**{
                    k: c.integer(v, f"{p}.circuit_breakers.{k}", lo=0)
                    for k, v in cb.items() if v is not None})
        if m.get("outlier_detection") is not None:
            kw["outlier_detection"] = _outlier_detection(c, m["outlier_detection"],
                                                         f"{p}.outlier_detection")
        if m.get("tls") is not None:
            kw["tls"] = _upstream_tls(c, m["tls"], f"{p}.tls",
                                      kw.get("http_protocol") == "http2")
        if m.get("http2") is not None:
            kw["http2"] = http2_settings(c, m["http2"], f"{p}.http2")
        cl = Cluster(**kw)
        if name is not None and name not in out:
            out[name] = cl
    return out


def _access_log(c, v, p: str, protocols: set, kw: dict) -> None:
    """`access_log: PATH`, or `{path: PATH, format: "%START_TIME% ..."}` or
    `{path: PATH, json_format: {key: "%OPERATOR%", ...}}` (fastmesh._core.accesslog)."""
    from fastmesh._core.accesslog import compile_format
    fmt = json_fields = None
    if isinstance(v, dict):
        for k in v:
            if k not in ("path", "format", "json_format"):
                c.err(f"{p}.{k}", "unknown key (path, format, json_format)")
        if "path" not in v:
            c.err(f"{p}.path", "missing required key")
            return
        path = c.text(v["path"], f"{p}.path")
        if "format" in v and "json_format" in v:
            c.err(p, "format and json_format: one or the other")
        if "format" in v:
            fmt = c.text(v["format"], f"{p}.format")
            if fmt is not None:
                try:
                    compile_format(fmt)
                except ValueError as exc:
                    c.err(f"{p}.format", str(exc))
        if "json_format" in v:
            jf = v["json_format"]
            if not isinstance(jf, dict) or not jf:
                c.err(f"{p}.json_format", "a non-empty map of key -> operator text")
            else:
                json_fields = []
                for key, text in jf.items():
                    t = c.text(text, f"{p}.json_format.{key}")
                    if t is None:
                        continue
                    try:
                        compile_format(t)
                    except ValueError as exc:
                        c.err(f"{p}.json_format.{key}", str(exc))
                    json_fields.append((str(key), t))
    else:
        path = c.text(v, p)
    if path is None:
        return
    if not protocols & {"http1", "bolt"}:
        c.err(p, "only http1 and bolt listeners have an access log")
    elif "\0" in path:
        c.err(p, "a path cannot contain a NUL byte")
    else:
        kw["access_log"] = path
        if fmt is not None:
            kw["access_log_format"] = fmt
        if json_fields:
            kw["access_log_json"] = tuple(json_fields)
