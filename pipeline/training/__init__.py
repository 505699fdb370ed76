"""LightningModules (DDPM pre-training, one-step restoration) and the Trainer factory."""
