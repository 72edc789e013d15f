"""feature_cache.features: feature columns to arrays (nulls, wrong lengths, dtypes) and usable rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from core.errors import ConfigError
from feature_cache.features import fixed_rows, padded_lists, row_norms, usable_rows


def test_all_rows_present_convert_in_one_step():
    values = np.arange(12, dtype=np.float16)
    column = pa.chunked_array([pa.FixedSizeListArray.from_arrays(pa.array(values), 4)])
    out, ok = fixed_rows(column, 4, np.float16)
    assert out.dtype == np.float16 and out.shape == (3, 4) and ok.all()
    np.testing.assert_array_equal(out, values.reshape(3, 4))
    out[0, 0] = 99  # a new, writable array
    assert fixed_rows(column, 4)[0].dtype == np.float32


def test_null_rows_are_nan_and_flagged():
    column = pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float16(), 2))
    out, ok = fixed_rows(column, 2)
    assert ok.tolist() == [True, False, True]
    np.testing.assert_array_equal(out[[0, 2]], [[1, 2], [3, 4]])
    assert np.isnan(out[1]).all()


def test_wrong_lengths_raise_or_become_nan_rows():
    column = pa.array([[1.0, 2.0], [1.0, 2.0, 3.0], None], pa.list_(pa.float32()))
    with pytest.raises(ConfigError, match=r"length \[2, 3\], expected 2"):
        fixed_rows(column, 2)
    out, ok = fixed_rows(column, 2, wrong_length="nan")
    assert ok.tolist() == [True, False, False] and np.isnan(out[1:]).all()
    with pytest.raises(ValueError, match="wrong_length"):
        fixed_rows(column, 2, wrong_length="skip")


def test_empty_column():
    out, ok = fixed_rows(pa.array([], pa.list_(pa.float16(), 3)), 3, np.float16)
    assert out.shape == (0, 3) and out.dtype == np.float16 and ok.shape == (0,)


def test_row_norms_and_usable_rows_work_in_chunks():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 16)).astype(np.float16)
    np.testing.assert_allclose(
        row_norms(x, chunk=64), np.linalg.norm(x.astype(np.float32), axis=1), rtol=1e-6
    )
    x[3] = 0
    x[5, 2] = np.nan
    x[7, 1] = np.inf
    usable = usable_rows(x)
    assert usable.sum() == 997 and not usable[[3, 5, 7]].any()


def test_padded_lists_pad_short_and_null_lists_to_the_longest():
    column = pa.chunked_array([pa.array([[1, 2, 3], [4], None, []], pa.list_(pa.int64()))])
    np.testing.assert_array_equal(
        padded_lists(column, -1, np.int64), [[1, 2, 3], [4, -1, -1], [-1] * 3, [-1] * 3]
    )
    sims = padded_lists(pa.array([[0.5, None]], pa.list_(pa.float32())), np.nan, np.float32)
    assert sims[0, 0] == 0.5 and np.isnan(sims[0, 1])  # null values take the fill too
    assert padded_lists(pa.array([[], None], pa.list_(pa.int64())), -1, np.int64).shape == (2, 1)
    assert padded_lists(pa.array([], pa.list_(pa.int64())), -1, np.int64).shape == (0, 1)
