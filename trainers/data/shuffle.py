"""Seeded permutations of [0, n) evaluated at any position in O(1) memory, and per-sample uniform draws:
what the loader's sample stream is made of (trainers/data/loader.py), so no array of the cache's size is held.

`permute(j, n, keys)` is a 4-round Feistel network on the smallest even power of two >= n, with cycle
walking (positions it maps at or past n are mapped again until they land inside), which makes it a
bijection of [0, n): every sample once per epoch, in an order fixed by the keys. The round function is
the splitmix64 finaliser of (right half XOR round key).
"""

from __future__ import annotations

import numpy as np

ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def keys(*seed: int) -> np.ndarray:
    """uint64 [ROUNDS] round keys of the stream named by `seed` (e.g. (seed, stream, epoch))."""
    return np.random.SeedSequence([int(s) for s in seed]).generate_state(ROUNDS, np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def permute(j: np.ndarray, n: int, round_keys: np.ndarray) -> np.ndarray:
    """perm[j] (int64) for positions j in [0, n) of the permutation `round_keys` names."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for key in round_keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << shift) | right

    with np.errstate(over="ignore"):
        x = feistel(np.asarray(j, np.uint64).reshape(-1))
        outside = x >= np.uint64(n)
        while outside.any():  # each walk lands inside with probability >= 1/4
            x[outside] = feistel(x[outside])
            outside = x >= np.uint64(n)
    return x.astype(np.int64)


def uniform(j: np.ndarray, round_keys: np.ndarray) -> np.ndarray:
    """float64 [len(j)] in [0, 1): one draw per index j, fixed by the keys."""
    with np.errstate(over="ignore"):
        bits = _mix(_mix(np.asarray(j, np.uint64).reshape(-1) ^ round_keys[0]) ^ round_keys[1])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
