"""`python -m trainers ...` (and `torchrun --nproc_per_node N -m trainers ...`): the `trainers` command."""

from trainers.cli import main

main()
