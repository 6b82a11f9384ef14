"""The control plane made visible: the admin page `/dashboard` and the JSON behind it.

Control world only. The figures are the workers' counters and latency histograms that the
supervisor collects over its IPC links; rates and percentiles are differences between two
samples (never per-request events). Sampling runs only while someone looks (a page, a
stream, an API call in the last WATCH_TTL_S seconds): every SAMPLE_FAST_S then.

    GET /dashboard       the page (one self-contained HTML file: page.html)
    GET /api/topology    listeners -> route tables -> virtual hosts -> routes -> clusters ->
                         endpoints, with each endpoint's health
    GET /api/rates       per listener, cluster and endpoint: req/s, errors/s, active, p50/p99
    GET /api/events      the change timeline (?since=SEQ: only later events)
    GET /api/stream      Server-Sent Events: `rates` every sample, `topology` when it
                         changes, `event` per timeline entry
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import time

log = logging.getLogger("fastmesh.dashboard")

SAMPLE_FAST_S = 0.25        # sampling period while watched
WATCH_TTL_S = 15.0          # an API call keeps the sampler running this long
RATE_WINDOW_S = 1.0         # rates and percentiles over (about) the last second
KEEP_SAMPLES = 16
MAX_EVENTS = 500
PROBE_EVERY_S = 2.0         # reachability probe of endpoints no health check watches
PROBE_TIMEOUT_S = 1.0

# endpoint health words (the page's data-health attribute)
HEALTHY, HC_FAILED, EJECTED, UNREACHABLE = "healthy", "unhealthy", "ejected", "unreachable"


def percentile_ms(counts: list, bounds_us: tuple, q: float) -> float | None:
    """The q-quantile (0..1) of a histogram's counts, interpolated inside its bucket."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            lo = bounds_us[i - 1] if i > 0 else 0
            hi = bounds_us[i] if i < len(bounds_us) else bounds_us[-1] * 2
            frac = (rank - seen) / c
            return round((lo + (hi - lo) * frac) / 1000.0, 3)
        seen += c
    return round(bounds_us[-1] / 1000.0, 3)


def _route_desc(r) -> dict:
    m = r.match
    if m.path is not None:
        match = f"path {m.path}"
    elif m.prefix is not None:
        match = f"prefix {m.prefix}"
    elif m.regex is not None:
        match = f"regex {m.regex}"
    else:
        match = "any"
    if m.headers:
        match += " " + " ".join(
            f"[{h.name}{'=' + h.exact if h.exact is not None else ''}"
            f"{'^' + h.prefix if h.prefix is not None else ''}"
            f"{'~' + h.regex if h.regex is not None else ''}]" for h in m.headers)
    clusters = []
    if r.cluster:
        clusters.append({"cluster": r.cluster, "weight": None})
    for w in r.weighted_clusters:
        clusters.append({"cluster": w.cluster, "weight": w.weight})
    out = {"match": match, "clusters": clusters,
           "mirrors": [m.cluster for m in r.mirrors],
           "timeout_ms": r.timeout_ms}
    if r.direct_response is not None:
        out["direct_response"] = r.direct_response.status
    return out


def topology_of(cfg) -> dict:
    """The config as a map (without live state)."""
    listeners = []
    for lc in cfg.listeners:
        listeners.append({"name": lc.name, "protocol": lc.protocol, "address": str(lc.address),
                          "route_table": lc.route_table, "cluster": lc.cluster})
    tables = []
    for name, rt in cfg.route_tables.items():
        vhosts = []
        for vh in rt.virtual_hosts:
            vhosts.append({"name": vh.name, "domains": list(vh.domains),
                           "routes": [dict(_route_desc(r), id=f"{name}/{vh.name}/{i}")
                                      for i, r in enumerate(vh.routes)]})
        tables.append({"name": name, "virtual_hosts": vhosts})
    clusters = []
    for name, cl in cfg.clusters.items():
        clusters.append({"name": name, "lb_policy": cl.lb_policy,
                         "health_check": cl.health_check.type if cl.health_check else None,
                         "outlier_detection": cl.outlier_detection is not None,
                         "endpoints": [str(a) for a in cl.endpoints]})
    return {"listeners": listeners, "route_tables": tables, "clusters": clusters}


def diff_configs(old, new) -> list:
    """What changed between two configs: [(kind, action, name, detail)]."""
    out = []

    def by_name(old_map: dict, new_map: dict, kind: str, compare=None):
        for n in sorted(set(old_map) | set(new_map)):
            a, b = old_map.get(n), new_map.get(n)
            if a is None:
                out.append((kind, "added", n, ""))
            elif b is None:
                out.append((kind, "removed", n, ""))
            elif (compare or (lambda x, y: x != y))(a, b):
                out.append((kind, "modified", n, ""))

    by_name({l.name: l for l in old.listeners}, {l.name: l for l in new.listeners}, "listener")
    for n in sorted(set(old.route_tables) | set(new.route_tables)):
        a, b = old.route_tables.get(n), new.route_tables.get(n)
        if a is None or b is None:
            out.append(("route_table", "added" if a is None else "removed", n, ""))
            continue
        if a == b:
            continue
        va = {vh.name: vh for vh in a.virtual_hosts}
        vb = {vh.name: vh for vh in b.virtual_hosts}
        for vn in sorted(set(va) | set(vb)):
            x, y = va.get(vn), vb.get(vn)
            if x is None or y is None:
                out.append(("virtual_host", "added" if x is None else "removed",
                            f"{n}/{vn}", ""))
            elif x != y:
                if x.domains != y.domains:
                    out.append(("virtual_host", "modified", f"{n}/{vn}", "domains"))
                for i in range(max(len(x.routes), len(y.routes))):
                    ra = x.routes[i] if i < len(x.routes) else None
                    rb = y.routes[i] if i < len(y.routes) else None
                    if ra == rb:
                        continue
                    action = "added" if ra is None else "removed" if rb is None else "modified"
                    desc = _route_desc(rb or ra)
                    detail = desc["match"] + " -> " + ", ".join(
                        c["cluster"] for c in desc["clusters"])
                    out.append(("route", action, f"{n}/{vn}/{i}", detail))
        if [v.name for v in a.virtual_hosts] == [v.name for v in b.virtual_hosts] and \
                not any(e[0] in ("virtual_host", "route") and e[2].startswith(n + "/")
                        for e in out):
            out.append(("route_table", "modified", n, ""))

    def cluster_differs(a, b):
        import dataclasses
        return dataclasses.replace(a, endpoints=(), weights=()) != \
            dataclasses.replace(b, endpoints=(), weights=())
    by_name(old.clusters, new.clusters, "cluster", cluster_differs)
    for n in sorted(set(old.clusters) & set(new.clusters)):
        ea = [str(x) for x in old.clusters[n].endpoints]
        eb = [str(x) for x in new.clusters[n].endpoints]
        for e in eb:
            if e not in ea:
                out.append(("endpoint", "added", f"{n}/{e}", ""))
        for e in ea:
            if e not in eb:
                out.append(("endpoint", "removed", f"{n}/{e}", ""))
        if ea == eb and old.clusters[n].weights != new.clusters[n].weights:
            out.append(("endpoint", "modified", n, "weights"))
    for n in sorted(set(new.clusters) - set(old.clusters)):
        for e in new.clusters[n].endpoints:
            out.append(("endpoint", "added", f"{n}/{e}", ""))
    return out


class Observatory:
    """Keeps the change timeline and samples the workers' figures while watched."""

    def __init__(self, sup):
        self.sup = sup
        self.events: collections.deque = collections.deque(maxlen=MAX_EVENTS)
        self.seq = 0
        self.samples: collections.deque = collections.deque(maxlen=KEEP_SAMPLES)
        self.watched_until = 0.0
        self.streams = 0
        self._task: asyncio.Task | None = None
        self._waiters: list = []            # futures woken at each new sample
        self._probe: dict = {}              # "host:port" -> (reachable, checked at)
        self._probe_task: asyncio.Task | None = None
        self._health_seen: dict = {}        # "cluster/host:port" -> health word
        self.rates: dict = {}
        self.endpoint_state: dict = {}      # cluster -> [endpoint dicts]
        self._stopped = False

    # -- registration ---------------------------------------------------------------

    def register(self, admin) -> None:
        admin.register("GET", "/dashboard", self._page)
        admin.register("GET", "/api/topology", self._api_topology)
        admin.register("GET", "/api/rates", self._api_rates)
        admin.register("GET", "/api/events", self._api_events, with_query=True)
        admin.register("GET", "/api/stream", self._api_stream)

    # -- the timeline ---------------------------------------------------------------

    def add_event(self, source: str, kind: str, action: str, name: str, detail: str = "") -> None:
        self.seq += 1
        self.events.append({"seq": self.seq, "id": f"{self._pid()}-{self.seq}",
                            "time": round(time.time(), 3), "source": source,
                            "kind": kind, "action": action, "name": name, "detail": detail,
                            "config_version": self.sup.version})

    def started(self) -> None:
        gen = self.sup.generation
        if gen > 1:
            self.add_event("hot restart", "server", "started", f"generation {gen}",
                           f"pid {self._pid()}")
        else:
            self.add_event("start", "server", "started", "generation 1", f"pid {self._pid()}")
        cfg = self.sup.cfg
        self.add_event("start" if gen == 1 else "hot restart", "config", "loaded",
                       cfg.source or "config",
                       f"{len(cfg.listeners)} listeners, {len(cfg.route_tables)} route tables, "
                       f"{len(cfg.clusters)} clusters")

    @staticmethod
    def _pid() -> int:
        import os
        return os.getpid()

    def config_changed(self, old, new) -> None:
        source = self.sup.change_source or (
            "xds push" if self.sup.xds is not None else "registry")
        try:
            changes = diff_configs(old, new)
        except Exception:                       # a timeline must never break a reload
            log.exception("dashboard: diffing the configs failed")
            changes = []
        if not changes:
            self.add_event(source, "config", "applied", f"version {self.sup.version}",
                           "no change")
        for kind, action, name, detail in changes:
            self.add_event(source, kind, action, name, detail)
        self._notify()

    # -- sampling -------------------------------------------------------------------

    def watch(self) -> None:
        self.watched_until = time.monotonic() + WATCH_TTL_S
        if (self._task is None or self._task.done()) and not self._stopped:
            self._task = asyncio.get_running_loop().create_task(self._sample_forever())
        if (self._probe_task is None or self._probe_task.done()) and not self._stopped:
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_forever())

    def stop(self) -> None:
        self._stopped = True
        for t in (self._task, self._probe_task):
            if t is not None:
                t.cancel()
        self._notify()

    def _watched(self) -> bool:
        return self.streams > 0 or time.monotonic() < self.watched_until

    async def _sample_forever(self) -> None:
        try:
            while self._watched() and not self._stopped:
                try:
                    await self.sample()
                except Exception:
                    log.exception("dashboard: sampling failed")
                await asyncio.sleep(SAMPLE_FAST_S)
        except asyncio.CancelledError:
            pass

    async def sample(self) -> None:
        sup = self.sup
        stats = await sup.stats()
        replies = await asyncio.gather(*[h.chan.request({"t": "clusters", "figures": True},
                                                        timeout_s=5)
                                         for h in sup._handles() if h.ready],
                                       return_exceptions=True)
        per_worker = [r[0].get("clusters") or {} for r in replies
                      if not isinstance(r, BaseException) and r[0].get("ok")]
        now = time.monotonic()
        endpoints: dict = {}            # cluster -> host:port -> summed figures
        for wc in per_worker:
            for cname, eps in wc.items():
                acc = endpoints.setdefault(cname, {})
                for e in eps:
                    d = acc.setdefault(e["address"], {
                        "origin": e.get("origin"), "active_requests": 0, "rq_total": 0,
                        "rq_error": 0, "cx_connect_fail": 0, "connect_failing": False,
                        "ejected": False, "health_check_failed": False})
                    for k in ("active_requests", "rq_total", "rq_error", "cx_connect_fail"):
                        d[k] += e.get(k, 0)
                    for k in ("connect_failing", "ejected", "health_check_failed"):
                        d[k] = d[k] or bool(e.get(k))
                    lat = e.get("latency")
                    if lat:                     # bucket counts + [sum]: added up by worker
                        have = d.get("latency")
                        d["latency"] = list(lat) if have is None else \
                            [a + b for a, b in zip(have, lat)]
        self.samples.append({"t": now, "stats": stats, "endpoints": endpoints})
        self.rates = self._compute_rates()
        self._note_health_changes()
        self._notify()

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    def _base_sample(self):
        """The sample about RATE_WINDOW_S before the latest."""
        latest = self.samples[-1]
        base = None
        for s in self.samples:
            if latest["t"] - s["t"] >= RATE_WINDOW_S * 0.9:
                base = s
        if base is None and len(self.samples) > 1:
            base = self.samples[0]
        return latest, base

    def _compute_rates(self) -> dict:
        from fastmesh._core.stats import LAT_BOUNDS_US
        latest, base = self._base_sample()
        dt = (latest["t"] - base["t"]) if base is not None else 0.0
        st, bst = latest["stats"], (base["stats"] if base else {})
        hist = st.get("latency_histograms") or {}
        bhist = bst.get("latency_histograms") or {}

        def delta(now: dict, before: dict, key: str) -> float:
            d = (now or {}).get(key, 0) - (before or {}).get(key, 0)
            return max(d, 0)

        def per_s(n: float) -> float:
            return round(n / dt, 2) if dt > 0 else 0.0

        def from_counts(counts, before) -> dict:
            # percentiles of what was recorded over the window (bucket count deltas)
            if before is not None and base is not None and len(before) == len(counts):
                d = [max(a - b, 0) for a, b in zip(counts, before)]
            elif base is None:
                d = [0] * len(counts)
            else:
                d = counts
            return {"p50_ms": percentile_ms(d, LAT_BOUNDS_US, 0.5),
                    "p99_ms": percentile_ms(d, LAT_BOUNDS_US, 0.99)}

        def lat(kind: str, name: str) -> dict:
            h = (hist.get(kind) or {}).get(name)
            if h is None:
                return {"p50_ms": None, "p99_ms": None}
            hb = (bhist.get(kind) or {}).get(name)
            return dict(from_counts(h["counts"], hb["counts"] if hb is not None else None),
                        latency_count=h["count"])

        def endpoint_lat(e: dict, b: dict | None) -> dict:
            counts = (e.get("latency") or [])[:-1]          # (the last slot is the sum)
            if not counts:
                return {"p50_ms": None, "p99_ms": None}
            before = (b.get("latency") or [])[:-1] if b else None
            return from_counts(counts, before or None)

        out = {"time": round(time.time(), 3), "window_s": round(dt, 3),
               "config_version": self.sup.version, "generation": self.sup.generation,
               "listeners": {}, "clusters": {}, "endpoints": {}}
        for name, c in (st.get("listeners") or {}).items():
            b = (bst.get("listeners") or {}).get(name) if base else None
            errors = (delta(c, b, "downstream_rsp_5xx") if b is not None else 0)
            out["listeners"][name] = dict(
                rq_per_s=per_s(delta(c, b, "downstream_rq_total")) if b is not None else 0.0,
                errors_per_s=per_s(errors),
                cx_per_s=per_s(delta(c, b, "downstream_cx_total")) if b is not None else 0.0,
                connections=c.get("downstream_cx_active", 0),
                active_requests=c.get("downstream_rq_active", 0),
                requests_total=c.get("downstream_rq_total", 0), **lat("listeners", name))
        for name, c in (st.get("clusters") or {}).items():
            b = (bst.get("clusters") or {}).get(name) if base else None
            errors = sum(delta(c, b, k) for k in (
                "upstream_rsp_5xx", "bolt_status_other", "upstream_cx_connect_fail",
                "upstream_rq_timeout")) if b is not None else 0
            out["clusters"][name] = dict(
                rq_per_s=per_s(delta(c, b, "upstream_rq_total")) if b is not None else 0.0,
                errors_per_s=per_s(errors), active_requests=c.get("upstream_rq_active", 0),
                connections=c.get("upstream_cx_active", 0),
                upstream_rq_total=c.get("upstream_rq_total", 0), **lat("clusters", name))
        beps = base["endpoints"] if base else {}
        for cname, eps in latest["endpoints"].items():
            row = out["endpoints"].setdefault(cname, {})
            for addr, e in eps.items():
                b = (beps.get(cname) or {}).get(addr)
                errs = (delta(e, b, "rq_error") + delta(e, b, "cx_connect_fail")) \
                    if b is not None else 0
                row[addr] = {"rq_per_s": per_s(delta(e, b, "rq_total")) if b else 0.0,
                             "errors_per_s": per_s(errs),
                             "active_requests": e["active_requests"],
                             "rq_total": e["rq_total"], "cx_connect_fail": e["cx_connect_fail"],
                             "health": self._health_word(cname, addr, e),
                             **endpoint_lat(e, b)}
        return out

    def _health_word(self, cluster: str, addr: str, e: dict | None) -> str:
        verdicts = self.sup.health.verdicts().get(cluster)
        if verdicts is not None and verdicts.get(addr):
            return HC_FAILED
        if e is not None and e.get("health_check_failed"):
            return HC_FAILED
        if e is not None and e.get("ejected"):
            return EJECTED
        if e is not None and e.get("connect_failing"):
            return UNREACHABLE
        probed = self._probe.get(addr)
        if verdicts is None and probed is not None and not probed[0]:
            return UNREACHABLE
        return HEALTHY

    def _note_health_changes(self) -> None:
        for cname, eps in (self.rates.get("endpoints") or {}).items():
            for addr, e in eps.items():
                key = f"{cname}/{addr}"
                was = self._health_seen.get(key)
                self._health_seen[key] = e["health"]
                if was is not None and was != e["health"]:
                    source = {HC_FAILED: "health check", EJECTED: "outlier detection",
                              UNREACHABLE: "connect failures"}.get(e["health"], "recovery")
                    self.add_event(source, "endpoint", "health", key, f"{was} -> {e['health']}")

    async def _probe_forever(self) -> None:
        """Endpoints without an active health check: a TCP connect now and then, while the
        dashboard is watched, so one that cannot be reached shows before traffic finds it."""
        try:
            while self._watched() and not self._stopped:
                verdicts = self.sup.health.verdicts()
                targets = {str(a) for name, cl in self.sup.cfg.clusters.items()
                           if name not in verdicts for a in cl.endpoints}
                await asyncio.gather(*[self._probe_one(t) for t in sorted(targets)[:256]])
                for gone in set(self._probe) - targets:
                    self._probe.pop(gone, None)
                await asyncio.sleep(PROBE_EVERY_S)
        except asyncio.CancelledError:
            pass

    async def _probe_one(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)),
                                          PROBE_TIMEOUT_S)
            w.close()
            ok = True
        except (OSError, asyncio.TimeoutError, ValueError):
            ok = False
        self._probe[target] = (ok, time.time())

    # -- API answers ----------------------------------------------------------------

    def topology(self) -> dict:
        sup = self.sup
        topo = topology_of(sup.cfg)
        rates = self.rates or {}
        for c in topo["clusters"]:
            live = (rates.get("endpoints") or {}).get(c["name"]) or {}
            latest = self.samples[-1]["endpoints"].get(c["name"], {}) if self.samples else {}
            eps = []
            names = list(c["endpoints"])
            for addr in latest:                 # resolved addresses (DNS names) too
                if addr not in names and latest[addr].get("origin") not in names:
                    names.append(addr)
            for addr in names:
                e = live.get(addr) or {}
                if not e:
                    for a2, e2 in live.items():
                        if latest.get(a2, {}).get("origin") == addr:
                            e = e2
                            break
                eps.append({"address": addr,
                            "health": e.get("health") or self._health_word(
                                c["name"], addr, latest.get(addr))})
            c["endpoints"] = eps
        topo.update(config_version=sup.version, generation=sup.generation,
                    source=sup.cfg.source, last_event=self.seq)
        return topo

    async def _ensure_sample(self) -> None:
        self.watch()
        if not self.samples:
            await self.sample()

    async def _page(self, body: bytes):
        self.watch()
        from importlib import resources        # (only when the page is asked for: it
        #                                           pulls in zipfile & co, ~0.7 MB resident)
        html = resources.files("fastmesh.dashboard").joinpath("page.html").read_bytes()
        return 200, "text/html; charset=utf-8", html

    async def _api_topology(self, body: bytes):
        await self._ensure_sample()
        return _json(self.topology())

    async def _api_rates(self, body: bytes):
        await self._ensure_sample()
        if len(self.samples) < 2:
            await asyncio.sleep(SAMPLE_FAST_S)
            await self.sample()
        return _json(self.rates)

    async def _api_events(self, body: bytes, query: dict):
        self.watch()
        try:
            since = int(query.get("since", "0") or 0)
        except ValueError:
            return 400, "text/plain; charset=utf-8", b"since: an event number\n"
        return _json({"config_version": self.sup.version, "last": self.seq,
                      "events": [e for e in self.events if e["seq"] > since]})

    async def _api_stream(self, body: bytes):
        from fastmesh.admin import Stream
        await self._ensure_sample()

        async def run(write) -> None:
            self.streams += 1
            try:
                if not write(b"retry: 1000\n\n"):
                    return
                sent_seq = 0
                topo_key = None
                while not self._stopped:
                    topo = self.topology()
                    key = json.dumps(topo, sort_keys=True)
                    if key != topo_key:
                        topo_key = key
                        if not write(_sse("topology", topo)):
                            return
                    for e in list(self.events):
                        if e["seq"] > sent_seq:
                            sent_seq = e["seq"]
                            if not write(_sse("event", e)):
                                return
                    if self.rates and not write(_sse("rates", self.rates)):
                        return
                    self.watch()
                    fut = asyncio.get_running_loop().create_future()
                    self._waiters.append(fut)
                    try:
                        await asyncio.wait_for(fut, 2.0)
                    except asyncio.TimeoutError:
                        pass
            finally:
                self.streams -= 1
        return Stream(run)


def _json(obj) -> tuple[int, str, bytes]:
    return 200, "application/json", (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _sse(event: str, obj) -> bytes:
    return f"event: {event}\ndata: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()
