"""`spd bench`'s training-step section: seconds per image and activation bytes saved for backward
per image, SPD v15 (with and without activation checkpointing) beside the DAv2-S baseline, at the
plan's setting (416x544 crops, K = 256)."""

from __future__ import annotations

import multiprocessing
import statistics
import time
import warnings
from contextlib import nullcontext

import torch

from spd.models.build import build_model
from spd.losses import baseline_losses, spd_losses
from spd.models.baseline import DepthAnythingBaseline


def sync_device(device: torch.device) -> None:
    """Waits for the device's queued work, so that a wall-clock time covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, repeat: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync_device(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync_device(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def synthetic_batch(batch: int, height: int, width: int, k: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A training batch of the collate layout with random content (depth in [0.5, 5.5] m, all valid)."""
    generator = torch.Generator().manual_seed(0)
    queries = torch.rand(batch, k, 2, generator=generator) * torch.tensor([width - 1.0, height - 1.0])
    return {
        "image": torch.randn(batch, 3, height, width, generator=generator).to(device),
        "depth": (torch.rand(batch, 1, height, width, generator=generator) * 5 + 0.5).to(device),
        "valid": torch.ones(batch, 1, height, width, dtype=torch.bool, device=device),
        "queries": queries.round().to(device),
        "query_mask": torch.ones(batch, k, dtype=torch.bool, device=device),
    }


def saved_activation_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn` runs (its activations)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def _losses(model, out: dict, batch: dict) -> torch.Tensor:
    out = {k: v.float() for k, v in out.items()}
    if isinstance(model, DepthAnythingBaseline):
        return baseline_losses(out, batch)["total"]
    return spd_losses(out, batch, model.ldrm_patch_origin(batch["queries"]))["total"]


def time_training_step(model, batch: dict, device: torch.device, dtype: str, repeat: int) -> dict[str, float]:
    """Median seconds of forward + backward + AdamW step, and activation bytes, both per image."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def forward_loss() -> torch.Tensor:
        with autocast:
            out = model(batch["image"], batch["queries"], batch["query_mask"], return_aux=True, check_values=False)
        return _losses(model, out, batch)

    def step() -> None:
        forward_loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimiser state, allocator
    times = []
    for _ in range(repeat):
        sync_device(device)
        start = time.perf_counter()
        step()
        sync_device(device)
        times.append(time.perf_counter() - start)
    images = batch["image"].shape[0]
    activation = saved_activation_bytes(forward_loss)
    optimizer.zero_grad(set_to_none=True)
    return {"s_per_image": statistics.median(times) / images, "activation_mb_per_image": activation / images / 2**20}


# Peak resident memory of one CPU training-step section per image of the batch, measured: 16.5 GB at
# batch 6 in fp32 (v15, 416x544, K = 256, 2 threads; `/usr/bin/time -v spd bench --train-step-only
# --train-batch 6 --dtype fp32`), i.e. ~2.8 GB per image with the models, rounded up.
CPU_BYTES_PER_IMAGE = 3 * 2**30


def training_step_sections(device: str, dtypes, batches, repeat: int = 3, run=None) -> list[dict]:
    """`training_step_section` per dtype and batch, each in a fresh process (`run`, default
    `in_fresh_process`): what one section leaves allocated (measured: ~5 GB after a batch-2 fp32
    section on CPU, malloc_trim or not) cannot starve the next, and its memory is its own. On a CPU a
    batch whose measured footprint exceeds the memory available is skipped, with the reason in its
    record, rather than ending the whole bench in the OOM killer."""
    run = run or in_fresh_process
    sections = []
    for dtype in dtypes:
        for batch in batches:
            short = memory_shortfall(torch.device(device), batch)
            sections.append({"dtype": dtype, "batch": batch, "skipped": short} if short else run(device, dtype, batch, repeat))
    return sections


def in_fresh_process(device: str, dtype: str, batch: int, repeat: int) -> dict:
    """`training_step_section` in a spawned child process (glibc's default malloc there: the inference
    allocator setting is not for training), its record returned."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(training_step_section, (device, dtype, batch), {"repeat": repeat})


def memory_shortfall(device: torch.device, batch: int) -> str | None:
    """Why a CPU training step at `batch` would not fit in the memory available now (None: it fits, or
    not a CPU, or the available memory is unknown)."""
    available = available_memory_bytes() if device.type == "cpu" else None
    need = CPU_BYTES_PER_IMAGE * batch
    if available is None or available >= need:
        return None
    return f"needs ~{need / 2**30:.0f} GB (measured ~3 GB per image), {available / 2**30:.1f} GB available"


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def training_step_section(device: str = "cpu", dtype: str = "fp32", batch: int = 1, height: int = 416, width: int = 544,
                          k: int = 256, repeat: int = 3) -> dict:
    """Both models, one batch, the same settings: the plan's 416x544 crops with K = 256 queries."""
    dev = torch.device(device)
    data = synthetic_batch(batch, height, width, k, dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        models = {"spd": build_model("v15", warn_random_encoder=False).to(dev),
                  "baseline": DepthAnythingBaseline(input_mode="fair").to(dev)}
    section = {"batch": batch, "height": height, "width": width, "k": k, "dtype": dtype, "repeat": repeat}
    for name, model in models.items():
        section[name] = time_training_step(model, data, dev, dtype, repeat)
    spd = models["spd"]
    spd.set_activation_checkpointing(CHECKPOINTED)  # the same model, its activations recomputed in backward
    section["spd_checkpointed"] = {**time_training_step(spd, data, dev, dtype, repeat), "parts": list(CHECKPOINTED)}
    spd.set_activation_checkpointing(())
    return section


CHECKPOINTED = ("encoder", "ldrm")


def format_training_step(dtype: str, section: dict) -> str:
    if section.get("skipped"):
        return f"training step ({dtype}, batch {section['batch']}): skipped, {section['skipped']}"
    spd, base, lean = section["spd"], section["baseline"], section.get("spd_checkpointed")
    line = (f"training step ({dtype}, {section['height']}x{section['width']}, K={section['k']}, batch {section['batch']}): "
            f"SPD {spd['s_per_image']:.3f} s/image, {spd['activation_mb_per_image']:.0f} MB activations/image; "
            f"DAv2-S {base['s_per_image']:.3f} s/image, {base['activation_mb_per_image']:.0f} MB activations/image")
    if lean:
        line += (f"; SPD with activation checkpointing ({', '.join(lean['parts'])}) {lean['s_per_image']:.3f} s/image "
                 f"({lean['s_per_image'] / spd['s_per_image']:.2f}x), {lean['activation_mb_per_image']:.0f} MB "
                 f"activations/image ({lean['activation_mb_per_image'] / base['activation_mb_per_image']:.2f} of DAv2-S's)")
    return line
