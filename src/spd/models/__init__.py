"""SPD models: the v15 sparse query-point depth network and its parts."""

from spd.models.features import EncodedFeatures
from spd.models.spd import SPD

__all__ = ["SPD", "EncodedFeatures"]
