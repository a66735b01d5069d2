"""Loading and saving model folders (re-exported as `spd.load_model` / `spd.save_model`)."""

from spd.models.folder import CheckpointError
from spd.models.spd import load_model, save_model

__all__ = ["CheckpointError", "load_model", "save_model"]
