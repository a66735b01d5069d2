"""Activation checkpointing (issue 30): the encoder's blocks and LDRM's patch upsampling recomputed in
backward give the same loss and gradients as keeping their activations, with far fewer saved bytes."""

import warnings

import pytest
import torch

from spd.bench.train_step import _losses, saved_activation_bytes, synthetic_batch
from spd.config.training import load_config
from spd.engine.train import build_training_model
from spd.errors import ConfigError
from spd.models.build import build_model


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch["image"], batch["queries"], batch["query_mask"], return_aux=True, check_values=False)
    loss = _losses(model, out, batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, batch) -> int:
    forward = lambda: _losses(model, model(batch["image"], batch["queries"], batch["query_mask"],  # noqa: E731
                                           return_aux=True, check_values=False), batch)
    return saved_activation_bytes(forward)


@pytest.mark.parametrize("parts", [("ldrm",), ("encoder",), ("encoder", "ldrm")])
def test_checkpointing_gives_the_same_loss_and_gradients_with_fewer_saved_bytes(parts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_model("v15-tiny", warn_random_encoder=False).train()
    batch = synthetic_batch(2, 128, 160, 64, torch.device("cpu"))
    loss, grads = _loss_and_grads(model, batch)
    kept = _saved_bytes(model, batch)
    model.set_activation_checkpointing(parts)
    loss_ck, grads_ck = _loss_and_grads(model, batch)
    assert loss_ck.item() == loss.item()
    assert grads.keys() == grads_ck.keys()
    for name, grad in grads.items():
        scale = grad.abs().max().clamp_min(1e-30)
        assert ((grads_ck[name] - grad).abs().max() / scale).item() <= 1e-6, name
    assert _saved_bytes(model, batch) < 0.85 * kept


def test_checkpointing_is_a_training_setting_checked_by_the_config():
    cfg = load_config("v15_tiny_synth", ["activation_checkpointing=[encoder, ldrm]"])
    model = build_training_model(cfg)
    assert model.ldrm.checkpointing and all(
        stage.grad_checkpointing for name, stage in model.encoder.backbone.items() if name.startswith("stages"))
    with pytest.raises(ConfigError, match='a list of "encoder", "ldrm"'):
        load_config("v15_tiny_synth", ["activation_checkpointing=[decoder]"])
    with pytest.raises(ConfigError, match="not to the dav2-small baseline"):
        build_training_model(load_config("dav2s_nyu", ["activation_checkpointing=[ldrm]"]))
