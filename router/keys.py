"""Reseller API keys as the database knows them: a hash, never the key itself.

Its own module, light on purpose: `smm-router clients add` and `rotate-key` need it, and
importing it from the API would load the HTTP server into a command that only writes a row.
"""

from __future__ import annotations

import hashlib


def hash_key(key: str) -> str:
    """How an API key is stored and looked up: its SHA-256, never the key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
