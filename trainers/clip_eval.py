"""The offline CLIP's zero-shot tests (`trainers clip` writes them into clip_eval.json): per attribute on
held-out one-object images, by prompt ensembles and by single prompts, image-to-caption top-1, and on
held-out two-object images the caption-swap accuracy per object slot. The held-out images are rendered at
indices from HELD_OUT_INDEX, beyond any `pipeline synth` key."""

from __future__ import annotations

import random
from typing import Any

from trainers.clip_data import normalise

HELD_OUT_INDEX = 10**9  # first index of the evaluation images: beyond any `pipeline synth` key (9 digits)


def held_out_images(n: int, seed: int, image_size: int, max_objects: int = 1):
    """(uint8 [n, 3, S, S], labels) of synthetic images no `pipeline synth` run can hold (index >= 10^9),
    JPEG round-tripped like the shards."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    from pipeline.synth import make_sample

    pixels, labels = [], []
    for i in range(n):
        sample = make_sample(seed, HELD_OUT_INDEX + i, image_size, max_objects)
        data = torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8)
        pixels.append(decode_image(data, mode=ImageReadMode.RGB))
        labels.append(sample["json"])
    return torch.stack(pixels), labels


def class_prompts(attribute: str, value: str) -> list[str]:
    """Captions of every single-object combination with `attribute` = `value` (synth templates)."""
    from itertools import product

    from pipeline.labels import labels

    values = labels().vocabulary
    rng = random.Random(f"trainers/clip/prompts/{attribute}/{value}")
    prompts = []
    for combo in product(*(values[a] if a != attribute else (value,) for a in values)):
        prompts.append(labels().caption([dict(zip(values, combo, strict=True))], rng))
    return prompts


def single_prompt(attribute: str, value: str) -> str:
    from pipeline.labels import labels

    return labels().phrase(attribute, value)


def encode_text_batched(model, tokenizer, texts: list[str], device, batch: int = 512):
    import torch

    out = [
        model.encode_text(tokenizer(texts[i : i + batch]).to(device), normalize=True)
        for i in range(0, len(texts), batch)
    ]
    return torch.cat(out).float()


def zero_shot(model, tokenizer, mean, std, image_size: int, n: int, seed: int, device) -> dict[str, Any]:
    """Zero-shot accuracy per attribute on n held-out one-object images (see the module docstring)."""
    import torch

    from pipeline.labels import labels as world_labels

    values = world_labels().vocabulary
    pixels, labels = held_out_images(n, seed, image_size)
    img = torch.cat(
        [
            model.encode_image(normalise(pixels[i : i + 256], mean, std).to(device), normalize=True)
            for i in range(0, n, 256)
        ]
    ).float()  # [n, D]
    ensemble, single, chance = {}, {}, {}
    for attribute, names in values.items():
        truth = torch.tensor([names.index(lab["objects"][0][attribute]) for lab in labels], device=img.device)
        classes = []
        for value in names:
            feats = encode_text_batched(model, tokenizer, class_prompts(attribute, value), device)
            classes.append(torch.nn.functional.normalize(feats.mean(dim=0), dim=0))
        classes_t = torch.stack(classes)  # [C, D]
        ensemble[attribute] = round(float(((img @ classes_t.T).argmax(dim=1) == truth).float().mean()), 4)
        prompts = encode_text_batched(model, tokenizer, [single_prompt(attribute, v) for v in names], device)
        single[attribute] = round(float(((img @ prompts.T).argmax(dim=1) == truth).float().mean()), 4)
        chance[attribute] = round(1.0 / len(names), 4)
    captions = [lab["caption"] for lab in labels]
    txt = encode_text_batched(model, tokenizer, captions, device)  # [n, D]
    top1 = float(((img @ txt.T).argmax(dim=1) == torch.arange(n, device=img.device)).float().mean())
    return {
        "zero_shot": ensemble,
        "zero_shot_single_prompt": single,
        "chance": chance,
        "image_to_caption_top1": round(top1, 4),
        "eval_images": {"n": n, "seed": seed, "first_index": HELD_OUT_INDEX, "objects": 1},
    }


def zero_shot_slots(model, tokenizer, mean, std, image_size: int, n: int, seed: int, device) -> dict:
    """Zero-shot accuracy per object slot on held-out two-object images, by caption swap: for slot i and
    attribute a, the candidates are the image's true caption with slot i's a set to each possible value
    (same template and wording), and the prediction is the candidate of highest cosine. This asks whether
    the CLIP binds each attribute to the right object, which class prompts cannot."""
    import torch

    from pipeline.labels import labels as world_labels

    world = world_labels()
    values = world.vocabulary
    pixels, labels = held_out_images(n, seed, image_size, max_objects=2)
    keep = [i for i, lab in enumerate(labels) if len(lab["objects"]) == 2]
    if not keep:
        return {}
    img = torch.cat(
        [
            model.encode_image(normalise(pixels[keep[i : i + 256]], mean, std).to(device), normalize=True)
            for i in range(0, len(keep), 256)
        ]
    ).float()  # [m, D]
    accuracy: dict[str, dict[str, float]] = {}
    for slot in (0, 1):
        accuracy[f"object_{slot + 1}"] = {}
        for attribute, names in values.items():
            texts, truth = [], []
            for i in keep:
                objects = labels[i]["objects"]
                truth.append(names.index(objects[slot][attribute]))
                for value in names:
                    swapped = [dict(o) for o in objects]
                    swapped[slot][attribute] = value
                    texts.append(world.caption(swapped, random.Random(f"trainers/clip/slots/{i}")))
            txt = encode_text_batched(model, tokenizer, texts, device).view(len(keep), len(names), -1)
            pred = torch.einsum("md,mcd->mc", img, txt).argmax(dim=1).cpu()
            accuracy[f"object_{slot + 1}"][attribute] = round(
                float((pred == torch.tensor(truth)).float().mean()), 4
            )
    return {**accuracy, "n_images": len(keep), "seed": seed}
