"""Training pairs for `trainers clip`: a fresh synthetic stream, or the pairs of given shards.

A real CLIP is pretrained on pairs other than the generator's images. Offline, `trainers clip` does the
same: it renders its own synthetic pairs with indices in [PRETRAIN_INDEX, ...), disjoint from every
`pipeline synth` key (9 digits, < 10^9) and from the held-out zero-shot images ([10^9, 2 * 10^9)), so the
images a pipeline embeds are unseen by it and it never runs out of data.

Contrast groups. The stream is made of groups of `group` scenes that are identical (background, layout,
colours, sizes, positions, caption template) except for the first object's shape. In a batch of whole
groups, shape is then the only cue that tells a group's images apart, so the InfoNCE loss has to learn
it. Without groups a small CLIP learns colour, size and position in a minute and shape last: at the
default budget (3,000 steps, 2 CPU cores, 4.5 min) lafite-rn32 reached zero-shot shape 0.85 with random
batches and 0.905 with groups of 3 (benchmarks/bench_clip.py, BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import io
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import ConfigError

PRETRAIN_INDEX = 2 * 10**9  # first index of the pretraining stream (held-out eval images start at 10^9)


@dataclass
class PairedImages:
    pixels: Any  # uint8 [N, 3, S, S]
    captions: list[str]
    dropped: dict[str, int]  # samples skipped, by reason
    group: int = 1  # consecutive rows form contrast groups of this size (1: independent pairs)
    objects: list[list[dict[str, str]]] | None = None  # each row's full labels (the synthetic stream)
    wording: list[float] | None = None  # each row's wording seed (shared within a contrast group)


def read_pairs(inputs: tuple[str, ...], image_size: int) -> PairedImages:
    """Every sample with an image and a caption, decoded and fitted to `image_size` (centre crop)."""
    import torch
    from PIL import Image

    from inputs.images import fit_square
    from inputs.sources import expand_inputs, read_unit
    from inputs.units import Skip

    units = expand_inputs(list(inputs))
    arrays, captions, dropped = [], [], Counter()
    for unit in units:
        for item in read_unit(unit):
            if isinstance(item, Skip):
                dropped[item.reason] += 1
                continue
            if not item.caption:
                dropped["no_caption"] += 1
                continue
            try:
                with Image.open(io.BytesIO(item.data)) as img:
                    rgb = fit_square(img.convert("RGB"), image_size)
                    arrays.append(np.asarray(rgb, dtype=np.uint8))
            except Exception:  # noqa: BLE001 - any decoder failure is one dropped sample
                dropped["undecodable"] += 1
                continue
            captions.append(item.caption)
    if len(captions) < 2:
        raise ConfigError(
            f"--data: found {len(captions)} image-caption pair(s) in {len(units)} input(s); training needs "
            "at least 2 (the synthetic world's shards have a caption per image: `pipeline synth`)"
        )
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # [N, 3, S, S]
    return PairedImages(pixels, captions, dict(dropped))


def jpeg_round_trip(image) -> Any:
    """PIL RGB -> uint8 [3, S, S] through the JPEG settings of `pipeline synth` (what the shards hold)."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return decode_image(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8), ImageReadMode.RGB)


def contrast_group(seed: int, index: int, group: int, image_size: int, max_objects: int):
    """`group` (pixels uint8 [3, S, S], caption, objects, wording seed) of one base scene whose first object
    takes `group` different shapes (its own first). Every shape may meet every colour here: a real CLIP
    has seen them."""
    from world.labels import labels
    from world.synth import render_scene, sample_scene

    shapes_all = labels().vocabulary["shape"]

    base = sample_scene(seed, index, max_objects)
    rng = random.Random(f"trainers/clip/group/{seed}/{index}")
    first = base.objects[0]["shape"]
    shapes = [first, *rng.sample([s for s in shapes_all if s != first], group - 1)]
    template_seed = rng.random()  # one caption template and wording for the whole group
    pairs = []
    for k, shape in enumerate(shapes):
        objects = [dict(o) for o in base.objects]
        objects[0]["shape"] = shape
        scene = dataclasses.replace(
            base, objects=objects, caption=labels().caption(objects, random.Random(template_seed))
        )
        image = render_scene(scene, image_size, np.random.default_rng([seed, 2, index, k]))
        pairs.append((jpeg_round_trip(image), scene.caption, objects, template_seed))
    return pairs


def render_pairs(n: int, seed: int, image_size: int, group: int, max_objects: int) -> PairedImages:
    """n fresh pretraining pairs (whole contrast groups, rounded up) at indices >= PRETRAIN_INDEX."""
    import torch

    from world.labels import labels

    n_shapes = len(labels().vocabulary["shape"])
    if not 1 <= group <= n_shapes:
        raise ConfigError(f"--contrast-group must be 1..{n_shapes} (the number of shapes), not {group}")
    pixels, captions, objects, wording = [], [], [], []
    for g in range(-(-n // group)):
        for image, caption, labels_, seed_ in contrast_group(
            seed, PRETRAIN_INDEX + g, group, image_size, max_objects
        ):
            pixels.append(image)
            captions.append(caption)
            objects.append(labels_)
            wording.append(seed_)
    return PairedImages(torch.stack(pixels), captions, {}, group, objects, wording)


def step_captions(pairs: PairedImages, rows, seed: int, step: int) -> list[str]:
    """Fresh partial captions of `rows` for training step `step` (a pure function of seed, step and row,
    so a resumed or data-parallel run draws the same): each states a random non-empty subset of each
    object's attributes, the same subset and wording for a whole contrast group, whose first object always
    names its shape when the group has several (shape is all that tells the group's images apart)."""
    from world.labels import labels

    world = labels()
    if pairs.objects is None or pairs.wording is None:
        raise ValueError("partial captions need the synthetic stream's labels")
    captions = []
    for row in (int(r) for r in rows):
        group = row // pairs.group
        rng = random.Random(f"trainers/clip/captions/{seed}/{step}/{group}")
        objects = pairs.objects[row]
        named = [set(o) for o in world.partial_objects(objects, rng)]
        if pairs.group > 1:
            named[0].add("shape")
        stated = [{a: v for a, v in o.items() if a in keep} for o, keep in zip(objects, named, strict=True)]
        captions.append(world.caption(stated, random.Random(f"{pairs.wording[row]}/{step}")))
    return captions


def batch_rows(pairs: PairedImages, batch: int, generator) -> Any:
    """Row indices of one batch: batch // group whole contrast groups drawn without replacement."""
    import torch

    n_groups = len(pairs.captions) // pairs.group
    groups = torch.randperm(n_groups, generator=generator)[: max(1, batch // pairs.group)]
    return (groups[:, None] * pairs.group + torch.arange(pairs.group)[None, :]).reshape(-1)


def normalise(pixels, mean, std):
    """uint8 [B, 3, S, S] -> the float input open_clip expects (as `core.clip.encode_images`)."""
    import torch

    x = pixels.float().div(255.0)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
