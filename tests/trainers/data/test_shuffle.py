"""trainers/data/shuffle.py: every epoch is a permutation (each sample once), epochs and seeds differ, and the
per-sample draws are uniform."""

from __future__ import annotations

import numpy as np
import pytest

from trainers.data.shuffle import keys, permute, uniform


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_each_epoch_is_a_permutation(n):
    orders = [permute(np.arange(n), n, keys(0, 0, e)) for e in range(3)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(n))
    if n > 3:
        assert not np.array_equal(orders[0], orders[1])  # another epoch, another order
        assert not np.array_equal(orders[0], permute(np.arange(n), n, keys(1, 0, 0)))  # another seed
    assert np.array_equal(permute(np.arange(n)[::-1], n, keys(0, 0, 0)), orders[0][::-1])  # position-wise


def test_draws_are_uniform_and_fixed_by_their_keys():
    u = uniform(np.arange(200_000), keys(3, 2, 1))
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.005
    assert abs((u < 0.25).mean() - 0.25) < 0.005
    assert np.array_equal(u[:10], uniform(np.arange(10), keys(3, 2, 1)))
    assert not np.array_equal(u[:10], uniform(np.arange(10), keys(3, 2, 2)))
