"""Shared helpers for reading Envoy v3 messages given as plain YAML/JSON data.

Envoy parses YAML/JSON with the protobuf JSON mapping: a field may be spelled with its proto
name (``stat_prefix``) or its JSON name (``statPrefix``), durations are strings like ``"5s"``
(or, in YAML, ``{seconds, nanos}`` maps), enums are names (or their numbers), and 32-bit
integers may be given as decimal strings. These helpers accept all of that, report every
problem with the path as it is spelled in the file, and refuse whatever fastmesh cannot mean
the same way.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from typing import Any, Optional

from ..load import _MISSING, _Checker, _key, _show
from ..model import Address

log = logging.getLogger("fastmesh.config.envoy")

NOT_YET = "not supported yet"
UNKNOWN = "unknown field, or an Envoy field fastmesh does not support yet"

_CAMEL = re.compile(r"[A-Z]")


def snake(name: str) -> str:
    """``statPrefix`` -> ``stat_prefix``; proto names come back unchanged."""
    s = _SNAKE.get(name)
    if s is None:
        s = _CAMEL.sub(lambda m: "_" + m.group(0).lower(), name)
        if len(_SNAKE) < 4096:          # field names: a bounded vocabulary, unless hostile
            _SNAKE[name] = s
    return s


_SNAKE: dict = {}


class Msg:
    """One proto message: its fields by proto (snake_case) name, with paths as written."""

    def __init__(self, raw: dict, path: str, spelled: dict) -> None:
        self.raw = raw
        self.path = path
        self._spelled = spelled            # proto name -> key as written in the file

    def __contains__(self, name: str) -> bool:
        return name in self._spelled

    def get(self, name: str, default: Any = None) -> Any:
        if name not in self._spelled:
            return default
        return self.raw[self._spelled[name]]

    def p(self, name: str) -> str:
        """The path of field ``name`` as written in the file (proto spelling if absent)."""
        return _key(self.path, self._spelled.get(name, name))


class EnvoyChecker(_Checker):
    """The native loader's checker, plus proto-message reading and notes."""

    def __init__(self) -> None:
        super().__init__()
        self.notes: list[str] = []

    def note(self, path: str, msg: str) -> None:
        """Something accepted with a caveat: kept in ``notes`` and logged as a warning."""
        self.notes.append(f"{path}: {msg}")
        log.warning("%s: %s", path, msg)

    def message(self, raw: Any, path: str, fields: dict) -> Optional[Msg]:
        """Read a message. ``fields`` maps each proto field name fastmesh knows to None
        (supported: the caller reads it) or to the reason it is refused when present."""
        if not isinstance(raw, dict):
            self.err(path, f"expected a mapping, got {_show(raw)}")
            return None
        spelled: dict = {}
        for k in raw:
            if not isinstance(k, str):
                self.err(path, f"field names must be strings, got {_show(k)}")
                continue
            name = k if k == "@type" else snake(k)
            if name in spelled:
                self.err(_key(path, k), f"field {name!r} given twice "
                                        f"(as {spelled[name]!r} and {k!r})")
                continue
            spelled[name] = k
            if name not in fields:
                self.err(_key(path, k), UNKNOWN)
            elif fields[name] is not None:
                self.err(_key(path, k), fields[name])
        return Msg(raw, path, spelled)

    def need(self, m: Msg, name: str) -> Any:
        if name not in m:
            self.err(m.p(name), "missing required field")
            return _MISSING
        return m.get(name)

    def uint(self, v: Any, path: str, lo: int = 0, hi: int = 2**32 - 1) -> Optional[int]:
        """A proto uint32 (JSON allows a decimal string too)."""
        if v is _MISSING:
            return None
        if isinstance(v, str) and re.fullmatch(r"[0-9]{1,10}", v):
            v = int(v)
        return self.integer(v, path, lo=lo, hi=hi)

    def enum(self, v: Any, path: str, values: dict, what: str) -> Optional[str]:
        """An enum given by name or number; returns its name. ``values``: name -> number."""
        if isinstance(v, int) and not isinstance(v, bool):
            for name, num in values.items():
                if num == v:
                    return name
        elif isinstance(v, str) and v in values:
            return v
        self.err(path, f"unknown {what} {_show(v)} (Envoy's are: {', '.join(values)})")
        return None

    def duration_ms(self, v: Any, path: str) -> Optional[int]:
        """A google.protobuf.Duration ("5s", "0.25s", or {seconds, nanos}) in whole
        milliseconds, rounded up so that a non-zero duration never becomes 0."""
        if isinstance(v, str):
            mt = re.fullmatch(r"([0-9]{1,12})(?:\.([0-9]{1,9}))?s", v)
            if not mt:
                self.err(path, f'expected a duration like "5s" or "0.25s", got {_show(v)}')
                return None
            seconds, nanos = int(mt.group(1)), int((mt.group(2) or "").ljust(9, "0"))
        elif isinstance(v, dict):
            m = self.message(v, path, {"seconds": None, "nanos": None})
            if m is None:
                return None
            seconds = self.uint(m.get("seconds", 0), m.p("seconds"), hi=315576000000)
            nanos = self.uint(m.get("nanos", 0), m.p("nanos"), hi=999999999)
            if seconds is None or nanos is None:
                return None
        else:
            self.err(path, f'expected a duration like "5s" or "0.25s", got {_show(v)}')
            return None
        return seconds * 1000 + math.ceil(nanos / 1_000_000)

    def typed_config(self, raw: Any, path: str, type_url: str, fields: dict) -> Optional[Msg]:
        """An ``Any`` holding the message type ``type_url`` (without its prefix)."""
        if not isinstance(raw, dict):
            self.err(path, f"expected a mapping, got {_show(raw)}")
            return None
        t = raw.get("@type", _MISSING)
        want = "type.googleapis.com/" + type_url
        if t is _MISSING:
            self.err(_key(path, "@type"), f"missing required field (expected {want!r})")
        elif t != want:
            self.err(_key(path, "@type"), f"expected {want!r}, got {_show(t)}")
        return self.message(raw, path, dict(fields, **{"@type": None}))

    def socket_address(self, raw: Any, path: str, min_port: int) -> Optional[Address]:
        """A config.core.v3.Address holding a TCP socket_address."""
        m = self.message(raw, path, {
            "socket_address": None,
            "pipe": "unix socket addresses: " + NOT_YET,
            "envoy_internal_address": "Envoy internal addresses: " + NOT_YET})
        if m is None:
            return None
        sa = self.need(m, "socket_address")
        if sa is _MISSING:
            return None
        sp = m.p("socket_address")
        s = self.message(sa, sp, {
            "address": None, "port_value": None, "protocol": None,
            "named_port": "named ports: " + NOT_YET + " (use port_value)",
            "resolver_name": "custom resolvers: " + NOT_YET,
            "ipv4_compat": "ipv4_compat: " + NOT_YET,
            "network_namespace_filepath": "network namespaces: " + NOT_YET})
        if s is None:
            return None
        if "protocol" in s:
            proto = self.enum(s.get("protocol"), s.p("protocol"), {"TCP": 0, "UDP": 1},
                              "protocol")
            if proto == "UDP":
                self.err(s.p("protocol"), "UDP: " + NOT_YET)
        host = self.text(self.need(s, "address"), s.p("address"))
        port = self.uint(self.need(s, "port_value"), s.p("port_value"), lo=min_port, hi=65535)
        if host is None or port is None:
            return None
        return self.address(f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                            sp, min_port=min_port)

    def header_value(self, v: Any, path: str) -> Optional[str]:
        """A header value to add: Envoy expands %COMMAND% formatters in it; fastmesh has none
        yet, so only literal text is accepted (``%%`` is Envoy's escape for ``%``)."""
        s = self.text(v, path, nonempty=False)
        if s is None:
            return None
        if "%" in s.replace("%%", ""):
            self.err(path, f"{s!r}: Envoy expands %...% formatters in header values; "
                           f"fastmesh adds literal values only ({NOT_YET}; write %% for %)")
            return None
        return s.replace("%%", "%")


@functools.lru_cache(maxsize=65536)       # a control plane resends the same addresses
def is_ip(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=65536)
def is_ipv4(host: str) -> bool:
    """A dotted-quad IPv4 address, written the one way the native reader also takes it."""
    import ipaddress
    try:
        return str(ipaddress.IPv4Address(host)) == host
    except ValueError:
        return False


__all__ = ["EnvoyChecker", "Msg", "NOT_YET", "UNKNOWN", "_MISSING", "_show", "is_ip", "is_ipv4",
           "log", "snake"]
