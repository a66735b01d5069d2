import warnings

import pytest
import torch

import spd


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model():
    """A random-initialised v15-tiny in eval mode (the real code paths, small widths)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return spd.build_model("v15-tiny", warn_random_encoder=False).eval()


def random_queries(batch: int, k: int, height: int, width: int, generator=None) -> torch.Tensor:
    """Uniform pixel (u, v) inside an image, float32, (B, K, 2)."""
    scale = torch.tensor([width - 1.0, height - 1.0])
    return torch.rand(batch, k, 2, generator=generator) * scale
