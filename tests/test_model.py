"""The v15 model: shapes, gradients, masking, order independence, bad input (issue 2)."""

import warnings

import pytest
import timm
import torch

import spd
from conftest import random_queries


@pytest.mark.parametrize("k", [1, 256, 4096])
@pytest.mark.parametrize("hw", [(65, 97), (96, 128)])
def test_output_shapes(tiny_model, k, hw):
    height, width = hw
    images = torch.randn(2, 3, height, width)
    queries = random_queries(2, k, height, width)
    with torch.no_grad():
        depth = tiny_model(images, queries)
    assert depth.shape == (2, k)
    assert torch.isfinite(depth).all()


def test_aux_output_shapes(tiny_model):
    images = torch.randn(2, 3, 65, 97)
    queries = random_queries(2, 7, 65, 97)
    with torch.no_grad():
        out = tiny_model(images, queries, return_aux=True)
    assert out["depth"].shape == (2, 7)
    assert out["canvas_depth"].shape == (2, 1, 17, 25)  # ceil(65/4), ceil(97/4)
    assert out["ldrm_patch_depth"].shape == (2, 7, 28, 28)


def test_every_parameter_gets_a_gradient():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = spd.build_model("v15-tiny")
    images = torch.randn(2, 3, 64, 96)
    queries = random_queries(2, 16, 64, 96)

    def backward() -> None:
        out = model(images, queries, return_aux=True)
        terms = (out["depth"], out["canvas_depth"], out["ldrm_patch_depth"])
        sum(t.log().square().mean() for t in terms).backward()

    # Deformable-DETR initialisation zeroes the offset/weight projections, so the MSDA input
    # norms see no gradient before the first update: take one step, then check every parameter.
    backward()
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    model.zero_grad()
    backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not (p.grad != 0).any()]
    assert not missing, f"parameters without a non-zero gradient: {missing}"


def test_padded_queries_change_no_real_query(tiny_model):
    images = torch.randn(2, 3, 64, 96)
    real = random_queries(2, 10, 64, 96)
    junk = random_queries(2, 6, 64, 96)
    junk[0, 0] = float("nan")  # padding may hold anything
    junk[1, 1] = 1e6
    queries = torch.cat([real, junk], dim=1)
    mask = torch.cat([torch.ones(2, 10, dtype=torch.bool), torch.zeros(2, 6, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        alone = tiny_model(images, real)
        padded = tiny_model(images, queries, mask)
    assert torch.allclose(padded[:, :10], alone, atol=1e-6, rtol=0)
    assert (padded[:, 10:] == 0).all()


def test_depth_does_not_depend_on_query_order(tiny_model):
    images = torch.randn(1, 3, 64, 96)
    queries = random_queries(1, 50, 64, 96)
    perm = torch.randperm(50)
    with torch.no_grad():
        depth = tiny_model(images, queries)
        permuted = tiny_model(images, queries[:, perm])
    torch.testing.assert_close(permuted, depth[:, perm], rtol=1e-5, atol=1e-6)


def test_batch_elements_are_independent(tiny_model):
    images = torch.randn(2, 3, 64, 96)
    queries = random_queries(2, 20, 64, 96)
    with torch.no_grad():
        together = tiny_model(images, queries)
        first = tiny_model(images[:1], queries[:1])
        changed = images.clone()
        changed[1] = torch.randn(3, 64, 96)
        other = tiny_model(changed, queries)
    torch.testing.assert_close(together[:1], first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other[0], together[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda q: q.index_put_((torch.tensor(0), torch.tensor(3)), torch.tensor([float("nan"), 1.0])), "query 3 of image 0"),
        (lambda q: q.index_put_((torch.tensor(1), torch.tensor(5)), torch.tensor([96.0, 1.0])), "query 5 of image 1"),
        (lambda q: q.index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor([3.0, -0.6])), "query 2 of image 1"),
        (lambda q: q[..., :1], "shape"),
        (lambda q: q[0], "shape"),
    ],
)
def test_bad_queries_raise_value_error(tiny_model, bad, message):
    images = torch.randn(2, 3, 64, 96)
    queries = bad(random_queries(2, 8, 64, 96))
    with pytest.raises(ValueError, match=message):
        tiny_model(images, queries)


def test_border_queries_are_accepted(tiny_model):
    images = torch.randn(1, 3, 64, 96)
    corners = torch.tensor([[[0.0, 0.0], [95.0, 63.0], [-0.5, -0.5], [95.5, 63.5], [0.0, 63.0]]])
    with torch.no_grad():
        depth = tiny_model(images, corners)
    assert torch.isfinite(depth).all()


def test_empty_query_set_returns_empty(tiny_model):
    with torch.no_grad():
        depth = tiny_model(torch.randn(3, 3, 64, 96), torch.zeros(3, 0, 2))
    assert depth.shape == (3, 0)


def test_bad_images_raise(tiny_model):
    with pytest.raises(ValueError, match="shape"):
        tiny_model(torch.randn(3, 64, 96), torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="floating"):
        tiny_model(torch.zeros(1, 3, 64, 96, dtype=torch.uint8), torch.zeros(1, 1, 2))


def test_encoder_is_timm_convnextv2_tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = spd.build_model("v15")
    reference = timm.create_model("convnextv2_tiny", pretrained=False, features_only=True)
    ours = model.encoder.backbone.state_dict()
    theirs = reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    model.encoder.backbone.load_state_dict(theirs)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model.encoder(images), reference(images)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(use_ldrm=False),
        dict(ldrm_patch=5),
        dict(ldrm_patch=9),
        dict(l3_dim=48),
        dict(global_projection=True, q2q_self_attn=True, l4_self_attn_layers=2),
    ],
)
def test_ablation_flags_build_and_run(overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = spd.build_model("v15-tiny", **overrides)
    images = torch.randn(2, 3, 64, 96)
    queries = random_queries(2, 9, 64, 96)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    out = model(images, queries, mask, return_aux=True)
    assert out["depth"].shape == (2, 9)
    if model.ldrm is not None:
        size = 4 * model.config.ldrm_patch
        assert out["ldrm_patch_depth"].shape == (2, 9, size, size)
    with torch.no_grad():
        alone = model(images[1:], queries[1:, :6])
        torch.testing.assert_close(model(images, queries, mask)[1:, :6], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2])
def test_folded_encoder_matches_timm_forward(batch):
    """The eval-mode fast path (GRN folded into fc2) against timm's own forward. At 96x64 the atto
    model's first two stages fold GRN into fc2's weight and the last two (fewer positions than
    channels) scale the activation: both branches; the fast path runs channels-last."""
    from spd.models.encoder import Encoder

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = Encoder("convnextv2_atto").eval()
    assert encoder.foldable
    with torch.no_grad():  # GRN starts as the identity (zero gain and bias): make it do something
        for name, param in encoder.named_parameters():
            if ".grn." in name:
                param.normal_(0, 0.5)
    images = torch.randn(batch, 3, 96, 64)
    with torch.no_grad():
        folded = encoder(images, folded=True)
        unfolded = encoder(images, folded=True, fold_grn=False)  # GRN on the activation: the int8 export's form
        reference = encoder.backbone(images)
    for a, c, b in zip(folded, unfolded, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_sliced_sum_of_squares_equals_one_pass():
    """GRN's spatial sum of squares over slices of positions (the CPU fast path) = one pass."""
    from spd.models.encoder import _spatial_sum_of_squares

    x = torch.randn(2, 5, 6, 8)
    sliced = _spatial_sum_of_squares(x, rows_per_slice=7)  # 30 positions: slices of 7, 7, 7, 7, 2
    torch.testing.assert_close(sliced, (x * x).sum((1, 2)), rtol=1e-6, atol=0)
    assert sliced.dtype == torch.float32
    low = _spatial_sum_of_squares(x.bfloat16(), rows_per_slice=7)
    assert low.dtype == torch.float32  # each slice rounded to bf16 once, summed in fp32
    torch.testing.assert_close(low, (x * x).sum((1, 2)), rtol=2e-2, atol=0)


def test_bf16_layer_norm_outside_autocast_gives_autocasts_numbers(monkeypatch):
    """Under bf16 autocast the folded blocks run LayerNorm on the bf16 conv output directly (no fp32
    round trip): bit-identical features to letting autocast run it in fp32 and cast for fc1."""
    from contextlib import nullcontext

    import spd.models.encoder as encoder_module

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = encoder_module.Encoder("convnextv2_atto").eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        direct = encoder(images, folded=True)
        monkeypatch.setattr(encoder_module, "_low_precision_norm", lambda x: nullcontext())
        round_trip = encoder(images, folded=True)
    assert all(torch.equal(a, b) for a, b in zip(direct, round_trip, strict=True))


def test_one_decision_of_fast_paths(tiny_model):
    """Inference (eval + no autograd) takes the config's fast paths; training or autograd the
    references; asking for a fast path where it is not exact is an error."""
    reference = spd.InferencePaths.reference()
    with torch.no_grad():
        assert tiny_model.inference_paths() == spd.InferencePaths()
        assert tiny_model.inference_paths(reference) == reference
    assert tiny_model.inference_paths() == reference  # autograd on
    with pytest.raises(ValueError, match="no_grad"):
        tiny_model.inference_paths(spd.InferencePaths(encoder=False, decoder=True, ldrm=False))
    tiny_model.train()
    try:
        with torch.no_grad():
            assert tiny_model.inference_paths() == reference  # stochastic depth etc.: timm's forward
    finally:
        tiny_model.eval()


@pytest.mark.parametrize("overrides", [dict(), dict(q2q_self_attn=True, l4_self_attn_layers=1, global_projection=True)])
def test_fast_decode_matches_reference_decode_and_leaves_features_intact(overrides):
    """Inference fast paths (encoder folding, gathers, in-place canvas) == the reference paths."""
    torch.manual_seed(0)
    model = spd.build_model("v15-tiny", warn_random_encoder=False, **overrides).eval()
    with torch.no_grad():  # non-trivial gates, offsets and GRN so that every path does real work
        for name, param in model.named_parameters():
            if any(key in name for key in ("grn", "sampling_offsets.weight", "attention_weights.weight", "gate")):
                param.normal_(0, 0.3)
    images = torch.randn(2, 3, 70, 101)
    queries = torch.rand(2, 37, 2) * torch.tensor([100.0, 69.0]) - 0.25
    mask = torch.rand(2, 37) > 0.2
    with torch.no_grad():
        features = model.encode(images)
        snapshot = [t.clone() for t in (features.l1, features.l2, features.proj_l3, features.proj_l4)]
        fast = model.decode(features, queries, mask)
        fast_aux = model.decode(features, queries, mask, return_aux=True)
        again = model.decode(features, queries, mask)
        paths = spd.InferencePaths.reference()
        reference_features = model.encode(images, paths)
        reference = model.decode(reference_features, queries, mask, paths=paths)
        reference_aux = model.decode(reference_features, queries, mask, return_aux=True, paths=paths)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    for key in ("depth", "canvas_depth"):
        torch.testing.assert_close(fast_aux[key], reference_aux[key], rtol=1e-5, atol=1e-6)
    # Padded queries' patches are not defined (nothing reads them); real ones agree.
    torch.testing.assert_close(fast_aux["ldrm_patch_depth"][mask], reference_aux["ldrm_patch_depth"][mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, fast, rtol=0, atol=0)  # the features were not consumed
    for before, after in zip(snapshot, (features.l1, features.l2, features.proj_l3, features.proj_l4)):
        assert torch.equal(before, after)


def test_decode_in_chunks_returns_each_point_its_own_depth(tiny_model):
    """Shuffled chunks come back in the caller's order: each chunk is decoded on its own, in the
    fixed-seed permutation's order, and every point gets the depth of its own chunk's call."""
    from spd.chunked import decode_in_chunks

    images = torch.randn(1, 3, 64, 96)
    queries = torch.rand(50, 2) * torch.tensor([95.0, 63.0])
    with torch.no_grad():
        features = tiny_model.encode(images)
        chunked = decode_in_chunks(tiny_model, features, queries, chunk_size=16, shuffle_seed=7)
        order = torch.randperm(50, generator=torch.Generator().manual_seed(7))
        by_chunk = torch.cat([tiny_model.decode(features, queries[part][None])[0] for part in order.split(16)])
    torch.testing.assert_close(chunked[order], by_chunk, rtol=0, atol=0)
    assert not torch.equal(order, torch.arange(50))  # the test would not see a lost permutation otherwise


def test_bf16_autocast_inference_runs_the_fast_paths_and_stays_close(tiny_model):
    """`spd bench --dtype bf16` and bf16 serving: the fast paths under CPU autocast give finite
    depths within bf16 precision of fp32."""
    images = torch.randn(1, 3, 64, 96)
    queries = torch.rand(1, 40, 2) * torch.tensor([95.0, 63.0])
    with torch.no_grad():
        reference = tiny_model(images, queries)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny_model(images, queries).float()
            # the reference paths too (the bench times both)
            low_reference = tiny_model(images, queries, paths=spd.InferencePaths.reference()).float()
    for depth in (low, low_reference):
        assert torch.isfinite(depth).all()
        assert ((depth - reference).abs() / reference).max() < 0.1
