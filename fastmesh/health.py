"""Active health checking: one prober per proxy, run by the supervisor (control world).

For every cluster with a ``health_check``, every endpoint address (hostnames resolved the way
the workers resolve them, fastmesh.cluster) is probed on its own schedule; the verdicts go to
every worker, which takes failed endpoints out of its balancing set (``Cluster.
set_health_check_failed``; panic mode still applies). Probes:

    http  GET <path> with Host <host, or the cluster's name> (and ``user-agent: Envoy/HC``):
          healthy when the status is in expected_statuses ([start, end) ranges; 200 default)
    bolt  a Bolt heartbeat; healthy when its ack (same id, status SUCCESS) comes back
    tcp   connect; with send_hex send those bytes; with receive_hex every one of those byte
          strings must come back, in order. Without either: a connection is a success

Every probe is bounded by timeout_ms. Verdicts follow Envoy (health_checker_impl.cc):

* an endpoint starts failed ("pending") and its first result decides at once: a success
  marks it healthy (Envoy: "during startup only a single successful health check is required
  to mark a host healthy"), a failure keeps it failed. At start-up the supervisor waits for
  this first round (bounded by the timeouts) before its workers serve, as Envoy's
  initialization waits for it; endpoints added later are failed until their first check;
* a healthy endpoint fails after unhealthy_threshold network failures in a row (refused or
  reset connection, timeout, a reply that does not match), or at once on an HTTP status
  outside expected_statuses (Envoy without retriable_statuses);
* a failed endpoint is healthy again after healthy_threshold successes in a row;
* the next check follows the end of the last one by interval (unhealthy_interval, when set,
  for a failed endpoint), plus jitter: up to interval_jitter_pct of it and up to
  interval_jitter_ms; the very first waits up to initial_jitter_ms. While the cluster has
  carried no traffic (as Envoy: no upstream connection yet; here, the workers' counters,
  read every second) the interval is no_traffic_interval_ms; once traffic shows up, the
  next check comes at most `interval` after the last one.

Counters per cluster, as Envoy's ``cluster.<name>.health_check.*``: ``health_check_attempt``,
``_success``, ``_failure`` (every failure), ``_network_failure`` and the gauge
``health_check_healthy`` (endpoints passing now).
"""
from __future__ import annotations

import asyncio
import logging
import random
from typing import Callable, Optional

from fastmesh.cluster import ClusterResolver, _is_ip
from fastmesh.config import model

log = logging.getLogger("fastmesh.health")

OK, ACTIVE_FAILURE, NETWORK_FAILURE = "ok", "active", "network"
TRAFFIC_POLL_S = 1.0            # while in no-traffic mode, look for traffic this often
MAX_STATUS_LINE_BYTES = 8192
MAX_BOLT_REPLY_BYTES = 65536        # a heartbeat ack is 20-odd bytes
COUNTERS = ("health_check_attempt", "health_check_success", "health_check_failure",
            "health_check_network_failure")
GAUGES = ("health_check_healthy",)


def _key(host: str, port: int) -> str:
    return str(model.Address(host, port))


class _Host:
    """One endpoint address under check."""

    def __init__(self, failed: bool = True):
        self.failed = failed            # the verdict the workers apply
        self.first = True               # no result yet: the first one decides at once
        self.successes = 0              # in a row
        self.failures = 0               # in a row
        self.last_check = 0.0           # loop time the last probe ended
        self.task: Optional[asyncio.Task] = None


class _TargetResolver(ClusterResolver):
    """The workers' resolution rules (fastmesh.cluster), reporting addresses only."""

    def __init__(self, loop, cfg: model.Cluster, on_targets: Callable[[list], None]):
        super().__init__(loop, cfg, None)
        self.on_targets = on_targets
        self.looked_up = not self.needs_dns()   # every name looked up once (or none to)

    async def resolve_once(self) -> None:
        await super().resolve_once()
        if not self.looked_up:
            self.looked_up = True
            self.apply()

    def apply(self) -> None:
        addrs: list = []
        for a in self.cfg.endpoints:
            for hp in self.resolved.get((a.host, a.port), ()):
                if hp not in addrs:
                    addrs.append(hp)
        self.on_targets(addrs)


class ClusterProber:
    """Probes one cluster's endpoints with its health_check settings."""

    def __init__(self, checker: "HealthChecker", cfg: model.Cluster,
                 previous: Optional[dict] = None):
        self.checker = checker
        self.loop = checker.loop
        self.cfg = cfg
        self.hc: model.HealthCheck = cfg.health_check
        self.hosts: dict[tuple[str, int], _Host] = {}
        self.previous = previous or {}       # (host, port) -> failed, from the prober before
        self.resolver = _TargetResolver(self.loop, cfg, self.set_targets)
        self.first_round = asyncio.Event()

    def start(self) -> None:
        self.resolver.start()

    def stop(self) -> None:
        self.resolver.stop()
        for h in self.hosts.values():
            if h.task is not None:
                h.task.cancel()
        self.hosts.clear()

    def update_endpoints(self, cfg: model.Cluster) -> None:
        """New endpoint list, same settings: hosts that stay keep their state."""
        self.cfg = cfg
        old = self.resolver
        old.stop()
        self.resolver = _TargetResolver(self.loop, cfg, self.set_targets)
        # names that stay keep their addresses until they are looked up again
        keep = {(a.host, a.port) for a in cfg.endpoints}
        self.resolver.resolved = {k: v for k, v in old.resolved.items() if k in keep}
        self.resolver.start()

    def set_targets(self, addrs: list) -> None:
        changed = False
        for hp in list(self.hosts):
            if hp not in addrs:
                h = self.hosts.pop(hp)
                if h.task is not None:
                    h.task.cancel()
                changed = True
        for hp in addrs:
            if hp not in self.hosts:
                # pending: failed until its first result (or the verdict of the prober this
                # one replaces, until its own first result)
                h = _Host(failed=self.previous.get(hp, True))
                self.hosts[hp] = h
                h.task = self.loop.create_task(self._run(hp, h))
                changed = True
        if changed:
            self.checker._changed(self.cfg.name)
        self._check_first_round()

    def _check_first_round(self) -> None:
        # hostnames: their first lookup is part of the first round
        if self.resolver.looked_up and all(not h.first for h in self.hosts.values()):
            self.first_round.set()

    def verdicts(self) -> dict:
        return {_key(host, port): h.failed for (host, port), h in self.hosts.items()}

    def healthy(self) -> int:
        return sum(1 for h in self.hosts.values() if not h.failed)

    # -- one endpoint ----------------------------------------------------------------

    async def _run(self, hp: tuple[str, int], h: _Host) -> None:
        hc = self.hc
        try:
            if hc.initial_jitter_ms:
                await asyncio.sleep(random.randrange(hc.initial_jitter_ms) / 1000.0)
            while True:
                result = await self._probe(hp)
                h.last_check = self.loop.time()
                self._record(hp, h, result)
                await self._wait_next(h)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("cluster %s: health checking %s stopped", self.cfg.name, _key(*hp))

    def _record(self, hp, h: _Host, result: str) -> None:
        st = self.checker.counters(self.cfg.name)
        st["health_check_attempt"] += 1
        was = h.failed
        if result == OK:
            st["health_check_success"] += 1
            h.failures = 0
            if h.failed:
                h.successes += 1
                if h.first or h.successes >= self.hc.healthy_threshold:
                    h.failed = False
                    h.successes = 0
        else:
            st["health_check_failure"] += 1
            if result == NETWORK_FAILURE:
                st["health_check_network_failure"] += 1
            h.successes = 0
            if not h.failed:
                h.failures += 1
                if result == ACTIVE_FAILURE or h.failures >= self.hc.unhealthy_threshold:
                    h.failed = True
                    h.failures = 0
        first, h.first = h.first, False
        if h.failed != was:
            log.info("cluster %s: endpoint %s is %s (health check)", self.cfg.name,
                     _key(*hp), "failing" if h.failed else "healthy again")
            self.checker._changed(self.cfg.name)
        elif first:
            self.checker._changed(self.cfg.name)      # pending -> decided (maybe still failed)
        if first:
            self._check_first_round()

    def _interval_ms(self, h: _Host, traffic: bool) -> int:
        hc = self.hc
        if not traffic:
            base = hc.no_traffic_interval_ms
        elif h.failed and hc.unhealthy_interval_ms is not None:
            base = hc.unhealthy_interval_ms
        else:
            base = hc.interval_ms
        return base + self._jitter_ms(base)

    def _jitter_ms(self, base: int) -> int:
        # as Envoy's intervalWithJitter: up to pct of the interval, then up to interval_jitter
        extra = 0
        pct_mod = self.hc.interval_jitter_pct * base // 100
        if pct_mod > 0:
            extra += random.randrange(pct_mod)
        if self.hc.interval_jitter_ms > 0:
            extra += random.randrange(self.hc.interval_jitter_ms)
        return extra

    async def _wait_next(self, h: _Host) -> None:
        traffic = self.checker.has_traffic(self.cfg.name)
        deadline = h.last_check + self._interval_ms(h, traffic) / 1000.0
        while True:
            left = deadline - self.loop.time()
            if left <= 0:
                return
            if traffic:
                await asyncio.sleep(left)
                return
            await asyncio.sleep(min(left, TRAFFIC_POLL_S))
            if self.checker.has_traffic(self.cfg.name):
                traffic = True
                deadline = min(deadline, h.last_check + self._interval_ms(h, True) / 1000.0)

    # -- probes ----------------------------------------------------------------------

    async def _probe(self, hp: tuple[str, int]) -> str:
        writer = None
        try:
            async with asyncio.timeout(self.hc.timeout_ms / 1000.0):
                reader, writer = await asyncio.open_connection(hp[0], hp[1])
                if self.hc.type == "http":
                    return await self._http(reader, writer)
                if self.hc.type == "bolt":
                    return await self._bolt(reader, writer)
                return await self._tcp(reader, writer)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            return NETWORK_FAILURE
        finally:
            if writer is not None:
                writer.close()

    async def _http(self, reader, writer) -> str:
        hc = self.hc
        host = hc.host or self.cfg.name
        writer.write((f"GET {hc.path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: Envoy/HC\r\n"
                      f"connection: close\r\n\r\n").encode("latin-1"))
        await writer.drain()
        line = await reader.readuntil(b"\n")
        if len(line) > MAX_STATUS_LINE_BYTES:
            return NETWORK_FAILURE
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            return NETWORK_FAILURE              # not HTTP/1: a protocol error, as Envoy's
        status = int(parts[1])
        if any(lo <= status < hi for lo, hi in hc.expected_statuses):
            return OK
        return ACTIVE_FAILURE

    async def _tcp(self, reader, writer) -> str:
        hc = self.hc
        if hc.send_hex:
            writer.write(bytes.fromhex(hc.send_hex))
            await writer.drain()
        if not hc.receive_hex:
            return OK
        want = [bytes.fromhex(x) for x in hc.receive_hex]
        got = b""
        while True:
            data = await reader.read(65536)
            if not data:
                return NETWORK_FAILURE          # closed before the reply matched
            got += data
            if _matches(got, want):
                return OK


    async def _bolt(self, reader, writer) -> str:
        """A Bolt heartbeat (v1, cmdcode 0); healthy when the heartbeat ack with its id and
        status SUCCESS comes back (as MOSN's Bolt health check)."""
        from fastmesh._core import bolt
        self._bolt_id = (getattr(self, "_bolt_id", 0) + 1) & 0xFFFFFFFF or 1
        writer.write(bolt.encode_heartbeat(bolt.PROTO_V1, self._bolt_id))
        await writer.drain()
        got = b""
        frame = None
        while frame is None:
            data = await reader.read(65536)
            if not data:
                return NETWORK_FAILURE
            got += data
            try:
                frame = bolt.parse_frame(got, MAX_BOLT_REPLY_BYTES)   # None: more needed
            except ValueError:
                return NETWORK_FAILURE          # not Bolt: a protocol error
        if (frame["type"] == bolt.TYPE_RESPONSE and frame["cmdcode"] == bolt.CMD_HEARTBEAT
                and frame["request_id"] == self._bolt_id
                and frame["status"] == bolt.STATUS_SUCCESS):
            return OK
        return ACTIVE_FAILURE


def _matches(buf: bytes, segments: list) -> bool:
    """Every segment found in buf, in order (Envoy's TcpHealthCheckMatcher)."""
    start = 0
    for seg in segments:
        i = buf.find(seg, start)
        if i < 0:
            return False
        start = i + len(seg)
    return True


class HealthChecker:
    """The proxy's prober: follows the config (``sync``), keeps the verdicts, tells the
    supervisor when they change (``on_change(names)``: the clusters whose verdicts moved)."""

    def __init__(self, loop, on_change: Callable[[list], None],
                 traffic: Callable[[str], bool]):
        self.loop = loop
        self.on_change = on_change
        self.traffic = traffic
        self.probers: dict[str, ClusterProber] = {}
        self.stats_by_cluster: dict[str, dict] = {}
        self.version = 0                        # +1 whenever a verdict or target set moves
        self._seen_traffic: set = set()         # clusters that ever carried traffic
        self._pending: set = set()
        self._flush_scheduled = False
        self.stopped = False

    # -- config ------------------------------------------------------------------------

    def sync(self, cfg: model.Config) -> None:
        """Follow a config: probers for new clusters (or changed settings) start, those of
        removed clusters (or removed health checks) stop; endpoint changes update targets."""
        if self.stopped:
            return
        for name in list(self.probers):
            c = cfg.clusters.get(name)
            if c is None or c.health_check is None:
                self.probers.pop(name).stop()
                self.stats_by_cluster.pop(name, None)
                self._changed(name)
        for name, c in cfg.clusters.items():
            if c.health_check is None:
                continue
            p = self.probers.get(name)
            if p is not None and p.hc == c.health_check and \
                    p.cfg.dns_refresh_ms == c.dns_refresh_ms:
                if p.cfg.endpoints != c.endpoints:
                    p.update_endpoints(c)
                else:
                    p.cfg = c
                continue
            previous = None
            if p is not None:
                previous = {hp: h.failed for hp, h in p.hosts.items() if not h.first}
                p.stop()
            p = ClusterProber(self, c, previous)
            self.probers[name] = p
            self.counters(name)
            p.start()

    def preview(self, cfg: model.Config) -> dict:
        """The verdicts the workers should start a new config with: the current ones, and
        new literal addresses failed (pending their first check)."""
        out = {}
        for name, c in cfg.clusters.items():
            if c.health_check is None:
                continue
            p = self.probers.get(name)
            current = p.verdicts() if p is not None else {}
            resolved = p.resolver.resolved if p is not None else {}
            m = {}
            for a in c.endpoints:
                if _is_ip(a.host):
                    k = str(a)
                    m[k] = current.get(k, True)
                    continue
                # a name: the addresses it resolved to (new names: none yet)
                for host, port in resolved.get((a.host, a.port), ()):
                    k = _key(host, port)
                    m[k] = current.get(k, True)
            out[name] = m
        return out

    async def first_round(self, timeout_s: Optional[float] = None) -> None:
        """Wait until every endpoint has its first result (bounded: by default the largest
        initial_jitter + timeout, and a second for name lookups)."""
        if not self.probers:
            return
        if timeout_s is None:
            timeout_s = max((p.hc.initial_jitter_ms + p.hc.timeout_ms) / 1000.0
                            for p in self.probers.values()) + 1.0
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*[p.first_round.wait() for p in self.probers.values()])
        except asyncio.TimeoutError:
            log.warning("health checks: the first round did not complete in %.1f s; endpoints "
                        "without a result stay failed until their first success", timeout_s)

    def stop(self) -> None:
        self.stopped = True
        for p in self.probers.values():
            p.stop()
        self.probers.clear()

    # -- verdicts ------------------------------------------------------------------------

    def verdicts(self) -> dict:
        """cluster name -> {"host:port": failed} for every cluster under check."""
        return {name: p.verdicts() for name, p in self.probers.items()}

    def _changed(self, name: str) -> None:
        self.version += 1
        self._pending.add(name)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        names, self._pending = sorted(self._pending), set()
        if names and not self.stopped:
            self.on_change(names)

    # -- traffic and counters ------------------------------------------------------------

    def has_traffic(self, name: str) -> bool:
        if name in self._seen_traffic:
            return True
        try:
            seen = self.traffic(name)
        except Exception:
            log.exception("health checks: cannot read cluster %s's traffic", name)
            seen = False
        if seen:
            self._seen_traffic.add(name)
        return seen

    def counters(self, name: str) -> dict:
        st = self.stats_by_cluster.get(name)
        if st is None:
            st = self.stats_by_cluster[name] = dict.fromkeys(COUNTERS, 0)
        return st

    def stats(self) -> dict:
        """cluster name -> its health check counters and the healthy gauge."""
        out = {}
        for name, p in self.probers.items():
            out[name] = dict(self.counters(name), health_check_healthy=p.healthy())
        return out

