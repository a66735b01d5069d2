"""The SPD model: `encode(images)` once, then `decode(features, queries)` any number of times."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from spd.config import ModelConfig
from spd.models.decoder import DecoderLayer
from spd.models.encoder import Encoder
from spd.models.geometry import make_splat_plan, pad_image, pixel_to_grid, validate_queries
from spd.models.heads import CanvasHead, DepthHead, PatchDenseHead
from spd.models.ldrm import LocalRefinement
from spd.models.neck import L4SelfAttention, Neck, PreCompute
from spd.models.optim_groups import encoder_decoder_param_groups
from spd.models.seed import QuerySeed


@dataclass
class EncodedFeatures:
    """Everything `decode` needs, computed once per image batch by `encode`.

    Shapes (H, W = padded image size); l1, l2, proj_l3, proj_l4 and the value maps in channels-last
    memory (one row per cell):
        l1 (B, d, H/4, W/4), l2 (B, d, H/8, W/8), l3 (B, C3, H/16, W/16), l4 (B, C4, H/32, W/32),
        proj_l3 (B, d, H/16, W/16), proj_l4 (B, d, H/32, W/32),
        msda_values: per MSDA layer its four value maps (`MSDeformableAttention.value_maps`),
        global_kv: per B3b layer (keys, values) each (B, heads, N_L4, d_head).
        image_size: (H, W) of the image as given (before padding), in pixels.
    """

    l1: torch.Tensor
    l2: torch.Tensor
    l3: torch.Tensor
    l4: torch.Tensor
    proj_l3: torch.Tensor
    proj_l4: torch.Tensor
    msda_values: list[list[torch.Tensor]]
    global_kv: list[tuple[torch.Tensor, torch.Tensor]]
    image_size: tuple[int, int]

    @property
    def batch_size(self) -> int:
        return self.l1.shape[0]

    @property
    def padded_size(self) -> tuple[int, int]:
        return self.l1.shape[-2] * 4, self.l1.shape[-1] * 4


class SPD(nn.Module, PyTorchModelHubMixin, library_name="spd", tags=["depth-estimation", "sparse-depth"]):
    """Sparse query-point depth, v15 (DESIGN.md §3).

    Args:
        config: a `ModelConfig` (see `spd.config` presets).
        warn_random_encoder: warn when the encoder starts from random weights.

    Shape:
        forward: images (B, 3, H, W) ImageNet-normalised, queries (B, K, 2) pixel (u, v),
        mask (B, K) bool (True = real query) -> depth (B, K) in metres; padded entries are 0.
    """

    def __init__(self, config: ModelConfig, warn_random_encoder: bool = True) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.encoder = Encoder(cfg.encoder_name, cfg.encoder_weights, warn_random=warn_random_encoder)
        self.neck = Neck(self.encoder.channels, cfg.d_model, cfg.l3_dim, cfg.global_projection)
        level_dims = self.neck.out_dims
        self.l4_self_attn = (
            L4SelfAttention(level_dims[3], cfg.l4_self_attn_layers, cfg.n_heads) if cfg.l4_self_attn_layers else None
        )
        self.precompute = PreCompute(level_dims[2], level_dims[3], cfg.d_model, cfg.n_heads, cfg.n_global_layers)
        self.seed = QuerySeed(cfg.d_model, cfg.fourier_freqs)
        # L3/L4 get per-head value projections unless the neck already made them d-wide (v14 style).
        projected = () if cfg.global_projection else (2, 3)
        self.msda_layers = nn.ModuleList(
            DecoderLayer(
                "msda", cfg.d_model, cfg.n_heads, cfg.ffn_dim, level_dims, projected, cfg.n_points,
                cfg.q2q_self_attn, cfg.value_proj_order,
            )
            for _ in range(cfg.n_msda_layers)
        )
        self.global_layers = nn.ModuleList(
            DecoderLayer("global", cfg.d_model, cfg.n_heads, cfg.ffn_dim, q2q_self_attn=cfg.q2q_self_attn)
            for _ in range(cfg.n_global_layers)
        )
        self.ldrm = (
            LocalRefinement(cfg.d_model, cfg.ldrm_mid_dim, cfg.ldrm_out_dim, cfg.ldrm_patch) if cfg.use_ldrm else None
        )
        local_dim = cfg.ldrm_out_dim if cfg.use_ldrm else 0
        self.head = DepthHead(cfg.d_model + local_dim, cfg.head_hidden, cfg.head_init_depth)
        # Training-only heads: they receive gradients only through `return_aux=True`.
        self.canvas_head = CanvasHead(cfg.d_model, cfg.canvas_head_dim)
        self.patch_head = PatchDenseHead(cfg.d_model, cfg.ldrm_out_dim) if cfg.use_ldrm else None

    TRAINING_ONLY_MODULES = ("canvas_head", "patch_head")

    # ------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> EncodedFeatures:
        """Runs the encoder, neck and everything else that depends on the image only, once.

        images: (B, 3, H, W) normalised, any H, W.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W); got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be normalised floating-point tensors; got {images.dtype}")
        image_size = (images.shape[-2], images.shape[-1])
        levels = self.neck(self.encoder(pad_image(images), fast=self.config.encoder_fast))
        l1, l2, l3, l4 = levels
        if self.l4_self_attn is not None:
            l4 = self.l4_self_attn(l4)
        proj_l3, proj_l4, global_kv = self.precompute(l3, l4)
        # The maps decode reads by rows (seed, canvas, LDRM) in channels-last memory, once here.
        l1, l2, proj_l3, proj_l4 = (m.contiguous(memory_format=torch.channels_last) for m in (l1, l2, proj_l3, proj_l4))
        msda_values = [layer.cross.value_maps([l1, l2, l3, l4]) for layer in self.msda_layers]
        return EncodedFeatures(l1, l2, l3, l4, proj_l3, proj_l4, msda_values, global_kv, image_size)

    def decode(
        self,
        features: EncodedFeatures,
        queries: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_aux: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Depth at the queries. queries (B, K, 2) pixel (u, v); mask (B, K) True = real query.

        Returns depth (B, K) metres, or with `return_aux` a dict with `depth`, `canvas_depth`
        (B, 1, ceil(H/4), ceil(W/4)) and, when LDRM is on, `ldrm_patch_depth` (B, K, 4P, 4P)
        whose pixel (j, i) lies on image pixel (4*c0 + i, 4*r0 + j) (see `ldrm_patch_origin`).

        Queries meet through the canvas, so a query's depth depends (slightly) on which other
        queries share the call; padded queries never influence real ones.
        """
        mask = validate_queries(queries, features.image_size, mask, features.batch_size)
        batch, num_queries, _ = queries.shape
        if num_queries == 0 and not return_aux:
            return queries.new_zeros(batch, 0)
        # Padded queries may hold anything (NaN too); park them at pixel 0 so nothing propagates.
        queries = torch.where(mask.unsqueeze(-1), queries, torch.zeros_like(queries))
        grid = pixel_to_grid(queries, features.padded_size)
        height, width = features.image_size
        positions = (queries + 0.5) / queries.new_tensor([width, height])  # (B, K, 2) in [0, 1]

        # Inference (no autograd) takes the fast paths: gathers instead of grid_sample, canvas
        # updated in place. Training keeps the reference paths; tests hold the two equal.
        fast = self.config.decoder_fast and not torch.is_grad_enabled()
        seed_maps = [features.l1, features.l2, features.proj_l3, features.proj_l4]
        # The queries do not move: their bilinear corners on each level are computed once per call.
        # Plans for L2/L3/L4 serve the canvas; the one for L1 only the gather-reading seed.
        plans = [make_splat_plan(grid, mask, tuple(level.shape[-2:])) for level in seed_maps]
        h = self.seed(seed_maps, grid, positions, plans if fast else None)
        canvas_plans = plans[1:]
        # The canvas starts from the encoder's maps every call; the fast path writes in place, so it
        # gets its own copy. Channels-last memory: depthwise convs and row gathers are fast that way.
        canvas = [m.clone() if fast else m for m in seed_maps[1:]]
        for layer, values in zip(self.msda_layers, features.msda_values):
            h, canvas = layer(h, grid, mask, canvas, canvas_plans, values=values, fast=fast)
        for layer, global_kv in zip(self.global_layers, features.global_kv):
            h, canvas = layer(h, grid, mask, canvas, canvas_plans, global_kv=global_kv, fast=fast)

        head_input, feat_patch = h, None
        if self.ldrm is not None:
            local, feat_patch = self.ldrm(features.l1, queries, return_patch=return_aux, fast=self.config.ldrm_fast)
            head_input = torch.cat([h, local], dim=-1)
        depth = self.head(head_input) * mask  # padded entries are 0
        if not return_aux:
            return depth
        out = {"depth": depth}
        canvas_depth = self.canvas_head(canvas[0])
        out["canvas_depth"] = canvas_depth[..., : -(-height // 4), : -(-width // 4)]
        if self.ldrm is not None:
            out["ldrm_patch_depth"] = self.patch_head(h, feat_patch)
        return out

    def forward(
        self,
        images: torch.Tensor,
        queries: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_aux: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.decode(self.encode(images), queries, mask, return_aux)

    def ldrm_patch_origin(self, queries: torch.Tensor) -> torch.Tensor:
        """Top-left image pixel (x, y) of each query's LDRM patch. (B, K, 2) -> (B, K, 2) long."""
        if self.ldrm is None:
            raise ValueError("this model has no LDRM (use_ldrm=False)")
        return self.ldrm.patch_origin(queries) * 4

    # --- huggingface_hub mixin: `save_pretrained` / `from_pretrained` use our strict loader ------
    def _save_pretrained(self, save_directory) -> None:
        from spd.engine.checkpoint import save_model

        save_model(self, save_directory)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", **kwargs) -> "SPD":
        from spd.engine.checkpoint import load_model

        return load_model(model_id, map_location)

    # ------------------------------------------------------------------------------------------
    def param_groups(self, lr: float, encoder_lr_scale: float = 0.1, weight_decay: float = 0.01) -> list[dict]:
        """AdamW groups: the encoder at `encoder_lr_scale` x LR (DESIGN §4: 1e-5 vs 1e-4), the rest
        at LR, no decay on norms/biases/scalars (see `encoder_decoder_param_groups`)."""
        return encoder_decoder_param_groups(self, self.encoder, lr, encoder_lr_scale, weight_decay)
