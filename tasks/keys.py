"""API keys: who a request is from. Only SHA-256 hashes of keys are configured and kept
(``FLEET_API_KEYS``, ``FLEET_API_KEY_FILE``); a presented key is hashed and looked up.
A key's name owns the jobs it submits: other keys cannot see them, and rate limits and
the cap on active jobs count per name.

The local default is one development key, ``fleet-dev-key`` (name ``dev``): anything but
a laptop must configure its own (``fleet keys create NAME`` makes one).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

DEV_KEY = "fleet-dev-key"
DEV_KEYS = f"dev:{hashlib.sha256(DEV_KEY.encode()).hexdigest()}"

_ENTRY = re.compile(r"^([A-Za-z0-9_.-]{1,64})[:\s]+([0-9a-f]{64})$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(name: str) -> tuple[str, str]:
    """A fresh key for ``name`` and the ``name:hash`` entry to configure (the key itself is
    shown once and stored nowhere)."""
    key = "fk_" + secrets.token_urlsafe(32)
    return key, f"{name}:{hash_key(key)}"


@dataclass(frozen=True)
class KeyRing:
    names: dict[str, str]  # sha256 hex -> name

    @classmethod
    def parse(cls, entries: str, key_file: str = "") -> KeyRing:
        """``name:sha256hex`` entries separated by commas or whitespace, plus one per line
        of ``key_file`` (``#`` starts a comment). Raises ``ValueError`` on a bad entry."""
        lines = [e for e in re.split(r"[,\s]+", entries.strip()) if e]
        if key_file:
            for line in Path(key_file).read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    lines.append(line)
        names: dict[str, str] = {}
        for line in lines:
            match = _ENTRY.match(line)
            if not match:
                raise ValueError(f"API key entry '{line[:80]}': expected NAME:SHA256HEX (see `fleet keys create`)")
            names[match[2]] = match[1]
        return cls(names)

    def owner(self, presented: str) -> str | None:
        """The name of the key presented, or None when it is not one of ours."""
        return self.names.get(hash_key(presented))
