"""SPD models: the v15 sparse query-point depth network and its parts."""

from spd.models.spd import SPD, EncodedFeatures

__all__ = ["SPD", "EncodedFeatures"]
