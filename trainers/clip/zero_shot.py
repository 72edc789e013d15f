"""The offline CLIP's tests (`trainers clip` writes them into clip_eval.json): zero-shot accuracy per
attribute on held-out one-object images, by prompt ensembles and by single prompts, image-to-caption top-1,
on held-out two-object images the caption-swap accuracy per object slot, and the modality gap
(`modality_gap`). The held-out images are rendered at indices from HELD_OUT_INDEX, beyond any `pipeline
synth` key.

A class's prompt ensemble follows the caption style the CLIP learnt from: in the partial world, captions
that name the attribute alone ("a crimson thing", "there is a shape on the left"); in the full world,
captions of every single-object combination with that value."""

from __future__ import annotations

import random
from typing import Any

from trainers.clip.data import normalise

HELD_OUT_INDEX = 10**9  # first index of the evaluation images: beyond any `pipeline synth` key (9 digits)


N_ALONE = 24  # wordings per class of the partial world's ensemble
N_OWN_CAPTIONS = 5  # captions per held-out image in the gap figures (partial world)


def held_out_images(
    n: int, seed: int, image_size: int, max_objects: int = 1, caption_style: str = "full", per_image: int = 1
):
    """(uint8 [n, 3, S, S], labels) of synthetic images no `pipeline synth` run can hold (index >= 10^9),
    JPEG round-tripped like the shards. The images do not depend on the caption style."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    from world.synth import make_sample

    pixels, labels = [], []
    for i in range(n):
        sample = make_sample(seed, HELD_OUT_INDEX + i, image_size, max_objects, caption_style, per_image)
        data = torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8)
        pixels.append(decode_image(data, mode=ImageReadMode.RGB))
        labels.append(sample["json"])
    return torch.stack(pixels), labels


def class_prompts(attribute: str, value: str, caption_style: str = "full") -> list[str]:
    """The class's prompt ensemble (see the module docstring): N_ALONE captions naming `value` alone
    (partial), or captions of every single-object combination with `attribute` = `value` (full)."""
    from itertools import product

    from world.labels import labels

    values = labels().vocabulary
    rng = random.Random(f"trainers/clip/prompts/{attribute}/{value}")
    if caption_style == "partial":
        return [labels().caption([{attribute: value}], rng) for _ in range(N_ALONE)]
    prompts = []
    for combo in product(*(values[a] if a != attribute else (value,) for a in values)):
        prompts.append(labels().caption([dict(zip(values, combo, strict=True))], rng))
    return prompts


def single_prompt(attribute: str, value: str) -> str:
    from world.labels import labels

    return labels().phrase(attribute, value)


def encode_text_batched(model, tokenizer, texts: list[str], device, batch: int = 512):
    import torch

    out = [
        model.encode_text(tokenizer(texts[i : i + batch]).to(device), normalize=True)
        for i in range(0, len(texts), batch)
    ]
    return torch.cat(out).float()


def encode_images_batched(model, pixels, mean, std, device, batch: int = 256):
    import torch

    return torch.cat(
        [
            model.encode_image(normalise(pixels[i : i + batch], mean, std).to(device), normalize=True)
            for i in range(0, len(pixels), batch)
        ]
    ).float()


def modality_gap(
    model, tokenizer, mean, std, image_size: int, n: int, seed: int, device, caption_style: str = "partial"
) -> dict[str, Any]:
    """How far apart the image and text cones are, on n held-out one-object images and their own captions
    (N_OWN_CAPTIONS partial ones each, or the one full one), as Liang et al. 2022 and Lafite2's Figure 1
    measure it: mean cos(image, own caption) and cos(image, another image's caption); text-text cos of
    two captions of the same image and of different images; image-image cos of different images; and
    the gap vector, mean image feature minus mean text feature, by its length (real CLIP: 0.82)."""
    import torch

    per_image = N_OWN_CAPTIONS if caption_style == "partial" else 1
    pixels, labels = held_out_images(n, seed, image_size, 1, caption_style, per_image)
    img = encode_images_batched(model, pixels, mean, std, device)  # [n, D]
    texts = [caption for lab in labels for caption in lab.get("captions", [lab["caption"]])]
    txt = encode_text_batched(model, tokenizer, texts, device).view(n, per_image, -1)  # [n, k, D]
    other = torch.roll(torch.arange(n), 1)  # each image's neighbour: a random other image of the stream
    own = torch.einsum("nd,nkd->nk", img, txt)
    gap = {
        "cos_image_own_caption": float(own.mean()),
        "cos_image_other_caption": float(torch.einsum("nd,nkd->nk", img, txt[other]).mean()),
        "cos_text_other_image": float((txt[:, 0] * txt[other, 0]).sum(-1).mean()),
        "cos_image_image": float((img * img[other]).sum(-1).mean()),
        "gap_vector_length": float((img.mean(0) - txt.reshape(-1, txt.shape[-1]).mean(0)).norm()),
    }
    if per_image > 1:
        gap["cos_text_same_image"] = float((txt[:, 0] * txt[:, 1]).sum(-1).mean())
    return {
        **{k: round(v, 4) for k, v in gap.items()},
        "images": n,
        "captions_per_image": per_image,
        "seed": seed,
    }


def zero_shot(
    model, tokenizer, mean, std, image_size: int, n: int, seed: int, device, caption_style: str = "full"
) -> dict[str, Any]:
    """Zero-shot accuracy per attribute on n held-out one-object images (see the module docstring)."""
    import torch

    from world.labels import labels as world_labels

    values = world_labels().vocabulary
    pixels, labels = held_out_images(n, seed, image_size)
    img = encode_images_batched(model, pixels, mean, std, device)  # [n, D]
    ensemble, single, chance = {}, {}, {}
    for attribute, names in values.items():
        truth = torch.tensor([names.index(lab["objects"][0][attribute]) for lab in labels], device=img.device)
        classes = []
        for value in names:
            prompts = class_prompts(attribute, value, caption_style)
            feats = encode_text_batched(model, tokenizer, prompts, device)
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
        "zero_shot_prompts": "the attribute alone" if caption_style == "partial" else "every combination",
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

    from world.labels import labels as world_labels

    world = world_labels()
    values = world.vocabulary
    pixels, labels = held_out_images(n, seed, image_size, max_objects=2)
    keep = [i for i, lab in enumerate(labels) if len(lab["objects"]) == 2]
    if not keep:
        return {}
    img = encode_images_batched(model, pixels[keep], mean, std, device)  # [m, D]
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
