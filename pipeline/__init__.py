"""UIR-LoRA: universal image restoration with multiple LoRA adapters on a frozen generative backbone."""

import os

# albumentations checks the package index for a newer version at import (a DNS lookup and an HTTPS
# request with a 2 s timeout): nothing in this project may touch the network at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
