"""The frozen generative backbone, its LoRA adapters, and what composes them."""
