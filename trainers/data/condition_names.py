"""The conditions a trainer reads (trainers/data/conditions.py says what each is), in the order the reports
list them: the one definition, light enough for every `--help` (compare and its feature report use it)."""

CONDITIONS = ("perturb", "retrieve", "optimize", "caption")
