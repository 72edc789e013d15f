"""Image features and the distances `trainers eval` reads off them: CLIP image and text features of the
cache's CLIP, the cosine behind the CLIP score, Frechet distance (clean-fid's formula) and clean-fid's
Inception features when its weights are on disk (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.errors import ConfigError

CLEANFID_INCEPTION = Path("/tmp/inception-2015-12-05.pt")  # where clean-fid downloads it (Linux/macOS)


def frechet(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (clean-fid's formula)."""
    from cleanfid.fid import frechet_distance

    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def clip_image_features(bundle, pixels, batch_size: int = 256) -> np.ndarray:
    """uint8 [N, 3, H, W] -> unit-norm float32 [N, D] with `bundle` (a core.clip.ClipBundle)."""
    from core.clip import encode_images

    return np.concatenate(
        [
            encode_images(bundle, pixels[i : i + batch_size]).cpu().numpy()
            for i in range(0, len(pixels), batch_size)
        ]
    )


def clip_text_features(bundle, texts: list[str], batch_size: int = 256) -> np.ndarray:
    from core.clip import encode_texts

    return np.concatenate(
        [
            encode_texts(bundle, texts[i : i + batch_size]).cpu().numpy()
            for i in range(0, len(texts), batch_size)
        ]
    )


def cosine(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """cos of matched rows [N] (both unit-norm [N, D]): the CLIP score's, and trainers.eval.rerank's
    ranking."""
    return np.sum(image_features * text_features, axis=1)


def clip_score(image_features: np.ndarray, text_features: np.ndarray) -> float:
    """mean max(100 * cos, 0) over matched rows (both unit-norm)."""
    return float(np.mean(np.maximum(100.0 * cosine(image_features, text_features), 0.0)))


def inception_weights(explicit: Path | None) -> Path | None:
    """The local Inception weights to use, or None: never downloads."""
    if explicit is not None:
        return Path(explicit)
    return CLEANFID_INCEPTION if CLEANFID_INCEPTION.is_file() else None


def load_inception(weights: Path, device, flag: str = "--inception"):
    """clean-fid's TorchScript Inception from the file given (any name), as `features(x float [B, 3, 299,
    299] in 0..255) -> [B, 2048]`: clean-fid's InceptionV3W forward, which itself only loads a file named
    inception-2015-12-05.pt from a folder."""
    import torch

    from core.torch_files import load_torchscript_file

    base = load_torchscript_file(weights, flag, expect="clean-fid's inception-2015-12-05.pt")
    if not isinstance(getattr(base, "layers", None), torch.nn.Module):
        raise ConfigError(
            f"{flag} {weights}: a TorchScript archive, but not clean-fid's Inception (no layers)"
        )
    layers = base.layers.to(device).eval()

    def features(x):
        return layers.forward((x - 128) / 128).view(x.shape[0], 2048)

    return features


def inception_features(model, pixels, device, batch_size: int = 50) -> np.ndarray:
    """clean-fid's "clean" mode: PIL bicubic resize to 299 per image, then `load_inception`'s model."""
    import torch
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    feats = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start : start + batch_size].permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
            resized = np.stack([resize(img) for img in chunk]).transpose(0, 3, 1, 2)  # [B, 3, 299, 299]
            feats.append(model(torch.from_numpy(resized).float().to(device)).cpu().numpy())
    return np.concatenate(feats)


def real_halves_fid(real_features: np.ndarray) -> float | None:
    """FID between two disjoint halves of the real images (alternate rows of the seeded draw): what FID
    reads for real images, the floor a generator's FID is to be read against. Each half has n_real / 2
    images, so small-n bias puts it a little above the floor at n_real (FID is biased upwards)."""
    if len(real_features) < 4:
        return None
    return frechet(real_features[0::2], real_features[1::2])


def fid_label(fid_features: str | None) -> str:
    """'FID (CLIP features)' or 'FID (Inception features)': a CLIP-feature FID is on another scale."""
    return "FID (Inception features)" if fid_features == "inception" else "FID (CLIP features)"
