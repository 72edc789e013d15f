"""Writer of one embed shard: `embed/{i:05d}.tar` (WebDataset) and its `embed/{i:05d}.parquet` sidecar.

Tar members are written with fixed metadata (mtime 0, uid 0, mode 0644) so identical samples give
identical bytes, which is what lets an unchanged rerun stop the downstream cascade.
"""

from __future__ import annotations

import io
import json
import tarfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from core.tars import add_member
from feature_cache.layout import embed_schema, shard_file
from manifests import Out, atomic_write, stat_out, write_parquet_atomic


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class EmbedShardWriter:
    """Use as a context manager: `write(...)` one sample at a time, then `close()` commits both files
    and returns their `Out`s. An exception before `close()` removes the temp file: nothing partial is
    ever visible.
    """

    def __init__(self, cache: Path, shard: int, dim: int):
        self.cache = Path(cache)
        self.dim = dim
        self.tar_rel = shard_file("embed", shard, "tar")
        self.parquet_rel = shard_file("embed", shard)
        self._stack = ExitStack()
        self._tar_file = self._stack.enter_context(atomic_write(self.cache / self.tar_rel))
        self._tar = tarfile.open(fileobj=self._tar_file, mode="w|", format=tarfile.USTAR_FORMAT)
        self._rows: dict[str, list] = {name: [] for name in embed_schema(dim).names}

    def write(self, key: str, image: bytes, ext: str, img_emb: np.ndarray, meta: dict) -> None:
        img_emb = np.asarray(img_emb, dtype=np.float16).reshape(self.dim)
        add_member(self._tar, f"{key}.{ext}", image)
        add_member(self._tar, f"{key}.img_emb.npy", npy_bytes(img_emb))
        add_member(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        row = {"key": key, "img_emb": img_emb, **{k: meta.get(k) for k in ("width", "height", "source")}}
        row.update(caption=meta.get("caption"), labels=meta.get("labels"))
        for name, values in self._rows.items():
            values.append(row[name])

    def close(self) -> list[Out]:
        import pyarrow as pa

        with self._stack:
            self._tar.close()
        rows = len(self._rows["key"])
        tar = stat_out(self.cache, self.tar_rel, self._tar_file.size, self._tar_file.digest, rows)
        schema = embed_schema(self.dim)
        emb = np.stack(self._rows["img_emb"]) if self._rows["key"] else np.zeros((0, self.dim), np.float16)
        columns = {name: pa.array(values, schema.field(name).type) for name, values in self._rows.items()}
        columns["img_emb"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), self.dim)
        table = pa.table(columns, schema=schema)
        size, digest = write_parquet_atomic(self.cache / self.parquet_rel, table)
        return [tar, stat_out(self.cache, self.parquet_rel, size, digest, table.num_rows)]

    def __enter__(self) -> EmbedShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and not self._tar.closed:
            # Discarding: stop the tar stream from flushing its buffer into the deleted temp file later.
            self._tar.closed = self._tar.fileobj.closed = True
        return self._stack.__exit__(exc_type, exc, tb)  # an error before close() discards the temp file
