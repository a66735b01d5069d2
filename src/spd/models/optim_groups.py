"""AdamW parameter groups shared by SPD and the DAv2-S baseline (the model owns its groups)."""

from __future__ import annotations

from torch import nn


def encoder_decoder_param_groups(
    model: nn.Module, encoder: nn.Module, lr: float, encoder_lr_scale: float = 0.1, weight_decay: float = 0.01
) -> list[dict]:
    """Four groups: the `encoder` submodule's parameters at `encoder_lr_scale` x LR, the rest at
    LR; no weight decay on tensors with fewer than 2 dims (norms, biases, GRN gains, scalars).
    Membership is by module, not by parameter name. Each group carries `lr_scale` so the training
    loop can apply its per-step schedule, and a `name` for logs."""
    in_encoder = {id(p) for p in encoder.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault((id(param) in in_encoder, param.dim() >= 2), []).append(param)
    return [
        {
            "params": params,
            "lr": lr * (encoder_lr_scale if is_encoder else 1.0),
            "lr_scale": encoder_lr_scale if is_encoder else 1.0,
            "weight_decay": weight_decay if decays else 0.0,
            "name": f"{'encoder' if is_encoder else 'decoder'}_{'decay' if decays else 'no_decay'}",
        }
        for (is_encoder, decays), params in sorted(groups.items())
    ]
