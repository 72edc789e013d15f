"""`python -m trainers ...` (and `torchrun --nproc_per_node N -m trainers ...`): the `trainers` command."""

from cli.trainers import main

main()
