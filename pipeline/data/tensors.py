"""Images as tensors: uint8 H×W×3 <-> float32 3×H×W on [-1, 1], the dihedral group D4, seeded generators."""

from __future__ import annotations

import numpy as np
import torch


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 on [-1, 1]."""
    return torch.tensor(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """3xHxW on [-1, 1] -> HxWx3 uint8."""
    return tensor.detach().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def seeded_generator(*key: int) -> torch.Generator:
    """A generator seeded by a tuple of integers (seed, epoch, ...)."""
    state = 0
    for part in key:
        state = (state * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(state)


def d4(tensor: torch.Tensor, element: int) -> torch.Tensor:
    """Element 0..7 of the dihedral group D4: ``element % 4`` quarter turns, then a flip if ``element >= 4``."""
    tensor = torch.rot90(tensor, element % 4, dims=(-2, -1))
    return tensor.flip(-1) if element >= 4 else tensor
