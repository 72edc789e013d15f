"""`trainers.eval.rerank`: it keeps the candidate CLIP scores highest (against encoding every candidate here),
n = 1 is plain generation with no CLIP work, a seed reproduces it; `trainers sample --rerank` and
`trainers eval --rerank` on tiny GAN and LDM checkpoints, and their one-line refusals."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import TINY_CLIP, tiny_cache
from PIL import Image
from typer.testing import CliRunner

from cli.trainers import app
from core.clip import encode_images, encode_texts, load_clip
from trainers.eval.rerank import candidate_seed, rerank
from trainers.families.gan.config import GanConfig
from trainers.families.gan.train import DataSource, run_gan
from trainers.families.load import load_generator
from trainers.probe.config import ProbeConfig
from trainers.probe.probe import save_probe, train_probe

H_DIM = 64  # lafite-tiny
RES = 32
PROMPTS = ("a red circle", "a small blue square on the left", "a green star at the top")
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def clip():
    return load_clip(TINY_CLIP, None, "cpu")


@pytest.fixture(scope="module")
def text(clip):
    return encode_texts(clip, list(PROMPTS)).cpu()  # [3, 64] unit-norm


class Spy:
    """A seeded noise generator that records what it was asked and what it returned."""

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, cond, seed):
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (len(cond), 3, RES, RES), dtype=torch.uint8, generator=g)
        self.calls.append((seed, images))
        return images


def direct_best(candidates: list[torch.Tensor], clip, text: torch.Tensor):
    """Encode every candidate here and take, per row, the argmax of cos(image, text)."""
    cos = torch.stack([(encode_images(clip, c) * F.normalize(text, dim=1)).sum(1) for c in candidates], 1)
    chosen = cos.argmax(dim=1)  # [P]
    return torch.stack([candidates[j][i] for i, j in enumerate(chosen.tolist())]), chosen, cos


# ---------------------------------------------------------------------------------------------------------
# The function
# ---------------------------------------------------------------------------------------------------------


def test_rerank_keeps_the_candidate_clip_scores_highest(clip, text):
    cells = text.repeat_interleave(4, dim=0)  # [12, D]: 12 rows, 5 candidates each
    spy = Spy()
    best = rerank(spy, cells, clip, 5, seed=7)
    assert [seed for seed, _ in spy.calls] == [candidate_seed(7, j) for j in range(5)]
    assert spy.calls[0][0] == 7 and len({seed for seed, _ in spy.calls}) == 5  # candidate 0: the plain seed
    expected, chosen, cos = direct_best([images for _, images in spy.calls], clip, cells)
    assert torch.equal(best.images, expected)
    assert best.chosen.tolist() == chosen.tolist() and best.chosen.dtype == np.int64
    assert best.scores.shape == (12, 5) and np.allclose(best.scores, cos.numpy(), atol=1e-5)
    assert np.allclose(best.features, encode_images(clip, expected).numpy(), atol=1e-5)
    assert len(set(best.chosen.tolist())) > 1  # a real choice was made: not always the same candidate
    assert not torch.equal(best.images, spy.calls[0][1])  # and it differs from plain generation


def test_rerank_of_one_is_plain_generation_without_clip(text):
    spy = Spy()
    best = rerank(spy, text, object(), 1, seed=3)  # a bundle CLIP work would fail on
    assert len(spy.calls) == 1 and torch.equal(best.images, Spy()(text, 3))
    assert best.scores is None and best.features is None and best.chosen.tolist() == [0, 0, 0]


def test_rerank_is_reproducible_and_reuses_a_given_first_candidate(clip, text):
    a, b, c = (rerank(Spy(), text, clip, 3, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.images, b.images) and np.array_equal(a.scores, b.scores)
    assert not torch.equal(a.images, c.images)
    spy = Spy()
    given = rerank(spy, text, clip, 3, seed=5, first=Spy()(text, 5))
    assert [seed for seed, _ in spy.calls] == [candidate_seed(5, 1), candidate_seed(5, 2)]  # 0 not redrawn
    assert torch.equal(given.images, a.images) and np.array_equal(given.chosen, a.chosen)


def test_rerank_refuses_bad_inputs(clip, text):
    with pytest.raises(ValueError, match="n must be at least 1"):
        rerank(Spy(), text, clip, 0, seed=0)
    with pytest.raises(ValueError, match="expected uint8"):
        rerank(lambda cond, seed: torch.zeros(len(cond), 3, RES, RES), text, clip, 2, seed=0)


# ---------------------------------------------------------------------------------------------------------
# The commands, on tiny GAN and LDM checkpoints
# ---------------------------------------------------------------------------------------------------------


def _source() -> DataSource:
    def batches(start_step: int):
        for step in itertools.count(start_step):
            g = torch.Generator().manual_seed(step)
            yield {
                "image": torch.rand(4, 3, RES, RES, generator=g) * 2 - 1,
                "cond": F.normalize(torch.randn(4, H_DIM, generator=g), dim=1),
                "key": [str(i) for i in range(4)],
                "paired": torch.zeros(4, dtype=torch.bool),
            }

    return DataSource(batches, TINY_CLIP, "", H_DIM)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(cache, probe file): a 16-image cache and a quickly trained probe."""
    root = tmp_path_factory.mktemp("rerank-world")
    probe = train_probe(ProbeConfig(image_size=RES, n_train=200, epochs=1, n_eval=0, device="cpu"))
    return tiny_cache(root), save_probe(probe, root / "probe.pt")


@pytest.fixture(scope="module")
def gan(tmp_path_factory):
    config = GanConfig(
        out=tmp_path_factory.mktemp("gan-runs"),
        size="tiny",
        condition="perturb",
        steps=2,
        batch_size=4,
        device="cpu",
        prompts=("a red circle",),
        samples_per_prompt=1,
    )
    return run_gan(config, _source(), progress=False).checkpoint


@pytest.fixture(scope="module")
def ldm(world, tmp_path_factory):
    from trainers.autoencoders.vae.config import VaeConfig
    from trainers.autoencoders.vae.train import run_vae
    from trainers.families.ldm.config import LdmConfig
    from trainers.families.ldm.train import run_ldm

    cache, _ = world
    runs = tmp_path_factory.mktemp("ldm-runs")
    vae = run_vae(
        VaeConfig(cache=cache, out=runs, size="tiny", steps=1, batch_size=4, eval_n=2, device="cpu")
    )
    config = LdmConfig(
        cache=cache,
        vae=vae.checkpoint,
        out=runs,
        size="tiny",
        condition="perturb",
        steps=1,
        batch_size=4,
        device="cpu",
        checkpoint_every=0,
        sample_every=0,
        sample_steps=2,
        samples_per_prompt=1,
    )
    return run_ldm(config).checkpoint


def _sample_reranks_each_cell(checkpoint, clip, tmp_path, sampler: list[str], **load):
    out = tmp_path / "grid.png"
    args = ["sample", "--checkpoint", checkpoint, "--n", 2, "--rerank", 3, "--seed", 4, "--out", out]
    args += ["--device", "cpu", *sampler, *itertools.chain(*(("--prompt", p) for p in PROMPTS[:2]))]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "sample: 4 images at 32px" in result.output and "rerank: best of 3 by CLIP" in result.output
    with Image.open(out) as grid:
        assert grid.size[1] == 2 * RES  # one row per prompt, n cells each: not n * rerank
    singles = sorted((tmp_path / "grid").glob("*.png"))
    shown = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in singles])

    generate, _ = load_generator(checkpoint, device="cpu", **load)
    cells = encode_texts(clip, list(PROMPTS[:2])).cpu().repeat_interleave(2, dim=0)  # [4, D]
    candidates = [generate(cells, candidate_seed(4, j)) for j in range(3)]
    expected, chosen, _ = direct_best(candidates, clip, cells)
    assert torch.equal(shown, expected), chosen
    return chosen


def _eval_with_rerank(checkpoint, world, tmp_path, sampler: list[str]):
    cache, probe = world
    base = [
        "eval",
        "--checkpoint",
        checkpoint,
        "--cache",
        cache,
        "--n",
        8,
        "--batch-size",
        4,
        "--probe",
        probe,
    ]
    base += ["--device", "cpu", *sampler]
    written = {}
    for rerank_n in (1, 2):
        out = tmp_path / f"eval-{rerank_n}"
        result = runner.invoke(app, [str(a) for a in base + ["--out", out, "--rerank", rerank_n]])
        assert result.exit_code == 0, result.output
        written[rerank_n] = json.loads((out / "eval.json").read_text())
        assert ("best of 2 by CLIP" in result.output) == (rerank_n == 2), result.output
    plain, ranked = written[1], written[2]
    assert "rerank" not in plain and not (tmp_path / "eval-1" / "grid_rerank.png").exists()
    assert set(ranked) - set(plain) == {"rerank"}
    same = {"grid", "seconds"}  # paths and timings
    assert {k: v for k, v in ranked.items() if k not in same | {"rerank"}} == {
        k: v for k, v in plain.items() if k not in same
    }
    block = ranked["rerank"]
    assert block["candidates"] == 2 and block["fid"] == block["fid_clip"] and block["fid_inception"] is None
    assert (
        block["clip_score"] >= plain["clip_score"] and block["clip_score"] >= block["clip_score_candidates"]
    )
    assert 0.0 <= block["kept_first"] <= 1.0
    assert set(block["attribute_accuracy"]) >= {"shape", "colour", "size", "position", "all"}
    assert (tmp_path / "eval-2" / "grid_rerank.png").is_file() and block["grid"]["images"] == 8
    return ranked


def test_cli_sample_and_eval_rerank_a_gan(gan, world, clip, tmp_path):
    chosen = _sample_reranks_each_cell(gan, clip, tmp_path, [])
    assert chosen.tolist() != [0, 0, 0, 0]  # the grid differs from --rerank 1's somewhere
    _eval_with_rerank(gan, world, tmp_path, [])


def test_cli_sample_and_eval_rerank_an_ldm(ldm, world, clip, tmp_path):
    _sample_reranks_each_cell(ldm, clip, tmp_path, ["--steps", "2"], steps=2)
    _eval_with_rerank(ldm, world, tmp_path, ["--steps", "2"])


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_cli_rerank_zero_is_a_one_line_error(gan, world, tmp_path, command):
    cache, _ = world
    args = ["--checkpoint", str(gan), "--rerank", "0", "--device", "cpu"]
    if command == "sample":
        args += ["--prompt", "a red circle", "--out", str(tmp_path / "s.png")]
    else:
        args += ["--cache", str(cache), "--out", str(tmp_path / "e")]
    result = runner.invoke(app, [command, *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1 and "--rerank must be at least 1" in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "e").exists()
