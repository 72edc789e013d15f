"""`trainers compare`'s few-shot and semi-supervised arms: Lafite2's title claim as an experiment.

Beside the plain conditions (`optimize`, `caption`, ...), `--conditions` takes arms, each at the same
total budget (`--steps`) as every other run and evaluated the same way:

    fewshot:P   pre-train on the language-free condition (`--language-free`, default optimize) for
                (1 - finetune_share) of the budget, then fine-tune on exactly P real pairs for the rest
                (`--init` from the pre-training, `--condition caption --paired-limit P`)
    scratch:P   supervised from scratch on the same P pairs for the whole budget
    semi:P      the language-free condition for the whole budget, with P images given their real
                captions throughout (`--paired-limit P` beside a non-caption condition)

P is a count of pairs (`20`) or a fraction of the cache's images (`0.01`: 1 %, rounded, at least one).
The loader draws the pairs from the run's seed (trainers.data.loader: the same draw for every run of that seed
on the same condition), so fewshot:P and scratch:P of a seed train on the same images; each run lists
them in its pairs.txt and records their digest in its manifest. The pre-training is a unit of its own,
`pretrain-s{seed}`, keyed without P: adding or changing P reuses it, and every fewshot run is keyed on
its checkpoint's content digest.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError

ARMS = ("fewshot", "scratch", "semi")  # in report order
PRETRAIN = "pretrain"  # the fewshot arms' shared pre-training unit: pretrain-s{seed}
COUNT_RE = re.compile(r"^[1-9][0-9]*$")


@dataclass(frozen=True)
class Arm:
    kind: str  # fewshot | scratch | semi
    spec: str  # P as given: a count ("20") or a fraction of the cache ("0.01")

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.spec}"

    def pairs(self, n_images: int) -> int:
        """P as a count of pairs, for a cache of n_images images."""
        if COUNT_RE.match(self.spec):
            return int(self.spec)
        return max(1, round(float(self.spec) * n_images))


def parse_arm(condition: str, flag: str = "--conditions") -> Arm | None:
    """`fewshot:0.01` -> Arm; a plain condition -> None; a malformed arm is a ConfigError."""
    kind, _, spec = condition.partition(":")
    if kind not in ARMS:
        return None
    if COUNT_RE.match(spec):
        return Arm(kind, spec)
    try:
        fraction = float(spec)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction <= 1:
        raise ConfigError(
            f"{flag} {condition}: give {kind}:P with P a count of pairs (e.g. {kind}:20) or a fraction of "
            f"the cache's images in (0, 1] (e.g. {kind}:0.01)"
        )
    return Arm(kind, spec)


def split_budget(steps: int, finetune_share: float) -> tuple[int, int]:
    """(pre-training steps, fine-tuning steps) of a fewshot run: both at least one, summing to `steps`."""
    finetune = min(max(1, round(steps * finetune_share)), steps - 1)
    return steps - finetune, finetune


def cache_images(cache: Path) -> int:
    """Images in the cache: the rows of its embed shards (their manifests), which P fractions are of."""
    from manifests import list_manifests

    return sum(int(m.get("rows") or 0) for m in list_manifests(Path(cache), "embed").values())


def arm_run(arm: Arm, language_free: str, steps: int, finetune_share: float, n_images: int) -> dict:
    """How one arm's evaluated run trains: condition, paired_limit, steps (and whether it starts from
    the pre-training)."""
    pairs = arm.pairs(n_images)
    if arm.kind == "fewshot":
        return dict(condition="caption", paired_limit=pairs, steps=split_budget(steps, finetune_share)[1])
    if arm.kind == "scratch":
        return dict(condition="caption", paired_limit=pairs, steps=steps)
    return dict(condition=language_free, paired_limit=pairs, steps=steps)


def pretrain_name(seed: int) -> str:
    return f"{PRETRAIN}-s{seed}"
