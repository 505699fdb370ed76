"""UIR-LoRA: universal image restoration with multiple LoRA adapters on a frozen generative backbone."""

__version__ = "0.1.0"
