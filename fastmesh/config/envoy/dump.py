"""The running configuration in Envoy's admin ConfigDump shape (``/config_dump?format=envoy``),
so tooling written for Envoy (istioctl proxy-config, scripts over Envoy's admin) can read it.

Static resources come from the bootstrap as written; dynamic ones are the resources the
control plane sent, as sent (proto field names), with the version of their type and when it
was applied. Only resources fastmesh serves appear: a refused version is not in the dump.
"""
from __future__ import annotations

import datetime
from typing import Any, Optional

from .compose import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET

_ADMIN = "type.googleapis.com/envoy.admin.v3."


def _ts(wall: float) -> Optional[str]:
    if not wall:
        return None
    return datetime.datetime.fromtimestamp(wall, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


def _entry(key: str, resource: dict, type_url: str, version: Optional[str],
           updated: Optional[str]) -> dict:
    out: dict = {key: dict({"@type": type_url}, **resource)}
    if version is not None:
        out["version_info"] = version
    if updated:
        out["last_updated"] = updated
    return out


def config_dump(bootstrap: dict, started_at: float, resources: Optional[dict] = None,
                versions: Optional[dict] = None, updated_at: Optional[dict] = None) -> dict:
    """bootstrap: the file as read; resources/versions/updated_at: per xDS type, what the
    control plane sent and fastmesh serves (absent without a control plane)."""
    resources, versions, updated_at = resources or {}, versions or {}, updated_at or {}
    bootstrap = redact(bootstrap)
    resources = {t: {n: redact(r) for n, r in (rs or {}).items()} for t, rs in resources.items()}
    start = _ts(started_at)
    sr = bootstrap.get("static_resources") or {}
    static_listeners = [_entry("listener", lst, LISTENER, None, start)
                        for lst in sr.get("listeners") or ()]
    static_clusters = [_entry("cluster", c, CLUSTER, None, start)
                       for c in sr.get("clusters") or ()]

    def dynamic(t: str, key: str) -> list:
        return [_entry(key, res, t, versions.get(t), _ts(updated_at.get(t, 0)))
                for _, res in sorted((resources.get(t) or {}).items())]
    dyn_listeners = [{"name": e["listener"].get("name"),
                      "active_state": e} for e in dynamic(LISTENER, "listener")]
    return {"configs": [
        {"@type": _ADMIN + "BootstrapConfigDump", "bootstrap": bootstrap,
         "last_updated": start},
        {"@type": _ADMIN + "ClustersConfigDump", "version_info": versions.get(CLUSTER, ""),
         "static_clusters": static_clusters,
         "dynamic_active_clusters": dynamic(CLUSTER, "cluster")},
        {"@type": _ADMIN + "ListenersConfigDump", "version_info": versions.get(LISTENER, ""),
         "static_listeners": static_listeners, "dynamic_listeners": dyn_listeners},
        {"@type": _ADMIN + "RoutesConfigDump",
         "dynamic_route_configs": dynamic(ROUTE, "route_config")},
        {"@type": _ADMIN + "EndpointsConfigDump",
         "dynamic_endpoint_configs": dynamic(ENDPOINT, "endpoint_config")},
        {"@type": _ADMIN + "SecretsConfigDump",
         "dynamic_active_secrets": [dict(e, name=e["secret"].get("name"))
                                    for e in dynamic(SECRET, "secret")]},
    ]}


REDACTED = "[redacted]"
_REDACTED_B64 = "W3JlZGFjdGVkXQ=="          # base64 of it, for bytes fields


def redact(data: Any) -> Any:
    """A copy with every private key's content replaced by "[redacted]" (as Envoy's dumps
    show them): keys never leave the process through the admin API."""
    if isinstance(data, list):
        return [redact(v) for v in data]
    if not isinstance(data, dict):
        return data
    out = {}
    for k, v in data.items():
        if k in ("private_key", "privateKey") and isinstance(v, dict):
            out[k] = {kk: (_REDACTED_B64 if kk in ("inline_bytes", "inlineBytes") else REDACTED)
                      if isinstance(vv, str) else vv for kk, vv in v.items()}
        elif k == "private_key_pem" and isinstance(v, str):
            out[k] = REDACTED
        else:
            out[k] = redact(v)
    return out


def read_bootstrap(path: str) -> Optional[Any]:
    """The bootstrap file as plain data, or None when the file is not a bootstrap."""
    from ..load import _Loader                     # the loader that parsed it at start
    import yaml
    from . import looks_like_bootstrap
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except (OSError, yaml.YAMLError):
        return None
    return data if looks_like_bootstrap(data) else None
