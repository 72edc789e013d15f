"""The KL VAE as the autoencoder a family works in (ldm's latents): its record for trainers/families/."""

from __future__ import annotations

from trainers.autoencoders.autoencoder import RUN_UNKEYED, Autoencoder

VAE = Autoencoder(
    "vae",
    "VAE",
    "vae",
    "trainers.autoencoders.vae.config:VaeConfig",
    "trainers.autoencoders.vae.train:run_vae",
    "trainers.autoencoders.vae.encode:encode_latents",
    "trainers.autoencoders.vae.model:VAE_SIZES",
    unkeyed=RUN_UNKEYED,
)
