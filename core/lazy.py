"""Code named as text, "module:name", imported on first use: the registries of the generator families list
their code this way, so that listing them (every `--help`) imports no torch."""

from __future__ import annotations

import importlib
from typing import Any


def member(ref: str) -> Any:
    """`module:name` -> that attribute, imported on first use (families stay cheap to list)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
