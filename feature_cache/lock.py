"""The lock every command that writes a cache holds (manifests/lock.py), with the one rule the commands
share: only embed may create the cache."""

from __future__ import annotations

from pathlib import Path

from core.errors import ConfigError
from manifests.lock import CacheLock


def writing(cache: Path, wait: float = 0.0, *, create: bool = False) -> CacheLock:
    """The lock every command that writes the cache holds; only embed may create the cache."""
    if not create and not Path(cache).is_dir():
        raise ConfigError(
            f"--cache {cache}: no such directory, so no embed stage found; run `pipeline embed INPUT... "
            f"--cache {cache}` first"
        )
    return CacheLock(cache, wait=wait)
