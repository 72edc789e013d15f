"""The dVAE as the autoencoder a family works in (dalle's tokens): its record for trainers/families/."""

from __future__ import annotations

from trainers.autoencoders.autoencoder import RUN_UNKEYED, Autoencoder

DVAE = Autoencoder(
    "dvae",
    "dVAE",
    "dvae",
    "trainers.autoencoders.dvae.config:DvaeConfig",
    "trainers.autoencoders.dvae.train:run_dvae",
    "trainers.autoencoders.dvae.encode:encode_tokens",
    "trainers.autoencoders.dvae.model:DVAE_SIZES",
    unkeyed=RUN_UNKEYED + ("resume",),
)
