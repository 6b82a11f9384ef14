"""The control plane as a config source: what the ADS stream sends, composed with the
bootstrap file's static resources, translated by the same code as the file, and applied
through the supervisor's one config path (every worker, or nothing).

The supervisor starts it when the bootstrap has ``dynamic_resources`` with ``ads_config``;
until the first responses arrive the static resources serve alone (the initial fetch never
blocks serving).
"""
from __future__ import annotations

import dataclasses
import logging
import time

from fastmesh.config.load import ConfigError
from fastmesh.xds import resources as R

log = logging.getLogger("fastmesh.xds")


class XdsSource:
    def __init__(self, supervisor, xds_cfg, translate, inherited: dict | None = None):
        """xds_cfg: model.Xds; translate(document, source) -> model.Config or ConfigError;
        inherited: what a previous generation held (``handover()``), already serving."""
        self.sup = supervisor
        self.cfg = xds_cfg
        self.static = xds_cfg.document          # the bootstrap as read from the file
        self.translate = translate
        self.state = R.State(dict(inherited["resources"])) if inherited else R.State()
        self.versions = dict(inherited.get("versions") or {}) if inherited else {}
        self.client = None
        self._last = None                       # the last full composition applied
        self.events: list = []                  # (wall time, what) of applied updates

    def handover(self) -> dict:
        """For the next generation: the resources accepted, and their versions."""
        versions = ({t: s.version for t, s in self.client.types.items()}
                    if self.client is not None else self.versions)
        return {"resources": self.state.resources, "versions": versions}

    def start(self) -> None:
        from fastmesh.xds.ads import AdsClient
        self.client = AdsClient(target=self.cfg.server, node=self.cfg.node, apply=self.apply,
                                loop=self.sup.loop, retry_base_s=self.cfg.retry_base_ms / 1000,
                                retry_max_s=self.cfg.retry_max_ms / 1000,
                                lds=self.cfg.lds, cds=self.cfg.cds)
        log.info("xds: ADS to %s (cluster %s) as node %r", self.cfg.server, self.cfg.cluster,
                 self.cfg.node.get("id", ""))
        for t, v in self.versions.items():     # asked for again with what is served
            if t in self.client.types:
                self.client.types[t].version = v
        self.client.want(self.initial_wanted(), send=False)
        self.client.start()

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()
            self.client = None

    async def apply(self, items: list) -> list:
        """[(type, resources)], one per response -> [(errors (empty: applied), the RDS/EDS
        names wanted)] in the same order. Several responses are applied as one configuration
        when they all apply; else one by one, so each is ACKed or NACKed on its own merits."""
        if len(items) > 1:
            candidate = self.state
            for t, update in items:
                candidate = candidate.with_update(t, update)
            errors, wanted = await self._apply_state(
                candidate, "xds " + " + ".join(R.KINDS[t][0] for t, _ in items))
            if not errors:
                return [([], wanted)] * len(items)
        return [await self._apply_one(t, update) for t, update in items]

    async def _apply_one(self, type_url: str, update: dict) -> tuple[list, dict]:
        candidate = self.state.with_update(type_url, update)
        if type_url == R.ENDPOINT and self._last is not None:
            return await self._apply_endpoints(candidate)
        errors, wanted = await self._apply_state(candidate, f"xds {R.KINDS[type_url][0]}")
        return errors, wanted

    async def _apply_endpoints(self, candidate: R.State) -> tuple[list, dict]:
        """EDS: only the clusters whose load assignment changed are translated, and the
        workers get their new endpoint sets alone (pools to endpoints that stay are kept;
        listeners and route tables are not touched)."""
        from fastmesh.config.envoy import translate_cluster_cached
        from fastmesh.config.envoy._common import EnvoyChecker
        old, new = self.state.resources[R.ENDPOINT], candidate.resources[R.ENDPOINT]
        changed = {n for n in set(old) | set(new) if old.get(n) is not new.get(n)}
        models, errors = {}, []
        for eds in sorted(changed):
            for raw in self._last.eds_users.get(eds, ()):
                c = EnvoyChecker()
                # remembered (view and translation) for the next full pass to reuse
                model, _ = translate_cluster_cached(c, R.eds_view(raw, new), "cluster", {})
                if c.errors:
                    errors += [f"cluster load assignment {eds!r}: "
                               f"{e[len('cluster.'):] if e.startswith('cluster.') else e}"
                               for e in c.errors]
                elif model is not None:
                    models[model.name] = model
        if errors:
            return errors, {}
        cfg = self.sup.cfg
        models = {n: m for n, m in models.items() if n in cfg.clusters}
        if models:
            cfg = dataclasses.replace(cfg, clusters=dict(cfg.clusters, **models))
            ok, errors = await self.sup.apply_endpoints(cfg, {
                n: ({"endpoints": [str(a) for a in m.endpoints], "weights": list(m.weights)}
                    if m.weights else [str(a) for a in m.endpoints])
                for n, m in models.items()})
            if not ok:
                return errors, {}
        self.state = candidate
        self.events.append((time.time(), "xds cluster load assignment"))
        del self.events[:-100]
        return [], self._last.wanted

    async def reload_static(self, file_cfg) -> tuple[bool, list]:
        """The file was reloaded: its new static resources with the dynamic ones kept."""
        if file_cfg.xds is None:
            return False, ["dynamic_resources: cannot be removed by a reload (hot-restart "
                           "instead)"]
        old = self.static
        self.static = file_cfg.xds.document
        errors, wanted = await self._apply_state(self.state, "file reload")
        if errors:
            self.static = old
        elif self.client is not None:
            self.client.want(wanted)
        return not errors, errors

    def initial_wanted(self) -> dict:
        """What the static resources already ask for over the stream (RDS, EDS)."""
        return R.compose(self.static, self.state).wanted

    async def _apply_state(self, state: R.State, why: str) -> tuple[list, dict]:
        comp = R.compose(self.static, state)
        try:
            cfg = self.translate(comp.document, self.sup.cfg.source)
        except ConfigError as exc:
            return [R.name_origin(e, comp.origins) for e in exc.errors], {}
        ok, errors = await self.sup.apply_config(cfg)
        if not ok:
            return errors, {}
        self.state = state
        self._last = comp
        self.events.append((time.time(), why))
        del self.events[:-100]
        if comp.warming:
            log.info("xds: listeners warming (waiting for their route configuration): %s",
                     ", ".join(comp.warming))
        return [], comp.wanted

    def status(self) -> dict:
        out = self.client.status() if self.client is not None else {}
        out["resources"] = {R.KINDS[t][0]: sorted(v) for t, v in self.state.resources.items()}
        return out
