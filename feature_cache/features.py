"""Feature vectors read from the cache's Parquet files, shared by the stages and the trainers.

Features are stored as fixed-size lists of float16 (embed `img_emb`, captions `txt_emb`, optimize
`pseudo_txt`). These helpers turn such a column into a dense array in one conversion (no NaN fill or
extra copy unless some rows are null) and judge rows usable without a float32 copy of the whole array.
"""

from __future__ import annotations

import numpy as np

from core.errors import ConfigError


def fixed_rows(
    column, dim: int, dtype=np.float32, wrong_length: str = "raise"
) -> tuple[np.ndarray, np.ndarray]:
    """A list<float> column as a new, writable `dtype` [N, dim] array and a bool [N] of rows filled.

    Null rows are NaN. A row of another length than `dim` raises a one-line ConfigError
    (`wrong_length="raise"`) or becomes a NaN row (`"nan"`, for readers that skip and count bad rows).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if wrong_length not in ("raise", "nan"):
        raise ValueError(f"wrong_length must be 'raise' or 'nan', got {wrong_length!r}")
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, dim), dtype=dtype), np.zeros(0, dtype=bool)
    lengths = pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False)
    good = lengths == dim
    present = lengths >= 0
    if wrong_length == "raise" and not np.array_equal(good, present):
        found = sorted({int(length) for length in lengths[present]})
        raise ConfigError(f"feature vectors of length {found}, expected {dim}")
    if good.all():  # the usual case: one conversion, no fill
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(n, dim).astype(dtype), good
    out = np.full((n, dim), np.nan, dtype=dtype)
    if good.any():
        out[good] = arr.filter(pa.array(good)).flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return out, good


def padded_lists(column, fill: float, dtype) -> np.ndarray:
    """A list column (fixed or ragged) as [N, K], K the longest list and at least 1; short or null lists
    padded with `fill`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, 1), dtype=dtype)
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.full((n, max(int(lengths.max()), 1)), fill, dtype=dtype)
    values = pc.fill_null(arr.flatten(), pa.scalar(fill, arr.type.value_type))
    out[np.arange(out.shape[1])[None, :] < lengths[:, None]] = values.to_numpy(zero_copy_only=False)
    return out


def row_norms(x: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """float32 L2 norm of each row of x (any float dtype), accumulated in float32 chunk by chunk."""
    out = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].astype(np.float32, copy=False)
        out[start : start + chunk] = np.sqrt(np.einsum("ij,ij->i", part, part))
    return out


def usable_rows(x: np.ndarray) -> np.ndarray:
    """bool [N]: rows that are finite and not (near) zero, i.e. can be normalised into a direction."""
    norms = row_norms(x)
    return np.isfinite(norms) & (norms > 1e-3)
