"""`trainers eval`'s config: its options and their defaults, checked. The evaluation is
trainers/eval/evaluate.py.

Light on purpose, as trainers/families/gan/config.py: `trainers eval --help` reads its defaults from
`EvalConfig`, so nothing here imports torch or numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError, require_at_least


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: str  # what is evaluated (recorded in eval.json; the CLI loads the generator from it)
    cache: Path  # the feature cache the generator was trained on: its CLIP and its real images
    out: Path  # directory for eval.json, grid.png, grid_prompts.txt
    prompts: Path | None = None  # one prompt per line (# comments); default: eval_prompts.default_prompts
    n: int = 1000  # images generated (and real images drawn from the cache, at most all of them)
    seed: int = 0  # prompts, generator noise and the real-image draw
    batch_size: int = 100  # images per generator call
    device: str = "auto"  # CLIP, probe and Inception device
    probe: Path | None = None  # a `trainers probe` file; default: trained once per cache in _trainers/
    inception: Path | None = None  # inception-2015-12-05.pt; default: clean-fid's location if present
    grid: int = 64  # images in grid.png
    rerank: int = (
        1  # > 1: also the metrics of the best of this many candidates by CLIP (trainers.eval.rerank)
    )

    def validate(self) -> None:
        require_at_least(
            ("--n", self.n, 2),
            ("--batch-size", self.batch_size, 1),
            ("--seed", self.seed, 0),
            ("--rerank", self.rerank, 1),
        )
        if self.grid < 0:
            raise ConfigError("--grid must be 0 or more")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise ConfigError(f"--prompts {self.prompts}: file not found (one prompt per line)")
        if self.inception is not None and not Path(self.inception).is_file():
            raise ConfigError(
                f"--inception {self.inception}: file not found; download inception-2015-12-05.pt on a "
                "connected machine (clean-fid's URL) and pass its path, or leave --inception out "
                "for CLIP-feature FID"
            )
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a directory")
