"""The SPD model: `encode(images)` once, then `decode(features, queries)` any number of times; and
its model folders (`save_model` / `load_model`, the one door every loader goes through)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from spd.cameras.scale import DEFAULT_LONG_SIDE
from spd.config.model import ModelConfig
from spd.geometry.coords import pad_image, padded_size
from spd.geometry.validation import validate_queries
from spd.models.decoder import DecoderLayer
from spd.models.encoder import Encoder
from spd.models.features import EncodedFeatures
from spd.models.folder import (
    CONFIG_FILE, WEIGHTS_SHA256, CheckpointError, build_with_weights, read_config_dict, resolve_model_folder,
    verify_weights_checksum, write_model_folder,
)
from spd.models.global_attn import GlobalCrossAttention, GlobalKeyValues
from spd.models.heads import CanvasHead, DepthHead, PatchDenseHead
from spd.models.ldrm import LocalRefinement
from spd.models.msda import MSDeformableAttention
from spd.models.neck import CoarseProjection, L4SelfAttention, Neck
from spd.models.optim_groups import encoder_decoder_param_groups
from spd.models.paths import InferencePaths
from spd.models.onednn import compute_dtype
from spd.models.rows import (RowLayout, build_row_table, cat_in, canvas_write_forms, exporting_ops, level_index,
                             map_view, query_rows)
from spd.models.seed import QuerySeed
from spd.models.splat import make_splat_plan

MODEL_TYPE = "spd"  # config.json's model_type of an SPD folder


CHECKPOINTABLE = ("encoder", "ldrm")  # `SPD.set_activation_checkpointing` parts


class SPD(nn.Module, PyTorchModelHubMixin, library_name="spd", tags=["depth-estimation", "sparse-depth"]):
    """Sparse query-point depth, v15 (DESIGN.md §3).

    Args:
        config: a `ModelConfig` (see `spd.config` presets).
        warn_random_encoder: warn when the encoder starts from random weights.

    Shape:
        forward: images (B, 3, H, W) ImageNet-normalised, queries (B, K, 2) pixel (u, v),
        mask (B, K) bool (True = real query) -> depth (B, K) in metres; padded entries are 0.
    """

    TRAINING_ONLY_MODULES = ("canvas_head", "patch_head")

    def __init__(self, config: ModelConfig, warn_random_encoder: bool = True) -> None:
        super().__init__()
        self.config = cfg = config
        self.encoder = Encoder(cfg.encoder_name, cfg.encoder_weights, warn_random=warn_random_encoder)
        self.neck = Neck(self.encoder.channels, cfg.d_model, cfg.l3_dim, cfg.global_projection)
        level_dims = self.neck.out_dims
        self.l4_self_attn = (
            L4SelfAttention(level_dims[3], cfg.l4_self_attn_layers, cfg.n_heads) if cfg.l4_self_attn_layers else None
        )
        # v14 (global_projection): the neck already projected L3/L4 to d, which the canvas and seed read as they are
        self.coarse_proj = None if cfg.global_projection else CoarseProjection(level_dims[2], level_dims[3], cfg.d_model)
        self.global_kv = GlobalKeyValues(level_dims[3], cfg.d_model, cfg.n_heads, cfg.n_global_layers)
        self.seed = QuerySeed(cfg.d_model, cfg.fourier_freqs)
        # L3/L4 get per-head value projections unless the neck already made them d-wide (v14 style).
        projected = () if cfg.global_projection else (2, 3)
        layer_args = dict(d_model=cfg.d_model, n_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim, q2q_self_attn=cfg.q2q_self_attn)
        self.msda_layers = nn.ModuleList(
            DecoderLayer(
                MSDeformableAttention(cfg.d_model, cfg.n_heads, level_dims, cfg.n_points, projected, cfg.value_proj_order),
                **layer_args,
            )
            for _ in range(cfg.n_msda_layers)
        )
        self.global_layers = nn.ModuleList(
            DecoderLayer(GlobalCrossAttention(cfg.d_model, cfg.n_heads), **layer_args) for _ in range(cfg.n_global_layers)
        )
        self.ldrm = (
            LocalRefinement(cfg.d_model, cfg.ldrm_mid_dim, cfg.ldrm_out_dim, cfg.ldrm_patch) if cfg.use_ldrm else None
        )
        local_dim = cfg.ldrm_out_dim if cfg.use_ldrm else 0
        self.head = DepthHead(cfg.d_model + local_dim, cfg.head_hidden, cfg.head_init_depth)
        # Training-only heads: they receive gradients only through `return_aux=True`.
        self.canvas_head = CanvasHead(cfg.d_model, cfg.canvas_head_dim)
        self.patch_head = PatchDenseHead(cfg.d_model, cfg.ldrm_out_dim) if cfg.use_ldrm else None

    @property
    def canonical_focal(self) -> float:
        """The focal length [px] this model's depths are for (spd.camera)."""
        return self.config.canonical_focal

    # ------------------------------------------------------------------------------------------
    def set_activation_checkpointing(self, parts: list[str] | tuple[str, ...]) -> None:
        """Training memory: recompute these parts' activations in backward instead of keeping them
        ("encoder": timm's per-block checkpointing of every ConvNeXt stage; "ldrm": the 28x28 patch
        upsampling of every query). Exact: the same ops run again (test); costs their forward time once more."""
        unknown = set(parts) - set(CHECKPOINTABLE)
        if unknown:
            raise ValueError(f"activation checkpointing knows {list(CHECKPOINTABLE)}, not {sorted(unknown)}")
        self.encoder.set_grad_checkpointing("encoder" in parts)
        if self.ldrm is not None:
            self.ldrm.checkpointing = "ldrm" in parts

    def inference_paths(self, requested: InferencePaths | None = None) -> InferencePaths:
        """The one decision of fast vs reference paths. Inference (eval mode, no autograd) takes the
        config's fast paths, or `requested` when given; anything else runs the reference paths, and
        asking for a fast path there is an error (they are exact only without autograd / in eval)."""
        inference = not self.training and not torch.is_grad_enabled()
        if requested is not None:
            if requested.any and not inference:
                raise ValueError("fast inference paths need eval mode and torch.no_grad() / torch.inference_mode()")
            return requested
        if not inference:
            return InferencePaths.reference()
        cfg = self.config
        # The row-table decoder reads d-wide MSDA value maps; "sample_first" keeps raw L3/L4 maps.
        decoder = cfg.decoder_fast and cfg.value_proj_order != "sample_first"
        return InferencePaths(encoder=cfg.encoder_fast, decoder=decoder, ldrm=cfg.ldrm_fast)

    def encode(self, images: torch.Tensor, paths: InferencePaths | None = None) -> EncodedFeatures:
        """Runs the encoder, neck and everything else that depends on the image only, once.

        images: (B, 3, H, W) normalised, any H, W. `paths`: see `inference_paths`.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W); got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be normalised floating-point tensors; got {images.dtype}")
        paths = self.inference_paths(paths)
        image_size = (images.shape[-2], images.shape[-1])
        l1, l2, l3, l4 = self.neck(self.encoder(pad_image(images), folded=paths.encoder, fold_grn=paths.grn_fold))
        if self.l4_self_attn is not None:
            l4 = self.l4_self_attn(l4)
        proj_l3, proj_l4 = self.coarse_proj(l3, l4) if self.coarse_proj is not None else (l3, l4)
        global_kv = self.global_kv(l4)
        # Channels-last: MSDA's value projection then writes rows, as the row table stores them.
        l1, l2 = (m.contiguous(memory_format=torch.channels_last) for m in (l1, l2))
        value_maps = [layer.cross.value_maps([l1, l2, l3, l4]) for layer in self.msda_layers]
        affine = query_affine(image_size, padded_size(*image_size), images.device)
        if not (paths.decoder or paths.ldrm):  # the reference paths read the maps themselves: no table to copy
            return EncodedFeatures(l1, l2, l3, l4, proj_l3, proj_l4, value_maps, global_kv, image_size, None, None, None,
                                   None, affine, None, None)
        return self._row_features([l1, l2, l3, l4, proj_l3, proj_l4], value_maps, global_kv, image_size, affine)

    def _row_features(self, maps: list[torch.Tensor], value_maps, global_kv, image_size, affine) -> EncodedFeatures:
        """`EncodedFeatures` for the inference paths: the maps moved into one row table (see
        `spd.models.rows`) with the device constants decode needs."""
        l1, l2, l3, l4, proj_l3, proj_l4 = maps
        # Under autocast the maps decode reads are stored in the autocast dtype (bf16): every decode op
        # then reads half the bytes, and no canvas convolution re-casts its map in every call.
        device = l1.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        table, layout, seed_views, msda_views, msda_maps = self._row_table([l1, l2, proj_l3, proj_l4], value_maps, dtype)
        seed_index, l1_index = level_index(layout, [0, 1, 2, 3], device), level_index(layout, [0], device)
        heads = self.config.n_heads
        points = self.config.n_points
        msda_index = None if msda_maps is None else [level_index(layout, ids, device, heads, points) for ids in msda_maps]
        seed_extent = torch.tensor([[w, h] for h, w in layout.sizes[:4]], dtype=torch.float32, device=device).view(4, 1, 2)
        return EncodedFeatures(
            *seed_views[:2], l3, l4, *seed_views[2:], msda_views, global_kv, image_size, table, layout, seed_index, msda_index,
            affine, seed_extent, l1_index,
        )

    def _row_table(self, seed_maps: list[torch.Tensor], value_maps: list[list[torch.Tensor]], dtype: torch.dtype | None):
        """Every d-wide map decode reads, once, in one row table (see `spd.models.rows`): the seed maps,
        then each MSDA layer's projected value maps; identity value maps are their input maps (L1/L2:
        the seed's own rows; L3/L4 in the v14-style ablation: added once). Which maps are identities
        is static (`identity_levels`), so this traces the same under torch.compile.
        Returns the table, its layout, the seed maps and value maps as views into it, and per MSDA
        layer the table indices of its four maps (None when a layer samples raw, wider maps)."""
        width = seed_maps[0].shape[1]
        if any(v.shape[1] != width for values in value_maps for v in values):
            table, layout, views = build_row_table(seed_maps, dtype)
            return table, layout, views, value_maps, None
        maps, shared, msda_maps = list(seed_maps), {0: 0, 1: 1}, []  # identity level -> table index
        for layer, values in zip(self.msda_layers, value_maps):
            ids = []
            for level, (value, identity) in enumerate(zip(values, layer.cross.identity_levels)):
                if identity and level in shared:
                    ids.append(shared[level])
                    continue
                if identity:
                    shared[level] = len(maps)
                ids.append(len(maps))
                maps.append(value)
            msda_maps.append(ids)
        table, layout, views = build_row_table(maps, dtype)
        return table, layout, views[:4], [[views[i] for i in ids] for ids in msda_maps], msda_maps

    def decode(
        self,
        features: EncodedFeatures,
        queries: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_aux: bool = False,
        paths: InferencePaths | None = None,
        check_values: bool = True,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Depth at the queries. queries (B, K, 2) pixel (u, v); mask (B, K) True = real query.

        Returns depth (B, K) metres, or with `return_aux` a dict with `depth`, `canvas_depth`
        (B, 1, ceil(H/4), ceil(W/4)) and, when LDRM is on, `ldrm_patch_depth` (B, K, 4P, 4P)
        whose pixel (j, i) lies on image pixel (4*c0 + i, 4*r0 + j) (see `ldrm_patch_origin`).

        Queries meet through the canvas, so a query's depth depends (slightly) on which other
        queries share the call; padded queries never influence real ones. `paths`: see
        `inference_paths`; `check_values=False` skips the NaN / outside checks, which sync with
        the device (for callers that validated already, e.g. the training loop).
        """
        mask = validate_queries(queries, features.image_size, mask, features.batch_size, check_values)
        if queries.shape[1] == 0 and not return_aux:
            return queries.new_zeros(queries.shape[0], 0)
        fast = self.inference_paths(paths)
        if (fast.decoder or fast.ldrm) and features.table is None:
            raise ValueError("these features were encoded for the reference paths (no row table): "
                             "encode and decode with the same `paths`")
        # Padded queries may hold anything (NaN too); park them at pixel 0 so nothing propagates.
        queries = torch.where(mask.unsqueeze(-1), queries, torch.zeros_like(queries))
        h, canvas_l2 = self._decode_layers(features, queries, mask, fast.decoder)
        head_input, feat_patch = h, None
        if self.ldrm is not None:
            rows = (features.table, features.l1_index) if fast.ldrm else None
            local, feat_patch = self.ldrm(features.l1, queries, return_patch=return_aux, rows=rows)
            head_input = cat_in(compute_dtype(local), [h, local])  # in the head's matmul dtype
        depth = self.head(head_input) * mask  # padded entries are 0
        if not return_aux:
            return depth
        height, width = features.image_size
        out = {"depth": depth, "canvas_depth": self.canvas_head(canvas_l2)[..., : -(-height // 4), : -(-width // 4)]}
        if self.ldrm is not None:
            out["ldrm_patch_depth"] = self.patch_head(h, feat_patch)
        return out

    def _decode_layers(
        self, features: EncodedFeatures, queries: torch.Tensor, mask: torch.Tensor, fast: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Seed, then the MSDA and B3b layers over the shared canvas -> (h (B, K, d), final canvas L2).

        `fast` runs `_decode_layers_rows` (inference); this is the reference: `grid_sample` reads and
        dense splats, differentiable."""
        affine = features.query_affine
        grid = torch.addcmul(affine[1], queries, affine[0])  # (B, K, 2) normalised, as `pixel_to_grid`
        positions = torch.addcmul(affine[3], queries, affine[2])  # (B, K, 2) in [0, 1]
        if fast:
            return self._decode_layers_rows(features, grid, positions, mask)
        seed_maps = [features.l1, features.l2, features.proj_l3, features.proj_l4]
        # The queries do not move: their bilinear corners on each canvas level are computed once per call.
        plans = [make_splat_plan(grid, mask, tuple(level.shape[-2:])) for level in seed_maps[1:]]
        h = self.seed(seed_maps, grid, positions)
        canvas = seed_maps[1:]  # re-initialised from the encoder's maps every call
        memories = [*features.msda_values, *features.global_kv]
        for layer, memory in zip([*self.msda_layers, *self.global_layers], memories, strict=True):
            h, canvas = layer(h, grid, mask, canvas, plans, memory)
        return h, canvas[0]

    def _decode_layers_rows(
        self, features: EncodedFeatures, grid: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_decode_layers` for inference on the row table (`spd.models.rows`): every multi-level read
        one `embedding_bag`, every canvas write one `index_add_`, the canvas one buffer updated in place."""
        start, stop = features.canvas_rows
        cfg = self.config
        msda_bags = (cfg.n_heads, len(features.layout.sizes[:4]) * cfg.n_points * 4)
        plan = query_rows(grid, mask, features.seed_index, features.seed_extent, start, stop - start, msda_bags,
                          features.table.dtype)
        h = self.seed.forward_rows(features.table, plan, positions)
        canvas = features.table[start:stop].clone()  # this call's canvas: the table's L2 / proj_L3 / proj_L4 rows
        shifted = RowLayout(features.layout.sizes[1:4], tuple(o - start for o in features.layout.offsets[1:4]),
                            features.layout.batch)
        views = [map_view(canvas, shifted, i) for i in range(3)]
        if exporting_ops() and grid.shape[0] == 1:  # exported graphs: the canvas write scatters no rows
            plan.canvas_write = canvas_write_forms(plan.canvas_rows, plan.soft_beta, stop - start)
        memories = [*((features.table, index) for index in features.msda_index), *features.global_kv]
        for layer, memory in zip([*self.msda_layers, *self.global_layers], memories, strict=True):
            h = layer.forward_rows(h, plan, canvas, views, mask, memory)
        return h, views[0]

    def forward(
        self,
        images: torch.Tensor,
        queries: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_aux: bool = False,
        paths: InferencePaths | None = None,
        check_values: bool = True,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.decode(self.encode(images, paths), queries, mask, return_aux, paths, check_values)

    def ldrm_patch_origin(self, queries: torch.Tensor) -> torch.Tensor:
        """Top-left image pixel (x, y) of each query's LDRM patch. (B, K, 2) -> (B, K, 2) long."""
        if self.ldrm is None:
            raise ValueError("this model has no LDRM (use_ldrm=False)")
        return self.ldrm.patch_origin(queries) * 4

    def param_groups(self, lr: float, encoder_lr_scale: float = 0.1, weight_decay: float = 0.01) -> list[dict]:
        """AdamW groups: the encoder at `encoder_lr_scale` x LR (DESIGN §4: 1e-5 vs 1e-4), the rest
        at LR, no decay on norms/biases/scalars (see `encoder_decoder_param_groups`)."""
        return encoder_decoder_param_groups(self, self.encoder, lr, encoder_lr_scale, weight_decay)

    # --- huggingface_hub mixin: `save_pretrained` / `from_pretrained` go through the one door -----
    def _save_pretrained(self, save_directory) -> None:
        save_model(self, save_directory)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", **kwargs) -> "SPD":
        return load_model(model_id, map_location)


def query_affine(image_size: tuple[int, int], padded_size: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(4, 2) float32: pixel (u, v) -> grid coordinate `u * a + b` (`pixel_to_grid`'s
    (2u + 1) / W_pad - 1) and -> position in [0, 1] `u * c + d` ((u + 0.5) / W), per axis (x, y)."""
    (height, width), (padded_h, padded_w) = image_size, padded_size
    return torch.tensor([
        [2.0 / padded_w, 2.0 / padded_h], [1.0 / padded_w - 1.0, 1.0 / padded_h - 1.0],
        [1.0 / width, 1.0 / height], [0.5 / width, 0.5 / height],
    ], dtype=torch.float32, device=device)


# --- model folders ---------------------------------------------------------------------------------
def save_model(model: SPD, folder: str | Path) -> Path:
    """Writes `config.json` + `model.safetensors` (the Hugging Face layout), each file atomically."""
    config = model.config.to_dict()
    config["encoder_weights"] = None  # the weights now live in model.safetensors
    return write_model_folder(folder, model.state_dict(), config, MODEL_TYPE)


def read_model_config(folder: Path) -> ModelConfig:
    """The `ModelConfig` of an SPD model folder; CheckpointError for any other folder."""
    data = read_config_dict(folder)
    data.pop(WEIGHTS_SHA256, None)
    model_type = data.pop("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: holds a {model_type!r} model, not SPD (for the baseline use baseline:FOLDER)"
        )
    data["encoder_weights"] = None
    if "image_long_side" not in data:  # saved before models recorded their pixel scale (spd.cameras.scale)
        warnings.warn(f"{folder / CONFIG_FILE}: no image_long_side recorded (saved before the field existed): "
                      f"images are fed at {DEFAULT_LONG_SIDE} px long side, NYU's frames; set it in config.json if "
                      "the model was trained at another size", UserWarning, stacklevel=3)
        data["image_long_side"] = DEFAULT_LONG_SIDE
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE}: not an SPD model config ({err})") from err


def load_model(path: str | Path, device: str | torch.device = "cpu") -> SPD:
    """Loads an SPD model folder (or a Hugging Face Hub id) in eval mode: the one loader behind
    `spd.load_model`, `SPD.from_pretrained`, `Predictor.from_pretrained` and the CLI.

    Strict: every tensor must be present with the right shape; a truncated or tampered file
    raises CheckpointError naming the file and the problem.
    """
    folder = resolve_model_folder(path)
    config = read_model_config(folder)
    verify_weights_checksum(folder, read_config_dict(folder))
    return build_with_weights(lambda: SPD(config, warn_random_encoder=False), folder, device)
