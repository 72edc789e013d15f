"""Language-free DALL-E (Ramesh et al. 2021; CLIP-GEN, Wang et al. 2022): a decoder-only transformer over
`[condition prefix; image tokens]`, nanoGPT-shaped.

Sequence layout for a condition h [N, D] and a token grid of h x w = L tokens (vocabulary K):

    slot:   p_0 .. p_{P-1} | BOS   t_0   ...  t_{L-2}
    target:                 | t_0   t_1   ...  t_{L-1}

The P prefix embeddings are one linear projection of the condition (plus prefix position embeddings).
Image slot i holds the token before target i (BOS for i = 0) plus the row and column embeddings of
target i, so every slot knows which grid cell it predicts. Pre-LN blocks, causal attention through
`F.scaled_dot_product_attention` (is_causal over the whole sequence: the prefix precedes the tokens
and a prefix slot attending only to earlier prefix slots loses nothing), final LN, head to K logits.

Dropout (`dropout`, training only) on the embeddings, the attention weights and both residual branches
of every block; its masks come from the global RNG at the global batch's shape, so a torchrun run draws
the one-process masks (trainers.runtime.distributed).

Classifier-free guidance: training replaces a sample's condition, with probability `cond_drop`, by a
learned null condition `null_cond` [D] (in the condition space, as `trainers.families.ldm.model`); `drop_mask`
[N] bool does the same at inference.

Incremental decoding: `prefill(cond)` runs the prefix and BOS and returns the logits of token 0 and a
`KVCache` (keys and values preallocated for the whole sequence); `step(token, index, cache)` feeds image
token `index` and returns the logits of token `index + 1`, one length-1 forward. Same logits as
`forward` to float tolerance (tests/trainers/families/dalle/test_dalle_model.py). Under bf16 autocast the
cache takes the dtype of the keys it first receives: run `prefill` and `step` under the same autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import ConfigError
from trainers.runtime.distributed import SINGLE, World


@dataclass(frozen=True)
class DalleSize:
    depth: int  # transformer blocks
    width: int  # token width
    heads: int  # attention heads


DALLE_SIZES: dict[str, DalleSize] = {
    "tiny": DalleSize(2, 32, 2),  # tests
    "mini": DalleSize(4, 128, 4),  # ~0.8M: the cpu preset (82 ms per step of batch 32, 8 x 8 tokens, 2 cores)
    "small": DalleSize(8, 512, 8),  # ~25M parameters in the blocks
    "base": DalleSize(12, 768, 12),  # GPT-2 small shape, ~85M parameters in the blocks
}


@dataclass
class KVCache:
    """Per-layer keys and values [N, H, T_max, W/H], filled up to `length` sequence slots."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    max_len: int  # n_prefix + h * w: every slot the sequence can have
    length: int = 0  # slots filled (prefix + image)
    _pending: int = field(default=0, repr=False)  # slots being written by the forward in progress

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [N, H, t, W/H] after the filled slots; -> keys and values of every slot so far."""
        start, t = self.length, k.shape[2]
        if start + t > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} slots; cannot add {t} after {start}")
        if self.keys[layer] is None:  # allocated on first use: the dtype follows autocast
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start : start + t] = k
        values[:, :, start : start + t] = v
        self._pending = t
        return keys[:, :, : start + t], values[:, :, : start + t]

    def advance(self) -> None:
        self.length += self._pending
        self._pending = 0


def dropout(x: torch.Tensor, p: float, world: World = SINGLE) -> torch.Tensor:
    """Inverted dropout: zero with probability p, the rest scaled by 1 / (1 - p). The mask is drawn from
    the global RNG at the global batch's shape [N * ranks, ...] and this rank keeps its rows, as every
    random draw of a step (trainers.runtime.distributed): one process and N draw the same masks, where
    nn.Dropout would draw at this rank's shape. The price: each rank draws N times its own mask."""
    if p == 0:
        return x
    keep = world.part(torch.rand((x.shape[0] * world.size, *x.shape[1:]), device=x.device)) >= p
    return x * keep * (1.0 / (1.0 - p))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, p: float = 0.0, world: World = SINGLE
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [N, H, T, d] (keys [N, H, S, d]); with `p`, dropout on the weights
    (`dropout`: the global batch's masks). Without dropout, SDPA's fused kernel; with it, the explicit
    product, since SDPA draws its own mask at this rank's shape: --dropout costs that speed."""
    if p == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # [N, H, T, S]
    if causal:  # top-left aligned, as SDPA's is_causal
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()  # [T, S]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return dropout(scores.softmax(dim=-1), p, world) @ v


class DalleBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x)); dropout (training only) on the
    attention weights and on both residual branches."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width)
        )

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, world: World = SINGLE
    ) -> torch.Tensor:
        b, n, w = x.shape
        qkv = self.qkv(self.norm1(x))  # [N, T, 3W]
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [N, H, T, W/H]
        if cache is not None:
            if cache.length and n > 1:  # SDPA's is_causal is top-left aligned: only square chunks
                raise ValueError("a cached forward after the first takes one slot at a time")
            k, v = cache.extend(layer, k, v)  # [N, H, S, W/H], S = slots so far
        p = self.dropout if self.training else 0.0
        attn = attention(q, k, v, n > 1, p, world)  # [N, H, T, W/H]
        x = x + dropout(self.proj(attn.transpose(1, 2).reshape(b, n, w)), p, world)
        return x + dropout(self.mlp(self.norm2(x)), p, world)


class DalleTransformer(nn.Module):
    """logits [N, h*w, K] = DalleTransformer(cond [N, D], tokens [N, h*w] long, drop_mask [N] bool)."""

    def __init__(
        self,
        size: str | DalleSize,
        *,
        vocab: int,
        grid: tuple[int, int],
        cond_dim: int,
        n_prefix: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        if isinstance(size, str):
            if size not in DALLE_SIZES:
                raise ConfigError(f"--size {size}: choose one of {', '.join(DALLE_SIZES)}")
            self.size_name, spec = size, DALLE_SIZES[size]
        else:
            self.size_name, spec = "custom", size
        if spec.width % spec.heads:
            raise ConfigError(f"width {spec.width} is not a multiple of heads {spec.heads}")
        gh, gw = (int(s) for s in grid)
        if vocab < 2 or gh < 1 or gw < 1 or cond_dim < 1 or n_prefix < 1:
            raise ConfigError(
                f"dalle: need vocab >= 2, a grid of at least 1x1, cond_dim >= 1 and n_prefix >= 1 "
                f"(got vocab {vocab}, grid {gh}x{gw}, cond_dim {cond_dim}, n_prefix {n_prefix})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"--dropout {dropout}: must be in [0, 1)")
        self.spec, self.vocab, self.grid = spec, int(vocab), (gh, gw)
        self.cond_dim, self.n_prefix, self.dropout = int(cond_dim), int(n_prefix), float(dropout)
        self.seq_len = gh * gw  # image tokens
        w = spec.width
        self.cond_proj = nn.Linear(cond_dim, n_prefix * w)
        # learned null condition (classifier-free guidance), about the norm of an L2-normalised feature
        self.null_cond = nn.Parameter(torch.randn(cond_dim) / math.sqrt(cond_dim))
        self.prefix_pos = nn.Parameter(torch.zeros(n_prefix, w))
        self.tok_emb = nn.Embedding(vocab + 1, w)  # index `vocab` is BOS
        self.row_emb, self.col_emb = nn.Embedding(gh, w), nn.Embedding(gw, w)
        self.blocks = nn.ModuleList(DalleBlock(w, spec.heads, dropout) for _ in range(spec.depth))
        self.final_norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, vocab, bias=False)
        self.register_buffer("slot_rows", torch.arange(self.seq_len) // gw, persistent=False)  # [L]
        self.register_buffer("slot_cols", torch.arange(self.seq_len) % gw, persistent=False)  # [L]
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2: N(0, 0.02), residual projections scaled by 1 / sqrt(2 depth)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.prefix_pos, std=0.02)
        for block in self.blocks:
            for m in (block.proj, block.mlp[-1]):
                nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * self.spec.depth))

    def architecture(self) -> dict[str, Any]:
        """Everything `build_dalle` needs to rebuild this model (JSON-serialisable)."""
        return {
            "kind": "dalle",
            "size": self.size_name,
            "depth": self.spec.depth,
            "width": self.spec.width,
            "heads": self.spec.heads,
            "vocab": self.vocab,
            "grid_h": self.grid[0],
            "grid_w": self.grid[1],
            "cond_dim": self.cond_dim,
            "n_prefix": self.n_prefix,
            "dropout": self.dropout,
        }

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups (nanoGPT): decay matrices and embeddings, not biases, norms or the null condition."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    # --- embedding -----------------------------------------------------------------------------------------

    def _prefix(self, cond: torch.Tensor, drop_mask: torch.Tensor | None) -> torch.Tensor:
        n, d = cond.shape
        if d != self.cond_dim:
            raise ValueError(f"cond must be [N, {self.cond_dim}], got {tuple(cond.shape)}")
        if drop_mask is not None:
            cond = torch.where(drop_mask.view(n, 1), self.null_cond.to(cond.dtype)[None], cond)  # [N, D]
        prefix = self.cond_proj(cond).view(n, self.n_prefix, -1)  # [N, P, W]
        return prefix + self.prefix_pos

    def _image_slots(self, inputs: torch.Tensor, first: int) -> torch.Tensor:
        """inputs [N, t] (BOS or tokens) at image slots first .. first+t-1 -> embeddings [N, t, W]."""
        t = inputs.shape[1]
        rows, cols = self.slot_rows[first : first + t], self.slot_cols[first : first + t]  # [t]
        return self.tok_emb(inputs) + self.row_emb(rows) + self.col_emb(cols)

    def _run(self, x: torch.Tensor, cache: KVCache | None, world: World = SINGLE) -> torch.Tensor:
        x = dropout(x, self.dropout if self.training else 0.0, world)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, world)
        if cache is not None:
            cache.advance()
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_norm(x))  # [N, t, K]

    # --- full forward --------------------------------------------------------------------------------------

    def predict(
        self,
        cond: torch.Tensor,
        tokens: torch.Tensor,
        drop_mask: torch.Tensor | None = None,
        world: World = SINGLE,
    ) -> torch.Tensor:
        """Logits [N, t+1, K] of image tokens 0..t given the first t tokens [N, t] (0 <= t < h*w). `world`:
        the torchrun ranks whose rows make the global batch, for the dropout masks (training only)."""
        n, t = tokens.shape
        if t >= self.seq_len:
            raise ValueError(f"predict takes at most {self.seq_len - 1} tokens, got {t}")
        bos = torch.full((n, 1), self.vocab, dtype=torch.long, device=tokens.device)
        inputs = torch.cat([bos, tokens.long()], dim=1)  # [N, t+1]
        x = torch.cat([self._prefix(cond, drop_mask), self._image_slots(inputs, 0)], dim=1)  # [N, P+t+1, W]
        return self._logits(self._run(x, None, world)[:, self.n_prefix :])

    def forward(
        self, cond: torch.Tensor, tokens: torch.Tensor, drop_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher forcing: tokens [N, h*w] -> logits [N, h*w, K], logit i seeing tokens < i."""
        return self.predict(cond, self._teacher_inputs(tokens), drop_mask)

    def _teacher_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """A whole token grid [N, h*w] -> the tokens each logit sees, [N, h*w - 1]."""
        if tokens.shape[1] != self.seq_len:
            raise ValueError(f"tokens must be [N, {self.seq_len}], got {tuple(tokens.shape)}")
        return tokens[:, :-1]

    def loss(
        self,
        cond: torch.Tensor,
        tokens: torch.Tensor,
        cond_drop: float = 0.0,
        generator: torch.Generator | None = None,
        world: World = SINGLE,
    ) -> torch.Tensor:
        """Mean cross-entropy over image tokens; each sample's condition is replaced by the null
        condition with probability `cond_drop`, the draw coming from `generator` (on its own device)
        or, without one, from the global RNG of cond's device. Under torchrun (`world`,
        trainers.runtime.distributed) cond and tokens are this rank's rows: the draw is made for the global
        batch and this rank's slice kept, so the generator moves as in one process; so are the
        --dropout masks (`dropout`)."""
        n = cond.shape[0]
        drop_mask = None
        if cond_drop > 0:
            device = generator.device if generator is not None else cond.device
            draw = world.part(torch.rand(n * world.size, generator=generator, device=device))  # [N]
            drop_mask = (draw < cond_drop).to(cond.device)
        logits = self.predict(cond, self._teacher_inputs(tokens), drop_mask, world)  # [N, L, K], as forward
        return F.cross_entropy(logits.float().reshape(-1, self.vocab), tokens.reshape(-1).long())

    # --- incremental decoding ------------------------------------------------------------------------------

    def new_cache(self) -> KVCache:
        depth = len(self.blocks)
        return KVCache([None] * depth, [None] * depth, max_len=self.n_prefix + self.seq_len)

    def prefill(
        self, cond: torch.Tensor, drop_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """Run the prefix and BOS: -> (logits of image token 0 [N, K], a cache for `step`)."""
        n = cond.shape[0]
        cache = self.new_cache()
        bos = torch.full((n, 1), self.vocab, dtype=torch.long, device=cond.device)
        x = torch.cat([self._prefix(cond, drop_mask), self._image_slots(bos, 0)], dim=1)  # [N, P+1, W]
        return self._logits(self._run(x, cache)[:, -1]), cache

    def step(self, token: torch.Tensor, index: int, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Feed image token `index` [N] (after `prefill` and `step` for 0..index-1): -> (logits of
        token index+1 [N, K], the cache, updated in place)."""
        if not 0 <= index < self.seq_len - 1:
            raise ValueError(f"step index must be in [0, {self.seq_len - 2}], got {index}")
        if cache.length != self.n_prefix + 1 + index:
            raise ValueError(
                f"the cache holds {cache.length} slots; step {index} needs {self.n_prefix + 1 + index}"
            )
        x = self._image_slots(token.long().view(-1, 1), index + 1)  # [N, 1, W]
        return self._logits(self._run(x, cache)[:, -1]), cache


def build_dalle(arch: dict[str, Any]) -> DalleTransformer:
    """The model a checkpoint's `architecture()` describes (fresh weights; load the state dict next)."""
    if arch.get("kind", "dalle") != "dalle":
        raise ConfigError(f"not a dalle architecture (kind {arch.get('kind')!r})")
    model = DalleTransformer(
        DalleSize(int(arch["depth"]), int(arch["width"]), int(arch["heads"])),
        vocab=int(arch["vocab"]),
        grid=(int(arch["grid_h"]), int(arch["grid_w"])),
        cond_dim=int(arch["cond_dim"]),
        n_prefix=int(arch["n_prefix"]),
        dropout=float(arch.get("dropout", 0.0)),
    )
    model.size_name = str(arch.get("size", "custom"))
    return model
