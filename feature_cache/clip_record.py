"""The CLIP that made a cache's image embeddings, as its embed manifests record it: every later stage and
every trainer uses that CLIP (a cache made with a mix of CLIPs is refused)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError
from core.paths import resolve_recorded
from manifests import list_manifests


@dataclass(frozen=True)
class EmbeddedClip:
    """The CLIP that made a cache's image embeddings, as recorded in the embed manifests."""

    clip_model: str  # the --clip-model argument, to load it again
    clip_pretrained: str  # the --clip-pretrained argument
    identity: dict[str, str]  # content-based identity (what downstream stages key on)
    dim: int


def embedded_clip(cache: Path) -> EmbeddedClip:
    """Later stages use the embed stage's CLIP; a cache without one, or with a mix, is refused."""
    manifests = list_manifests(cache, "embed")
    if not manifests:
        raise ConfigError(
            f"--cache {cache}: no embed stage found; run `pipeline embed INPUT... --cache {cache}`"
        )
    identities = {
        (m["params"]["clip_model"], m["params"]["clip_weights"], m.get("dim")) for m in manifests.values()
    }
    if len(identities) > 1:
        raise ConfigError(
            f"--cache {cache}: embed shards were made with different CLIP models; rerun `pipeline embed` "
            "with one --clip-model/--clip-pretrained so every shard agrees"
        )
    first = manifests[min(manifests)]
    model, weights, dim = identities.pop()
    unkeyed = first["unkeyed"]
    model_arg, pretrained_arg = (
        resolve_recorded(unkeyed[name], Path(cache)) for name in ("clip_model_arg", "clip_pretrained_arg")
    )
    return EmbeddedClip(model_arg, pretrained_arg, {"model": model, "weights": weights}, dim)
