"""`trainers.families.dalle.model` and `trainers.families.dalle.sample`: the KV cache gives the full forward's
logits, sampling is the same token for token with and without it, guidance 0 / 1 are the unconditional /
conditional models exactly, top-k 1 is greedy, condition dropout, the architecture round trip, argument
errors, and a tiny
model that learns tokens which are a function of the condition."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from trainers.families.dalle.model import DALLE_SIZES, DalleTransformer, build_dalle
from trainers.families.dalle.sample import check_sampling, filter_logits, gumbel_pick, sample_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, K, GRID = 16, 16, (2, 3)  # a non-square grid checks the row / column split


def tiny_model(seed: int = 0, **kw) -> DalleTransformer:
    torch.manual_seed(seed)
    return DalleTransformer("tiny", vocab=K, grid=GRID, cond_dim=D, **kw)


def randomize(model: DalleTransformer, seed: int = 0) -> DalleTransformer:
    """Weights with unit-scale activations, so logits spread over a few nats and depend on the condition
    (the GPT-2 init gives near-uniform logits, under which most sampling tests could not fail)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise / math.sqrt(p.shape[-1]))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.3 * noise)
    return model.eval()


def conds(n: int, seed: int = 1) -> torch.Tensor:
    return F.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=1)


def random_tokens(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(K, (n, GRID[0] * GRID[1]), generator=torch.Generator().manual_seed(seed))


def reference_sample(model, cond, *, seed, guidance=1.0, temperature=1.0, top_k=None, top_p=None):
    """The sampler written out plainly: two full forwards per token, mixed by the guidance formula."""
    g = torch.Generator().manual_seed(seed)
    null = torch.ones(len(cond), dtype=torch.bool)
    tokens = torch.zeros(len(cond), 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(model.seq_len):
            l_cond = model.predict(cond, tokens)[:, -1]
            l_uncond = model.predict(cond, tokens, null)[:, -1]
            logits = {0.0: l_uncond, 1.0: l_cond}.get(guidance, l_uncond + guidance * (l_cond - l_uncond))
            pick = gumbel_pick(filter_logits(logits, temperature, top_k, top_p), g)
            tokens = torch.cat([tokens, pick[:, None]], dim=1)
    return tokens


# --- model ------------------------------------------------------------------------------------------------


def test_registry_shapes_and_causality():
    assert {"tiny", "small", "base"} <= set(DALLE_SIZES)
    model = randomize(tiny_model())
    cond, tokens = conds(3), random_tokens(3)
    logits = model(cond, tokens)
    assert logits.shape == (3, 6, K) and logits.dtype == torch.float32
    changed = tokens.clone()
    changed[:, 3] = (changed[:, 3] + 1) % K
    other = model(cond, changed)
    assert torch.equal(logits[:, :4], other[:, :4])  # logit i sees tokens < i only
    assert not torch.allclose(logits[:, 4:], other[:, 4:])
    assert not torch.allclose(logits, model(conds(3, seed=9), tokens))  # and the condition
    with pytest.raises(ConfigError, match="--size huge"):
        DalleTransformer("huge", vocab=K, grid=GRID, cond_dim=D)


def test_kv_cache_logits_equal_the_full_forward():
    model = randomize(tiny_model())
    cond, tokens = conds(4), random_tokens(4)
    drop = torch.tensor([False, True, False, True])
    full = model(cond, tokens, drop)  # [N, L, K]
    with torch.no_grad():
        first, cache = model.prefill(cond, drop)
        steps = [first]
        for i in range(model.seq_len - 1):
            logits, cache = model.step(tokens[:, i], i, cache)
            steps.append(logits)
    incremental = torch.stack(steps, dim=1)
    assert torch.allclose(incremental, full, atol=1e-5, rtol=1e-5)
    assert cache.length == model.n_prefix + model.seq_len  # every slot used once
    with pytest.raises(ValueError, match="step 0 needs"):
        model.step(tokens[:, 0], 0, cache)  # the cache is past index 0


# --- sampling ---------------------------------------------------------------------------------------------

SETTINGS = [
    dict(temperature=1.0, top_k=5, top_p=0.9, guidance=1.0),
    dict(temperature=0.8, top_k=None, top_p=0.7, guidance=3.0),
    dict(temperature=1.3, top_k=8, top_p=None, guidance=0.0),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["topk-topp", "guided", "unconditional"])
def test_sampling_with_and_without_the_cache_is_identical(settings):
    model = randomize(tiny_model())
    cond = conds(5)
    cached = sample_tokens(model, cond, seed=7, use_kv_cache=True, **settings)
    plain = sample_tokens(model, cond, seed=7, use_kv_cache=False, **settings)
    assert cached.shape == (5, 6) and cached.dtype == torch.long
    assert int(cached.min()) >= 0 and int(cached.max()) < K
    assert torch.equal(cached, plain)
    assert torch.equal(cached, reference_sample(model, cond, seed=7, **settings))
    assert not torch.equal(cached, sample_tokens(model, cond, seed=8, **settings))  # the seed matters


def test_guidance_zero_is_unconditional_and_one_is_conditional():
    model = randomize(tiny_model())
    cond = conds(6)
    null = model.null_cond.detach().expand(6, D)
    g0 = sample_tokens(model, cond, seed=3, guidance=0.0)
    g1 = sample_tokens(model, cond, seed=3, guidance=1.0)
    assert torch.equal(g0, sample_tokens(model, null, seed=3, guidance=1.0))  # the null-condition model
    assert torch.equal(g0, sample_tokens(model, conds(6, seed=5), seed=3, guidance=0.0))  # cond ignored
    assert not torch.equal(g0, g1)
    assert torch.equal(g1, reference_sample(model, cond, seed=3, guidance=1.0))
    assert not torch.equal(g1, sample_tokens(model, cond, seed=3, guidance=4.0))


def test_top_k_one_is_greedy():
    model = randomize(tiny_model())
    cond = conds(5)
    tokens = torch.zeros(5, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(model.seq_len):
            tokens = torch.cat([tokens, model.predict(cond, tokens)[:, -1].argmax(1, keepdim=True)], dim=1)
    for seed in (0, 1):
        assert torch.equal(sample_tokens(model, cond, seed=seed, top_k=1, temperature=0.5), tokens)


def test_top_k_and_top_p_filters():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.4)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_p=0.75)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.85)) == [True, True, False, True]
    assert kept(filter_logits(logits, top_p=1.0)) == [True, True, True, True]
    assert kept(filter_logits(logits, top_k=3, top_p=0.99)) == [True, True, False, True]
    assert torch.allclose(filter_logits(logits, temperature=2.0), logits / 2)


@pytest.mark.parametrize(
    "kw, flag",
    [
        (dict(top_p=0.0), "--top-p"),
        (dict(top_p=1.5), "--top-p"),
        (dict(top_k=0), "--top-k"),
        (dict(top_k=2.5), "--top-k"),
        (dict(temperature=0.0), "--temperature"),
        (dict(temperature=-1.0), "--temperature"),
        (dict(guidance=-1.0), "--guidance"),
        (dict(guidance=float("nan")), "--guidance"),
    ],
)
def test_bad_sampling_arguments_raise_config_errors(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        check_sampling(**kw)
    with pytest.raises(ConfigError, match=flag):
        sample_tokens(tiny_model(), conds(1), **kw)


# --- training -------------------------------------------------------------------------------------------


def test_condition_dropout():
    model = randomize(tiny_model())
    cond_a, cond_b, tokens = conds(8, seed=1), conds(8, seed=2), random_tokens(8)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(model.loss(cond_a, tokens, 1.0, g()), model.loss(cond_b, tokens, 1.0, g()))
    assert not torch.allclose(model.loss(cond_a, tokens, 0.0, g()), model.loss(cond_b, tokens, 0.0, g()))
    drop = torch.rand(8, generator=g()) < 0.5  # the draw `loss` makes from the generator
    assert 0 < int(drop.sum()) < 8
    expected = F.cross_entropy(model(cond_a, tokens, drop).reshape(-1, K), tokens.reshape(-1))
    assert torch.allclose(model.loss(cond_a, tokens, 0.5, g()), expected)


def test_architecture_round_trip():
    model = randomize(tiny_model(n_prefix=3))
    arch = json.loads(json.dumps(model.architecture()))  # as a checkpoint's JSON config holds it
    assert arch["size"] == "tiny" and (arch["vocab"], arch["grid_h"], arch["grid_w"]) == (K, *GRID)
    rebuilt = build_dalle(arch)
    rebuilt.load_state_dict(model.state_dict())  # strict: the same parameter names and shapes
    assert rebuilt.architecture() == model.architecture()
    cond, tokens = conds(2), random_tokens(2)
    assert torch.equal(rebuilt.eval()(cond, tokens), model(cond, tokens))
    groups = model.param_groups(0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_bf16_autocast_runs():
    model = randomize(tiny_model())
    cond, tokens = conds(3), random_tokens(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(cond, tokens, 0.2, torch.Generator().manual_seed(0))
        _, cache = model.prefill(cond)
        sampled = sample_tokens(model, cond, seed=0, top_k=4, top_p=0.9, guidance=2.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert cache.keys[0].dtype == torch.bfloat16
    assert sampled.shape == (3, 6) and int(sampled.max()) < K


def test_tiny_model_learns_tokens_from_the_condition():
    """4 classes, each a direction in condition space with its own token grid: the loss falls from
    about log K, greedy and guided samples reproduce the class's grid far above chance (1 / K), and
    unconditional samples are whole grids of some class."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, D, generator=g), dim=1)  # [C, D]
    grids = torch.randint(K, (4, GRID[0] * GRID[1]), generator=g)  # [C, L]
    model = tiny_model(seed=0)
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    losses = []
    for _ in range(150):
        labels = torch.randint(4, (32,), generator=g)
        cond = F.normalize(centres[labels] + 0.05 * torch.randn(32, D, generator=g), dim=1)
        loss = model.loss(cond, grids[labels], cond_drop=0.1, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(sum(losses[:5]) / 5 - math.log(K)) < 0.5
    assert sum(losses[-10:]) / 10 < 0.25 * sum(losses[:10]) / 10
    model.eval()
    greedy = sample_tokens(model, centres, top_k=1)
    accuracy = float((greedy == grids).float().mean())
    assert accuracy > 0.75, accuracy
    sampled = sample_tokens(model, centres, seed=1, guidance=2.0)
    assert float((sampled == grids).float().mean()) > 0.5
    unconditional = sample_tokens(model, centres, seed=1, guidance=0.0)  # the null condition learned
    assert all(bool((row == grids).all(1).any()) for row in unconditional)  # the mixture of the grids
