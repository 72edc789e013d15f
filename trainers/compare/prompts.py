"""The prompts of the sample grids that the demo and `trainers compare` draw, when none are given."""

from __future__ import annotations

DEMO_PROMPTS = (
    "a small red circle on the left",
    "a large blue square at the top",
    "one tiny green triangle in the centre",
    "a big yellow star on the right",
    "a purple diamond at the bottom",
    "a red triangle in the centre",  # a colour/shape pair no training image has
)
