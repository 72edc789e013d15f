"""The pseudo-feature methods `pipeline optimize --method` takes, in the order --help lists them. Adding a
method is its module (a `Method`: methods/method.py) and one line here."""

from __future__ import annotations

from methods.method import Method
from methods.optimize import OPTIMIZE
from methods.perturb import PERTURB
from methods.retrieve import RETRIEVE

METHODS: dict[str, Method] = {m.name: m for m in (OPTIMIZE, RETRIEVE, PERTURB)}
