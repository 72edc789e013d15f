"""Files a user may pass where a torch checkpoint is expected, each with what its one-line error must say.
Imported by tests as `from bad_torch_files import bad_torch_files`."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch
from factories import image_bytes


def bad_torch_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a regex its ConfigError message must match)."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(64, 64)}}, buffer)
    whole = buffer.getvalue()
    legacy = io.BytesIO()
    torch.save({"w": torch.zeros(64, 64)}, legacy, _use_new_zipfile_serialization=False)
    files = {
        "jpeg": ("broken.jpg", image_bytes(), "a JPEG image, not a "),
        "empty": ("empty.pt", b"", "an empty file"),
        "text": ("notes.pt", b"not a checkpoint\n", "not a torch checkpoint"),
        "html": ("page.bin", b"<!DOCTYPE html><html>rate limited</html>", "an HTML page"),
        "truncated": ("cut.pt", whole[: len(whole) // 2], "truncated"),
        "truncated_legacy": ("cut_legacy.pt", legacy.getvalue()[:300], "truncated"),
        "pickle": ("plain.pkl", pickle.dumps({"w": [1, 2, 3]}), "not a torch checkpoint"),
        "numpy_inside": ("np.pt", None, "Python objects.*weights_only.*numpy"),
    }
    out = {}
    for name, (filename, data, message) in files.items():
        path = folder / filename
        if data is None:
            torch.save({"w": np.zeros(3)}, path)
        else:
            path.write_bytes(data)
        out[name] = (path, message)
    return out
