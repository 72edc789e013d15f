"""CLIP re-ranking (DALL-E, Ramesh et al. 2021): draw N candidates per prompt, keep the one CLIP finds
closest to it. Any generator family works: only the `trainers.families.load.load_generator` contract is used.

    best = rerank(generate, text, bundle, n=8, seed=0)  # text: float32 [P, D] prompt text features
    best.images    # uint8 [P, 3, H, W]: per row of `text`, its kept candidate
    best.chosen    # int64 [P]: which candidate was kept
    best.scores    # float32 [P, n]: cos(CLIP image feature of candidate j, text feature); None when n == 1
    best.features  # float32 [P, D]: CLIP image features of the kept images; None when n == 1

Candidate j of every row is `generate(text, candidate_seed(seed, j))`: one generator call per candidate
over the P rows, so at most P kept images, one candidate batch and its features are held at once (the
caller bounds P: `trainers eval` re-ranks batch by batch). `candidate_seed(seed, 0) == seed`, so candidate
0 is the plain `generate(text, seed)`: a kept image never scores below the un-ranked one, and n = 1 returns
exactly that output with no CLIP work. Same generator, text, seed and n: same images. The score is the
cosine behind `trainers eval`'s CLIP score (`trainers.eval.features.cosine`); ties keep the earlier
candidate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

RERANK_STREAM = 23  # SeedSequence tag of candidate seeds: apart from eval's batch seeds [seed, start]

Generate = Callable[[Any, int], Any]  # (cond float32 [N, D], seed) -> uint8 [N, 3, H, W]


@dataclass
class Reranked:
    images: Any  # uint8 Tensor [P, 3, H, W] on the CPU: the kept candidate of each prompt
    chosen: np.ndarray  # int64 [P]: its index among the n candidates (0: the plain generate output)
    scores: np.ndarray | None  # float32 [P, n]: every candidate's cosine to its prompt; None when n == 1
    features: np.ndarray | None  # float32 [P, D]: CLIP image features of `images`; None when n == 1

    @classmethod
    def concat(cls, parts: list[Reranked]) -> Reranked:
        """Batches of rows (same n) -> one result, rows in order."""
        import torch

        def rows(name):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        return cls(torch.cat([p.images for p in parts]), rows("chosen"), rows("scores"), rows("features"))


def candidate_seed(seed: int, j: int) -> int:
    """The generator seed of candidate j: `seed` itself for j = 0, then derived from (seed, j)."""
    if j == 0:
        return seed
    state = np.random.SeedSequence([seed % 2**64, RERANK_STREAM, j]).generate_state(1)[0]
    return int(state & 0x7FFFFFFF)


def as_images(images: Any, count: int):
    """A generator's output as a CPU uint8 Tensor [count, 3, H, W]; a ValueError naming what it was."""
    import torch

    images = torch.as_tensor(images).cpu()
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[:2] != (count, 3):
        raise ValueError(
            f"the generator returned {images.dtype} {tuple(images.shape)}; expected uint8 [{count}, 3, H, W]"
        )
    return images


def rerank(
    generate: Generate,
    text: Any,
    bundle: Any,
    n: int,
    seed: int,
    *,
    first: Any | None = None,
    progress: Callable[[int], None] | None = None,
) -> Reranked:
    """Per row of `text` (float32 [P, D], the prompts' CLIP text features: the generator's condition and
    what candidates are scored against), the best of `n` candidates by CLIP cosine. `bundle` is the CLIP
    (core.clip.ClipBundle) that made `text`. `first`: the caller's `generate(text, seed)` if it has it,
    so candidate 0 is not drawn twice. `progress(k)` after each generator call of k images."""
    import torch

    from trainers.eval.features import clip_image_features, cosine

    if n < 1:
        raise ValueError(f"rerank: n must be at least 1, got {n}")
    cond = torch.as_tensor(text, dtype=torch.float32)
    if cond.dim() != 2:
        raise ValueError(f"rerank: text must be [P, D], got {tuple(cond.shape)}")
    count = len(cond)

    def candidate(j: int):
        if j == 0 and first is not None:
            return as_images(first, count)
        images = as_images(generate(cond, candidate_seed(seed, j)), count)
        if progress:
            progress(count)
        return images

    if n == 1:
        return Reranked(candidate(0), np.zeros(count, np.int64), None, None)
    text_unit = torch.nn.functional.normalize(cond, dim=1).numpy()  # [P, D]
    scores = np.empty((count, n), np.float32)
    best_images = best_features = None
    for j in range(n):
        images = candidate(j)  # [P, 3, H, W]
        features = clip_image_features(bundle, images)  # [P, D]
        scores[:, j] = cosine(features, text_unit)
        if j == 0:
            best_images, best_features = images.clone(), features.copy()
            continue
        better = scores[:, j] > scores[:, :j].max(axis=1)  # strictly: a tie keeps the earlier, as argmax
        best_images[torch.from_numpy(better)] = images[torch.from_numpy(better)]
        best_features[better] = features[better]
    return Reranked(best_images, scores.argmax(axis=1).astype(np.int64), scores, best_features)
