"""What images the pipeline stores and refuses: the formats it encodes to, and the decompression-bomb and
aspect-ratio limits (light: `pipeline embed --help` reads them as defaults)."""

from __future__ import annotations

# What a stored image can be encoded as (`prepare_image`, `encode_image`).
IMAGE_FORMATS = ("jpg", "png", "webp")

# A decompression-bomb guard: a 50 KB PNG can declare 50,000 x 50,000 pixels (7.5 GB as RGB). 64 MP
# covers every real camera and scan we expect (a 9000 x 7000 photo) while capping one decode at
# ~192 MB of RGB, so a DataLoader worker cannot be OOM-killed by a single hostile file.
DEFAULT_MAX_PIXELS = 64_000_000

# Long side / short side. The square centre crop of a 10:1 image keeps a tenth of it; a 1x60000 strip
# would be a single pixel blown up to the stored size, a flat colour standing for the image.
DEFAULT_MAX_ASPECT = 10.0
