"""A simulated upstream v2 provider on loopback, with faults on demand (tests and demo only).

The modules: `faults` (what a broken provider answers), `catalogue` (its services, orders and
refills), `provider` (SimProvider, the server), `command` (`smm-router sim`).
"""

from router.sim.catalogue import Received, SimOrder, SimRefill, SimService, default_catalogue
from router.sim.command import BadSpec, add_arguments, parse_fault, serve_from_args
from router.sim.faults import (
    CANNOT_CANCEL,
    CLOUDFLARE_502,
    DEEP_JSON_LEVELS,
    NOT_UTF8_PREFIX,
    PACKAGE_UNITS,
    PENDING_SHARE,
    REFILL_UNAVAILABLE,
    REFUSAL,
    WAF_403,
    Fault,
)
from router.sim.provider import SimProvider

__all__ = [
    "CANNOT_CANCEL",
    "CLOUDFLARE_502",
    "DEEP_JSON_LEVELS",
    "NOT_UTF8_PREFIX",
    "PACKAGE_UNITS",
    "PENDING_SHARE",
    "REFILL_UNAVAILABLE",
    "REFUSAL",
    "WAF_403",
    "BadSpec",
    "Fault",
    "Received",
    "SimOrder",
    "SimProvider",
    "SimRefill",
    "SimService",
    "add_arguments",
    "default_catalogue",
    "parse_fault",
    "serve_from_args",
]
