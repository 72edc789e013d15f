"""Known data-parallel bugs, put back into a `trainers` process so that tests can show their parity checks
fail on them (tests/trainers/runtime/test_distributed_dalle_clip.py). Python imports this module at start-up
when its folder is on PYTHONPATH (tests/torchrun.py::trainers(mutation=...) puts it there for the launcher and
every rank); `LAFITE_TEST_MUTATION` names the bug:

- `per_rank_dropout`: dalle's dropout masks drawn at each rank's shape, as nn.Dropout draws them, so two
  ranks' masks are not the one-process mask of the global batch;
- `local_losses`: the logged losses left as each rank's own (World.mean_scalars not averaging them).
"""

import os

MUTATION = os.environ.get("LAFITE_TEST_MUTATION")

if MUTATION == "per_rank_dropout":
    import torch.nn.functional as F

    import trainers.families.dalle.model

    trainers.families.dalle.model.dropout = lambda x, p, world=None: (
        F.dropout(x, p, training=True) if p else x
    )
elif MUTATION == "local_losses":
    import trainers.runtime.distributed

    trainers.runtime.distributed.World.mean_scalars = lambda self, values: {
        k: float(v) for k, v in values.items()
    }
elif MUTATION:
    raise SystemExit(f"LAFITE_TEST_MUTATION={MUTATION}: no such mutation")
