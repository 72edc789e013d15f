"""What an autoencoder keeps (trainers/autoencoders/recon_probe.py), on hand-made reconstructions: the images
themselves score as the real images do, the images with their objects erased score at chance and at the
erased reference PSNR, unlabelled images leave the probe out, and `--encode`'s check refuses an encoder
that loses the objects and passes one that keeps them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from factories import TINY_CLIP, tiny_cache
from PIL import Image
from typer.testing import CliRunner

from cli.trainers import app
from core.errors import ConfigError
from pipeline.embed.config import EmbedConfig
from pipeline.embed.stage import run_embed
from trainers.autoencoders.recon_probe import (
    KEPT_MIN,
    NOT_WORLD,
    check_keeps_objects,
    describe,
    erase_objects,
    lost,
    may_be_world,
    measure,
    reconstruction_report,
)
from trainers.autoencoders.vae.config import VaeConfig
from trainers.autoencoders.vae.train import run_vae
from trainers.probe.config import ProbeConfig
from trainers.probe.probe import probe_path, save_probe, train_probe
from world.labels import chance
from world.synth import make_sample


@pytest.fixture(scope="module")
def world():
    """(images float [-1, 1] [64, 3, 32, 32], their labels), one object each, never seen by the probe."""
    samples = [make_sample(123, i, image_size=32, max_objects=1) for i in range(64)]
    pixels = [np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return images, [s["json"] for s in samples]


@pytest.fixture(scope="module")
def probe(one_torch_thread):
    """The probe `measure` trains for a 32 px cache (the same config, so a cache can be given it)."""
    return train_probe(ProbeConfig(image_size=32, device="cpu"))


def test_the_images_themselves_keep_everything(world, probe):
    images, labels = world
    report = reconstruction_report(images, images.clone(), labels, probe)
    assert report["probe"]["kept"] == {"shape": 1.0, "colour": 1.0, "size": 1.0, "position": 1.0}
    assert min(report["probe"]["real"].values()) > 0.9 and report["probe"]["n_objects"] == 64
    assert report["psnr_db"] == 100.0 and report["psnr_db"] > report["object_erased_psnr_db"]
    assert lost(report) == [] and "objects erased 2" in describe(report)
    assert "probe on reconstructions/real images: shape 0.9" in describe(report)


def test_erased_objects_score_at_chance_and_at_the_erased_reference(world, probe):
    images, labels = world
    erased = erase_objects(images, [lab["boxes"] for lab in labels])
    assert not torch.equal(erased, images)
    report = reconstruction_report(images, erased, labels, probe)
    assert report["psnr_db"] == report["object_erased_psnr_db"] > report["mean_image_psnr_db"]
    read = report["probe"]["reconstructed"]
    levels = chance()
    for attr in ("colour", "position"):
        assert read[attr] < levels[attr] + 0.15, report  # 64 objects: chance within its noise
        assert report["probe"]["kept"][attr] < KEPT_MIN
    assert [gone.split()[0] for gone in lost(report)] == ["colour", "position"]


def test_unlabelled_images_leave_the_probe_out(world, probe):
    images, _ = world
    report = reconstruction_report(images, images, [None] * len(images), probe, "not the world")
    assert report["probe"] is None and report["object_erased_psnr_db"] is None
    assert lost(report) == [] and "attributes not measured (not the world)" in describe(report)


def test_encode_check_refuses_an_encoder_that_loses_the_objects(tmp_path_factory, probe):
    root = tmp_path_factory.mktemp("recon-check")
    cache = tiny_cache(root, n=32)
    save_probe(probe, probe_path(cache, probe.config))  # as `measure` would have kept it
    kept = check_keeps_objects(cache, lambda x: x.clone(), "--encode good.pt", device="cpu")
    assert kept["probe"]["kept"]["colour"] == 1.0 and kept["n"] == 32

    vae = run_vae(VaeConfig(cache=cache, out=root / "runs", size="tiny", steps=1, batch_size=4, eval_n=2))
    encode = ["vae", "--cache", str(cache), "--encode", str(vae.checkpoint), "--device", "cpu"]
    refused = CliRunner().invoke(app, encode)  # one step: its reconstructions hold no object
    lines = [x for x in refused.output.splitlines() if x.strip() and not x.startswith("warning")]
    assert refused.exit_code == 2 and len(lines) == 1, refused.output
    assert "lose the objects (the probe reads colour" in lines[0] and "--accept-lossy" in lines[0]
    assert not (cache / "latents").exists()
    assert CliRunner().invoke(app, [*encode, "--accept-lossy"]).exit_code == 0
    assert (cache / "latents").is_dir()
    refused = r"--encode bad.pt: .* lose the objects .*colour 0\.\d\d of .*--accept-lossy"
    with pytest.raises(ConfigError, match=refused):
        check_keeps_objects(cache, torch.zeros_like, "--encode bad.pt", device="cpu")


def test_a_cache_not_of_the_world_is_not_judged(image_folder, tmp_path, one_torch_thread):
    cache = tmp_path / "cache"
    config = EmbedConfig(
        inputs=(str(image_folder),), cache=cache, clip_model=TINY_CLIP, clip_pretrained="", image_size=32
    )
    run_embed(EmbedConfig(**{**config.__dict__, "workers": 0}))
    assert not may_be_world(cache)
    assert check_keeps_objects(cache, torch.zeros_like, "--encode x.pt", device="cpu") is None
    images = torch.zeros(2, 3, 32, 32)
    report = measure(cache, images, images, ["a", "b"], device="cpu")
    assert report["probe"] is None and report["probe_note"] == NOT_WORLD
