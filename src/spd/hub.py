"""Loading and saving model folders (re-exported as `spd.load_model` / `spd.save_model`)."""

from spd.engine.checkpoint import CheckpointError, load_model, save_model

__all__ = ["CheckpointError", "load_model", "save_model"]
