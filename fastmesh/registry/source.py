"""The service registry as a config source, in the supervisor (control world).

A cluster with ``discovery.zookeeper`` subscribes to the providers of its service: the
children of ``<root>/<interface>/providers`` are watched (one watch per path, shared by the
clusters of every version under it), filtered per cluster (fastmesh.registry.urls), and each
change reaches the workers through ``Supervisor.apply_endpoints``: endpoints only, so pools to
providers that stay are kept and calls in flight to a removed one finish.

The registry going away changes nothing (the last list stands); on reconnect the watches are
read again and what changed meanwhile is applied. A hot restart hands the lists to the new
generation (``handover()``), which serves them until its own session has read them again.

A Bolt listener with ``publish.zookeeper`` gets one ephemeral provider node per service,
pointing at the listener, kept present while the generation serves and deleted on drain.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from fastmesh.ratelog import RateLimitedLog
from fastmesh.registry import urls

log = logging.getLogger("fastmesh.registry")
rlog = RateLimitedLog(log)

APPLY_RETRY_S = 1.0
EMPTY_HOLD_S = 1.0


@dataclasses.dataclass
class _Sub:
    """One cluster's subscription."""
    cluster: str
    discovery: object                    # model.ZookeeperDiscovery
    spec: urls.ServiceSpec
    watch_key: str
    selection: urls.Selection | None = None
    updates: int = 0                     # endpoint sets applied
    errors: int = 0
    updated_at: float | None = None
    warm_timer: object = None
    hold_timer: object = None            # an empty list waits (EMPTY_HOLD_S) before applying


def _watch_key(z) -> str:
    interface = z.service.partition(":")[0]
    return f"{z.servers}|{urls.providers_path(z.root, interface)}"


class RegistrySource:
    def __init__(self, supervisor, inherited: dict | None = None):
        self.sup = supervisor
        self.loop = supervisor.loop
        self.clients: dict = {}          # (servers, session_timeout_ms) -> ZkClient
        self.watches: dict = {}          # watch key -> ChildrenWatch
        self.children: dict = dict(inherited or {})   # watch key -> last children read
        self.subs: dict = {}             # cluster name -> _Sub
        self.pubs: dict = {}             # (listener, service) -> (Publication, url, client key)
        self.errors = 0
        self._first: dict = {}           # watch key -> asyncio.Event (first read done)
        self._pending: set = set()
        self._apply_task: asyncio.Task | None = None
        self._retry = None
        self.stopped = False

    # ------------------------------------------------------------------ subscriptions

    @staticmethod
    def wanted(cfg) -> dict:
        return {n: c.discovery.zookeeper for n, c in cfg.clusters.items()
                if c.discovery is not None}

    async def prepare(self, cfg) -> None:
        """Subscribe as cfg says; wait (each up to its initial_fetch_timeout_ms) for the
        first list of every new watch."""
        fresh = self.sync(cfg)
        waits = []
        for key, timeout_ms in fresh.items():
            ev = self._first.get(key)
            if ev is not None and not ev.is_set() and timeout_ms > 0:
                waits.append(asyncio.wait_for(ev.wait(), timeout_ms / 1000.0))
        if waits:
            t0 = time.monotonic()
            res = await asyncio.gather(*waits, return_exceptions=True)
            late = sum(isinstance(r, asyncio.TimeoutError) for r in res)
            if late:
                log.warning("registry: %d provider list(s) not read within the initial fetch "
                            "timeout; serving %s until they are", late,
                            "the lists inherited" if self.children else "no providers")
            else:
                log.info("registry: first provider lists read in %.0f ms",
                         (time.monotonic() - t0) * 1000)

    def sync(self, cfg) -> dict:
        """Subscriptions follow cfg; returns the watch keys started now (-> fetch timeout)."""
        want = self.wanted(cfg)
        for name in list(self.subs):
            if name not in want or want[name] != self.subs[name].discovery:
                self._drop_sub(name)
        fresh: dict = {}
        for name, z in want.items():
            if name in self.subs:
                continue
            spec = urls.ServiceSpec.parse(z.service, z.group, z.protocol)
            key = _watch_key(z)
            self.subs[name] = _Sub(name, z, spec, key)
            if key not in self.watches:
                self._start_watch(key, z)
                fresh[key] = max(fresh.get(key, 0), z.initial_fetch_timeout_ms)
            if key in self.children:
                self._select(self.subs[name])
        for key in [k for k in self.watches if not any(s.watch_key == k
                                                       for s in self.subs.values())]:
            self.watches.pop(key).stop()
            self._first.pop(key, None)
        self._close_unused_clients()
        return fresh

    def _client(self, servers: str, session_timeout_ms: int):
        from fastmesh.registry.zk import ZkClient
        ck = (servers, session_timeout_ms)
        c = self.clients.get(ck)
        if c is None:
            c = self.clients[ck] = ZkClient(self.loop, servers, session_timeout_ms, self._error)
            c.start()
        return c

    def _close_unused_clients(self) -> None:
        used = {w.client for w in self.watches.values()} | {p[0].client
                                                          for p in self.pubs.values()}
        for ck, c in list(self.clients.items()):
            if c not in used:
                del self.clients[ck]
                self.loop.create_task(c.close())

    def _start_watch(self, key: str, z) -> None:
        from fastmesh.registry.zk import ChildrenWatch
        path = key.split("|", 1)[1]
        self._first[key] = asyncio.Event()
        w = ChildrenWatch(self._client(z.servers, z.session_timeout_ms), path,
                          lambda children, key=key: self._on_children(key, children))
        self.watches[key] = w
        w.start()

    def _drop_sub(self, name: str) -> None:
        sub = self.subs.pop(name)
        for t in (sub.warm_timer, sub.hold_timer):
            if t is not None:
                t.cancel()
        self._pending.discard(name)

    def _error(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        for sub in self.subs.values():
            if what.endswith(sub.watch_key.split("|", 1)[1]):
                sub.errors += 1
        rlog.warning(("registry", what), "registry: %s failed: %s", what,
                     type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}")

    def _on_children(self, key: str, children: list) -> None:
        if self.stopped:
            return
        self.children[key] = children
        ev = self._first.get(key)
        if ev is not None:
            ev.set()
        for sub in self.subs.values():
            if sub.watch_key == key:
                self._select(sub)

    def _select(self, sub: _Sub) -> None:
        sel = urls.select(self.children.get(sub.watch_key, ()), sub.spec)
        sub.selection = sel
        if sub.warm_timer is not None:
            sub.warm_timer.cancel()
            sub.warm_timer = None
        if sel.next_change_ms is not None:      # a warm-up ends: its weight changes then
            delay_s = max(0.0, sel.next_change_ms / 1000.0 - time.time()) + 0.01
            sub.warm_timer = self.loop.call_later(delay_s, self._select, sub)
        current = self.sup.cfg.clusters.get(sub.cluster) if self.sup.started else None
        if not sel.providers and current is not None and current.endpoints:
            # every provider gone at once: a sofa-rpc-node provider deletes and re-creates
            # its node each time its ZooKeeper client reconnects (after a ZooKeeper restart
            # they all do); the last ones are kept EMPTY_HOLD_S in case they come back
            if sub.hold_timer is None:
                def release():
                    sub.hold_timer = None
                    self._pending.add(sub.cluster)
                    self._kick()
                sub.hold_timer = self.loop.call_later(EMPTY_HOLD_S, release)
            return
        if sub.hold_timer is not None:
            sub.hold_timer.cancel()
            sub.hold_timer = None
        self._pending.add(sub.cluster)
        self._kick()

    # ------------------------------------------------------------------ applying

    def fill(self, cfg):
        """cfg with every subscribed cluster's endpoints as the registry has them now."""
        models = {}
        for name, c in cfg.clusters.items():
            sub = self.subs.get(name)
            if c.discovery is None or sub is None or sub.selection is None \
                    or sub.discovery != c.discovery.zookeeper:
                continue
            m = self._with_selection(c, sub.selection)
            if m != c:
                models[name] = m
        if not models:
            return cfg
        return dataclasses.replace(cfg, clusters=dict(cfg.clusters, **models))

    @staticmethod
    def _with_selection(c, sel: urls.Selection):
        from fastmesh.config import model
        eps = tuple(model.parse_address(p.address) for p in sel.providers)
        weights = tuple(sel.weights)
        if all(w == weights[0] for w in weights) or c.lb_policy == "maglev":
            weights = ()                      # equal weights, or a policy without them
        return dataclasses.replace(c, endpoints=eps, weights=weights)

    def _kick(self) -> None:
        if self._apply_task is None or self._apply_task.done():
            self._apply_task = self.loop.create_task(self._apply_pending())

    async def _apply_pending(self) -> None:
        while self._pending and not self.stopped:
            if not self.sup.started:
                await asyncio.sleep(0.05)       # the first config is filled at start
                continue
            names, self._pending = self._pending, set()
            applied: dict = {}

            def make(cfg):
                # under the supervisor's apply lock: against the config current now
                for name in names:
                    sub = self.subs.get(name)
                    c = cfg.clusters.get(name)
                    if sub is None or c is None or c.discovery is None \
                            or sub.selection is None or c.discovery.zookeeper != sub.discovery:
                        continue
                    m = self._with_selection(c, sub.selection)
                    if (m.endpoints, m.weights) != (c.endpoints, c.weights):
                        applied[name] = m
                if not applied:
                    return None
                updates = {n: ({"endpoints": [str(a) for a in m.endpoints],
                                "weights": list(m.weights)} if m.weights
                               else [str(a) for a in m.endpoints])
                           for n, m in applied.items()}
                return dataclasses.replace(cfg, clusters=dict(cfg.clusters, **applied)), updates
            self.sup.change_source = "registry"         # the dashboard's timeline says so
            try:
                ok, errors = await self.sup.apply_endpoints_from(make)
            except Exception as exc:            # a worker link broke mid-way
                ok, errors = False, [str(exc)]
            finally:
                self.sup.change_source = None
            models = applied
            if not models:
                continue
            if ok:
                now = time.time()
                for n, m in models.items():
                    sub = self.subs.get(n)
                    if sub is not None:
                        sub.updates += 1
                        sub.updated_at = now
                    log.info("registry: cluster %s now has %d provider(s): %s", n,
                             len(m.endpoints), ", ".join(str(a) for a in m.endpoints[:10]))
            else:
                self.errors += 1
                rlog.warning(("registry", "apply"), "registry: endpoint update of %s not "
                             "applied (%s); trying again", ", ".join(sorted(models)),
                             "; ".join(errors))
                self._pending |= set(models)
                await asyncio.sleep(APPLY_RETRY_S)

    # ------------------------------------------------------------------ publishing

    def publish(self, cfg, bound: dict) -> None:
        """Publications follow cfg's listeners; bound: listener name -> (host, port) bound."""
        from fastmesh.registry.zk import Publication
        want = {}
        for lc in cfg.listeners:
            if lc.publish is None or lc.name not in bound:
                continue
            z = lc.publish.zookeeper
            host = z.advertise_host or bound[lc.name][0]
            port = z.advertise_port or bound[lc.name][1]
            for service in z.services:
                spec = urls.ServiceSpec.parse(service, z.group)
                want[(lc.name, service)] = (z, spec, host, port)
        for k in list(self.pubs):
            pub, url, z_old = self.pubs[k]
            if k not in want or want[k][0] != z_old:
                self.pubs.pop(k)
                self.loop.create_task(pub.withdraw())
        for k, (z, spec, host, port) in want.items():
            if k in self.pubs:
                continue
            url = urls.provider_url(host, port, spec.interface, spec.version, z.group,
                                    weight=z.weight, app_name=z.app_name,
                                    unique_id=spec.unique_id)
            path = urls.providers_path(z.root, spec.interface) + "/" + urls.encode_child(url)
            pub = Publication(self._client(z.servers, z.session_timeout_ms), path)
            self.pubs[k] = (pub, url, z)
            pub.start()
        self._close_unused_clients()

    async def wait_published(self, timeout_s: float = 2.0) -> bool:
        """Until every publication's node exists (a hot restart publishes the new
        generation before the old one withdraws), bounded; False at the timeout."""
        deadline = time.monotonic() + timeout_s
        while any(p[0].created == 0 for p in self.pubs.values()):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def unpublish(self, timeout_s: float = 2.0) -> None:
        """Withdraw every publication (drain, hand-over): callers stop picking this proxy."""
        pubs = [p[0] for p in self.pubs.values()]
        self.pubs = {}
        if pubs:
            await asyncio.gather(*[p.withdraw(timeout_s) for p in pubs],
                                 return_exceptions=True)

    # ------------------------------------------------------------------ life

    def handover(self) -> dict:
        """For the next generation: the children last read, per watch."""
        return {k: list(v) for k, v in self.children.items() if k in self.watches}

    async def stop(self) -> None:
        self.stopped = True
        for w in self.watches.values():
            w.stop()
        for p in self.pubs.values():
            p[0].stop()
        for sub in self.subs.values():
            for t in (sub.warm_timer, sub.hold_timer):
                if t is not None:
                    t.cancel()
        if self._apply_task is not None:
            self._apply_task.cancel()
        clients, self.clients = list(self.clients.values()), {}
        await asyncio.gather(*[c.close() for c in clients], return_exceptions=True)

    # ------------------------------------------------------------------ reports

    def cluster_endpoints(self, name: str) -> dict:
        """address -> {"weight", "url", "attributes"} of a subscribed cluster's providers."""
        sub = self.subs.get(name)
        if sub is None or sub.selection is None:
            return {}
        return {p.address: {"weight": w, "url": p.url, "attributes": p.attributes(),
                            "protocol": p.params.get("protocol") or p.scheme,
                            "serialization": p.params.get("serialization")}
                for p, w in zip(sub.selection.providers, sub.selection.weights)}

    def stats(self) -> dict:
        """Per subscribed cluster: counters for /stats."""
        out = {}
        for name, sub in self.subs.items():
            sel = sub.selection
            out[name] = {"registry_providers": len(sel.providers) if sel else 0,
                         "registry_skipped": sel.skipped if sel else 0,
                         "registry_updates": sub.updates,
                         "registry_errors": sub.errors}
        return out

    def status(self) -> dict:
        return {
            "errors": self.errors,
            "sessions": [{"servers": c.servers, "session_timeout_ms": ck[1], "state": c.state,
                          "connects": c.connects, "sessions_lost": c.sessions_lost}
                         for ck, c in self.clients.items()],
            "subscriptions": {
                n: {"service": s.discovery.service, "group": s.discovery.group,
                    "path": s.watch_key.split("|", 1)[1], "servers": s.discovery.servers,
                    "providers": [p.address for p in s.selection.providers]
                    if s.selection else None,
                    "skipped": s.selection.skipped if s.selection else 0,
                    "updates": s.updates, "errors": s.errors, "updated_at": s.updated_at}
                for n, s in self.subs.items()},
            "published": [{"listener": k[0], "service": k[1], "url": p[1],
                           "path": p[0].path, "created": p[0].created}
                          for k, p in self.pubs.items()],
        }
