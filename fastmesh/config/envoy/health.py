"""Envoy ``config.core.v3.HealthCheck`` (a cluster's health_checks) -> model ``HealthCheck``."""
from __future__ import annotations

from typing import Optional

from ..model import HealthCheck
from ._common import NOT_YET, EnvoyChecker


def translate_health_checks(c: EnvoyChecker, raw, path: str) -> Optional[HealthCheck]:
    if raw:
        c.err(path, "active health checking: " + NOT_YET)
    return None
