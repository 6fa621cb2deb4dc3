"""The names of the contracts, checked the same way everywhere: Thing ids, types, features, sites.

A Thing id is `{site}:{equipment_id}` (DESIGN, contracts); property and feature names are
identifiers, so they are safe in flattened point paths (`voltage.a`, `temperature_zones[1]`).
"""

from __future__ import annotations

import ipaddress
import re

SITE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")  # also lines and gateway ids
TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")
EQUIPMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
THING_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}:[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")  # features and properties


def is_loopback(host: str) -> bool:
    """Whether a listen address reaches only this machine (`localhost`, 127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False
