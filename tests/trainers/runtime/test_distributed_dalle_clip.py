"""`trainers dalle` and `trainers clip` under torchrun (trainers/runtime/distributed.py), on the CPU with
gloo: 2 processes take the same steps as 1 at the same global batch; the CLIP gradient (InfoNCE over the
gathered batch, rn32's BatchNorm over it, the learnable logit scale, the sparse token embedding) is the
one-process
one before Adam hides its scale; a global batch the ranks cannot share as whole contrast groups is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from factories import tiny_cache
from torchrun import ENV, TORCHRUN, assert_close, assert_same_metrics, checkpoint, lrs_of, metrics, trainers


@pytest.fixture(scope="module")
def dalle_world(tmp_path_factory):
    """(cache, dvae run dir): the tiny cache and a tiny dVAE trained 2 steps as one process."""
    root = tmp_path_factory.mktemp("ddp-dalle")
    cache = tiny_cache(root)
    dvae = ["dvae", "--cache", cache, "--out", root / "dvae", "--size", "tiny", "--steps", 2]
    trainers([*dvae, "--batch-size", 4, "--eval-n", 2, "--device", "cpu"])
    (dvae_run,) = (root / "dvae").iterdir()
    return cache, dvae_run


def dalle_args(dalle_world, out) -> list:
    # half the conditions dropped (the draw must be the global batch's), dropout's masks (embeddings,
    # attention weights, residuals) drawn for the global batch too, and a clip that always bites (by the
    # global gradient norm: clipping each rank's own would scale the ranks' gradients differently)
    cache, dvae = dalle_world
    args = ["dalle", "--cache", cache, "--dvae", dvae, "--size", "tiny", "--steps", 3, "--batch-size", 8]
    args += ["--condition", "perturb", "--cond-drop", 0.5, "--dropout", 0.2, "--device", "cpu"]
    return args + ["--sample-every", 0, "--log-every", 1, "--out", out]


@pytest.fixture(scope="module")
def one_process_dalle(dalle_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("dalle-one")
    trainers(dalle_args(dalle_world, out))
    return out


def test_two_dalle_processes_take_the_one_process_steps(dalle_world, one_process_dalle, tmp_path):
    trainers(dalle_args(dalle_world, tmp_path), nproc=2)
    one, two = checkpoint(one_process_dalle), checkpoint(tmp_path)  # one run dir each: rank 0's
    assert one["step"] == two["step"] == 3 and one["arch"]["dropout"] == 0.2
    assert_close(one["model"], two["model"], lrs_of(one["config"]))
    assert_close(one["ema"], two["ema"], lrs_of(one["config"]))
    assert torch.equal(one["drop_rng"], two["drop_rng"])  # the generator moved as in one process
    last = metrics(tmp_path)[-1]
    assert last["grad_norm"] > one["config"]["grad_clip"] == 1.0  # the clip bit
    assert_same_metrics(metrics(one_process_dalle), metrics(tmp_path))  # every step's, global
    diff = max(float((one["model"][k] - two["model"][k]).abs().max()) for k in one["model"])
    print(f"dalle 1 vs 2 processes: max parameter difference {diff:.2e}")


def test_the_parity_checks_fail_on_per_rank_dropout_masks(dalle_world, one_process_dalle, tmp_path):
    """The bug the dropout function exists to avoid (masks drawn at each rank's shape, as nn.Dropout
    draws them): the weights check must catch it, not just rounding."""
    trainers(dalle_args(dalle_world, tmp_path), nproc=2, mutation="per_rank_dropout")
    one, two = checkpoint(one_process_dalle), checkpoint(tmp_path)
    with pytest.raises(AssertionError, match="differs by"):
        assert_close(one["model"], two["model"], lrs_of(one["config"]))


def test_the_parity_checks_fail_on_losses_logged_per_rank(dalle_world, one_process_dalle, tmp_path):
    """Rank 0 logging its own half batch's losses (World.mean_scalars not averaging): the weights are
    right, so it is the metrics check that must catch it."""
    trainers(dalle_args(dalle_world, tmp_path), nproc=2, mutation="local_losses")
    one, two = checkpoint(one_process_dalle), checkpoint(tmp_path)
    assert_close(one["model"], two["model"], lrs_of(one["config"]))
    with pytest.raises(AssertionError, match="loss"):
        assert_same_metrics(metrics(one_process_dalle), metrics(tmp_path))


def clip_args(out, size: str, batch_size: int = 12) -> list:
    args = ["clip", "--out", out, "--size", size, "--steps", 3, "--batch-size", batch_size]
    # --lr 5e-4: Adam turns the rounding of gradients near 0 into weight differences in proportion to the
    # rate (rn32: 3e-5 here, 9e-5 at the default 2e-3), while a wrong gradient moves weights by ~lr
    args += ["--lr", 5e-4, "--pretrain-n", 24, "--contrast-group", 3]
    return args + ["--eval-n", 0, "--device", "cpu"]


def clip_weights(out) -> dict:
    return torch.load(out / "clip.pt", map_location="cpu", weights_only=True)["state_dict"]


# rn32: BatchNorm over the global batch, with the learnt temperature (its gradient divided per rank); tiny:
# the default fixed temperature, whose logit scale has no gradient (a scale of 50 rather than 14 also
# magnifies rn32's rounding differences past the tolerance)
@pytest.mark.parametrize("size, temperature", [("tiny", []), ("rn32", ["--temperature", "learnt"])])
def test_two_clip_processes_take_the_one_process_steps(tmp_path, size, temperature):
    trainers(clip_args(tmp_path / "one", size) + temperature)
    trainers(clip_args(tmp_path / "two", size) + temperature, nproc=2)
    one, two = clip_weights(tmp_path / "one"), clip_weights(tmp_path / "two")
    assert_close(one, two, lrs_of(json.loads((tmp_path / "one" / "config.json").read_text())["config"]))
    assert (tmp_path / "two" / "clip_eval.json").is_file()  # written by rank 0
    diff = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    print(f"clip {size} 1 vs 2 processes: max parameter difference {diff:.2e}")


# One step's gradients of `trainers clip` (rn32: BatchNorm and the sparse token embedding) at a fixed
# global batch, averaged over the ranks as the trainer does; rank 0 saves them, dense.
GRADIENTS = """
import sys, torch
from open_clip.loss import ClipLoss
from trainers.clip.train import build_clip, clip_loss, global_batch_norms, make_optimizers
from trainers.clip.config import ClipTrainConfig
from trainers.runtime.distributed import close_world, init_world

world, _ = init_world("cpu")
model, tokenizer, *_ = build_clip("rn32", 0, "cpu")
model.train()
global_batch_norms(model, world)
world.broadcast([model])
make_optimizers(model, ClipTrainConfig())  # the token embedding's gradient is sparse
g = torch.Generator().manual_seed(1)
images = world.part(torch.randn(8, 3, 32, 32, generator=g))
words = ["red", "blue", "green", "circle", "square", "small", "large", "left", "right", "a", "the"]
captions = [" ".join(words[int(i)] for i in torch.randint(len(words), (5,), generator=g)) for _ in range(8)]
text = world.part(tokenizer(captions))
img, txt = model.encode_image(images, normalize=True), model.encode_text(text, normalize=True)
world.coupled(clip_loss(ClipLoss(), img, txt, model.logit_scale, world)).backward()
world.average_gradients(model.parameters())
grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in model.named_parameters()}
grads["token_rows"] = model.token_embedding.weight.grad.coalesce().indices()[0]
if world.main:
    torch.save(grads, sys.argv[1])
close_world(world)
"""


def test_the_clip_gradient_of_two_processes_is_the_one_process_one(tmp_path):
    script = tmp_path / "gradients.py"
    script.write_text(GRADIENTS)
    run = [sys.executable, script, tmp_path / "one.pt"]
    for launch in (run, [*TORCHRUN, "--nproc_per_node", 2, script, tmp_path / "two.pt"]):
        proc = subprocess.run(list(map(str, launch)), capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert torch.equal(one.pop("token_rows"), two.pop("token_rows"))  # SparseAdam updates the same rows
    assert one.keys() == two.keys() and float(one["logit_scale"].abs()) > 0
    for name in one:  # rounding: ~3e-6 of a gradient's size (1e-2 for those near 0, as a key bias's)
        scale = float(one[name].abs().max())
        assert float((one[name] - two[name]).abs().max()) <= 1e-5 * max(scale, 1e-2), name


def test_a_batch_the_ranks_cannot_share_as_whole_groups_is_one_line(tmp_path):
    launch = [*TORCHRUN, "--nproc_per_node", "2", "-m", "trainers"]
    proc = subprocess.run(
        [*launch, *map(str, clip_args(tmp_path / "run", "tiny", batch_size=9))],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode != 0
    message = "--batch-size 9 is 3 contrast group(s) of 3 pairs, which 2 processes cannot share as whole"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all(message in e and "use --batch-size 6" in e for e in errors), proc.stderr
    assert "clip_train.py" not in proc.stderr  # each rank's one line, not its traceback (torchrun has one)
    assert not (tmp_path / "run").exists()  # refused before anything was rendered or written
