"""SPD as two plain graphs for export: encode once (image -> features), decode many (features + K
queries -> depth), with K a free dimension.

`SPD.encode` returns an `EncodedFeatures` holding a row table, the global-attention keys / values
and a set of constants that depend only on the image size (the table's layout, level indices, the
pixel -> grid affine). For a fixed export size those constants are part of the decoder graph, and
only the tensors that depend on the image cross between the two graphs:

    encoder:  image (1, 3, H, W) normalised
              -> table (R, d), global_keys / global_values (G, 1, heads, N_L4, d / heads)
    decoder:  table, global_keys, global_values, queries (1, K, 2) pixels, mask (1, K) bool
              -> depth (1, K) metres (0 where mask is False)

Both wrap the model's own inference paths, so exported == eager is the same maths, not a rewrite.
Batch is 1 (one image per call, as the predictor runs); K is dynamic.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from spd.models.features import EncodedFeatures
from spd.models.spd import SPD


class EncoderGraph(nn.Module):
    """image (1, 3, H, W) ImageNet-normalised -> (table, global_keys, global_values).

    `fold_grn=False` keeps every fc2's constant weight (GRN applied to the activation): the form an
    int8 export quantises (`spd.models.paths.InferencePaths.grn_fold`)."""

    def __init__(self, model: SPD, fold_grn: bool = True) -> None:
        super().__init__()
        self.model = model
        self.fold_grn = fold_grn

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        paths = self.model.inference_paths()
        features = self.model.encode(image, paths if self.fold_grn else dataclasses.replace(paths, grn_fold=False))
        keys = torch.stack([k for k, _ in features.global_kv])
        values = torch.stack([v for _, v in features.global_kv])
        return features.table, keys, values


class DecoderGraph(nn.Module):
    """(table, global_keys, global_values, queries (1, K, 2), mask (1, K)) -> depth (1, K).

    The image-size constants come from one encode of a blank (height, width) image at construction:
    a template `EncodedFeatures` whose table and keys / values each call replaces.
    """

    def __init__(self, model: SPD, height: int, width: int) -> None:
        super().__init__()
        self.model = model
        parameter = next(model.parameters())
        with torch.no_grad():
            self.template: EncodedFeatures = model.encode(torch.zeros(1, 3, height, width, device=parameter.device))

    def forward(
        self, table: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        global_kv = [(keys[i], values[i]) for i in range(keys.shape[0])]
        features = dataclasses.replace(self.template, table=table, global_kv=global_kv)
        # The runtime's caller validated the queries once (the predictor does): shapes only here.
        return self.model.decode(features, queries, mask, check_values=False)
