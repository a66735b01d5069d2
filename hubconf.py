"""torch.hub entry point: torch.hub.load("<repo or local path>", "spd_v15", weights=PATH_OR_NONE)."""

dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]


def spd_v15(weights=None, **overrides):
    """SPD v15. `weights`: a model folder (config.json + model.safetensors) or a Hub id;
    None builds the v15 architecture with random weights (overrides go to the config)."""
    import spd

    if weights is not None:
        return spd.load_model(weights)
    return spd.build_model("v15", **overrides)
