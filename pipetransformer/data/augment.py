"""Random augmentation of training images, reproducible for any layout."""
from __future__ import annotations

import functools

import torch

__all__ = ["crop_flip"]


@functools.lru_cache(maxsize=2)
def _draws(num_rows: int, epoch: int, seed: int) -> torch.Tensor:
    """Every row's draws for an epoch, made once per epoch (not once per step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919)
    return torch.rand(num_rows, 4, generator=g)


def crop_flip(pixels: torch.Tensor, rows: torch.Tensor, num_rows: int, epoch: int, seed: int,
              min_side: float = 0.8) -> torch.Tensor:
    """Random square crop (side min_side..1 of the image, anywhere in it), resized back, and a
    horizontal flip for half the images. The draw depends only on (seed, epoch, row), never on
    which replica reads the row, so every layout sees the same augmented batch."""
    draws = _draws(num_rows, epoch, seed)[rows]  # side, x, y, flip
    side = min_side + (1 - min_side) * draws[:, 0]
    theta = torch.zeros(len(rows), 2, 3)
    theta[:, 0, 0] = torch.where(draws[:, 3] < 0.5, -side, side)  # a negative x scale mirrors
    theta[:, 1, 1] = side
    theta[:, 0, 2] = (1 - side) * (2 * draws[:, 1] - 1)  # the crop's centre, inside the image
    theta[:, 1, 2] = (1 - side) * (2 * draws[:, 2] - 1)
    grid = torch.nn.functional.affine_grid(theta.to(pixels), list(pixels.shape), align_corners=False)
    return torch.nn.functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)
