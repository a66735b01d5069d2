"""total(K) of several trained models on one machine, in one process: what `spd ablate` puts beside
each variant's accuracy. The models are timed in rounds (one call of each per round) and each gets
the median of its rounds, so that a shared machine's drift (10 % between minutes on 2 cores) falls on
every model alike instead of on whichever was timed last."""

from __future__ import annotations

import statistics

import torch

from spd.bench.train_step import median_ms, sync_device


def one_total_ms(model, image: torch.Tensor, queries: torch.Tensor, device: torch.device) -> float:
    """encode + decode(K) of one image, in ms (queries valid by construction: no value checks)."""
    return median_ms(lambda: model.decode(model.encode(image), queries, check_values=False), 1, device, warmup=0)


@torch.inference_mode()
def total_ms_in_rounds(models: dict[str, torch.nn.Module], height: int, width: int, k: int = 256, repeat: int = 9,
                       device: str = "cpu", seed: int = 0) -> dict[str, float]:
    """{name: median total(K) ms} for models in eval mode, on one random image (B = 1, 3 x height x
    width, normalised) and K random in-image queries shared by all, fp32 eager."""
    dev = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, height, width, generator=generator).to(dev)
    queries = (torch.rand(1, k, 2, generator=generator) * torch.tensor([width - 1.0, height - 1.0])).to(dev)
    models = {name: model.to(dev).eval() for name, model in models.items()}
    for model in models.values():  # warm-up: first-call allocations and kernel choices
        for _ in range(2):
            one_total_ms(model, image, queries, dev)
    sync_device(dev)
    rounds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeat):
        for name, model in models.items():
            rounds[name].append(one_total_ms(model, image, queries, dev))
    return {name: statistics.median(times) for name, times in rounds.items()}
