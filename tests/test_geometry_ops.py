"""Coordinate convention, MSDA against a plain reference, LDRM alignment and fast path (issue 2)."""

import pytest
import torch

from spd.geometry.coords import padded_size, pixel_to_grid
from spd.models.rows import RowLayout, bag_sum, build_row_table, level_index, map_view, query_rows
from spd.models.splat import bilinear_splat, make_splat_plan, sample_at
from spd.models.ldrm import LocalRefinement, _upsample2
from spd.models.msda import MSDeformableAttention, msda_aggregate_reference


@pytest.mark.parametrize("stride", [4, 8, 16, 32])
def test_query_reads_the_cell_under_its_pixel(stride):
    height, width = 70, 101  # odd sizes: padded to 96 x 128 inside the model
    pad_h, pad_w = padded_size(height, width)
    cells_h, cells_w = pad_h // stride, pad_w // stride
    # A map whose value is the cell's own column / row index.
    cols = torch.arange(cells_w, dtype=torch.float64).expand(cells_h, cells_w)
    rows = torch.arange(cells_h, dtype=torch.float64)[:, None].expand(cells_h, cells_w)
    feature = torch.stack([cols, rows])[None]  # (1, 2, h, w)
    u, v = torch.meshgrid(torch.arange(width, dtype=torch.float64), torch.arange(height, dtype=torch.float64), indexing="xy")
    queries = torch.stack([u.flatten(), v.flatten()], -1)[None]  # every pixel of the image
    sampled = sample_at(feature, pixel_to_grid(queries, (pad_h, pad_w)))[0]
    # Bilinear sampling of a linear ramp is exact: the continuous cell coordinate of pixel u.
    expected = (queries[0] + 0.5) / stride - 0.5
    interior = (expected >= 0).all(-1) & (expected[:, 0] <= cells_w - 1) & (expected[:, 1] <= cells_h - 1)
    torch.testing.assert_close(sampled[interior], expected[interior])
    # ... and the nearest cell centre is the cell under the pixel.
    torch.testing.assert_close(sampled[interior].round(), torch.floor(queries[0][interior] / stride))


def test_splat_is_the_adjoint_of_sampling():
    feature = torch.randn(2, 5, 6, 9, dtype=torch.float64)
    grid = torch.rand(2, 11, 2, dtype=torch.float64) * 2.4 - 1.2  # some points outside
    values = torch.randn(2, 11, 5, dtype=torch.float64)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 3] = False
    weighted, _ = bilinear_splat(values, grid, mask, (6, 9))
    # <splat(values), feature> == <values, sample(feature)> over the real queries.
    lhs = (weighted * feature).sum()
    rhs = (values * sample_at(feature, grid) * mask[..., None]).sum()
    torch.testing.assert_close(lhs, rhs)


def _rows_plan(maps: list[torch.Tensor], grid: torch.Tensor, mask: torch.Tensor):
    """A row table of four d-wide maps, the queries' QueryRows on it (canvas = maps 1..3) and the
    LevelIndex of a 2-head MSDA reading the four maps."""
    table, layout, views = build_row_table(maps)
    seed_index = level_index(layout, [0, 1, 2, 3], grid.device)
    extent = torch.tensor([[w, h] for h, w in layout.sizes], dtype=grid.dtype).view(4, 1, 2)
    start, stop = layout.offsets[1], layout.offsets[3] + layout.rows(3)
    plan = query_rows(grid, mask, seed_index, extent, start, stop - start, (2, 4 * 4 * 4))
    return table, layout, views, level_index(layout, [0, 1, 2, 3], grid.device, heads=2, points=4), plan


def test_row_reads_match_grid_sample_with_points_outside():
    """corner_rows + one embedding_bag over the row table == F.grid_sample (zeros padding) on every level."""
    torch.manual_seed(0)
    maps = [torch.randn(2, 5, h, w) for h, w in [(12, 18), (6, 9), (3, 5), (2, 3)]]
    grid = torch.rand(2, 11, 2) * 2.4 - 1.2  # some points outside
    mask = torch.ones(2, 11, dtype=torch.bool)
    table, _, views, _, plan = _rows_plan(maps, grid, mask)
    for view, original in zip(views, maps):
        assert torch.equal(view, original)  # the views are the maps
    read = bag_sum(table, plan.seed_rows, plan.seed_weights, plan.starts4).view(2, 11, 4, 5)
    for level, original in enumerate(maps):
        torch.testing.assert_close(read[:, :, level], sample_at(original, grid))


def test_canvas_rows_path_matches_reference_write_cascade_smooth_read():
    """CanvasSublayer.forward_rows (in place on one buffer) == forward (dense splats, grid_sample)."""
    from spd.models.canvas import CanvasSublayer

    torch.manual_seed(0)
    canvas = CanvasSublayer(8)
    with torch.no_grad():
        for param in canvas.parameters():
            param.normal_(0, 0.3)
    maps = [torch.randn(2, 8, h, w) for h, w in [(12, 18), (6, 9), (3, 5), (2, 3)]]
    grid = torch.rand(2, 11, 2) * 2 - 1
    mask = torch.rand(2, 11) > 0.2
    h = torch.randn(2, 11, 8)
    table, layout, _, _, plan = _rows_plan(maps, grid, mask)
    with torch.no_grad():
        plans = [make_splat_plan(grid, mask, m.shape[-2:]) for m in maps[1:]]
        reference, reference_maps = canvas(h, grid, plans, maps[1:])
        start, stop = layout.offsets[1], layout.offsets[3] + layout.rows(3)
        buffer = table[start:stop].clone()
        shifted = RowLayout(layout.sizes[1:], tuple(o - start for o in layout.offsets[1:]), 2)
        views = [map_view(buffer, shifted, i) for i in range(3)]
        fast = canvas.forward_rows(h, plan, buffer, views)
    torch.testing.assert_close(fast[mask], reference[mask], rtol=1e-5, atol=1e-5)
    for view, expected in zip(views, reference_maps):
        torch.testing.assert_close(view, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_queries", [1, 300, 3000])
def test_exported_canvas_write_forms_equal_the_exact_sum_with_shared_cells_and_a_large_offset(num_queries):
    """The exported graphs' canvas write (the touched rows below `PREFIX_WRITE_FROM_K` queries, blocked
    prefix sums over all rows from there; both forms at every size) == the exact (float64) sum of the
    same contributions, where most queries share a few cells and every value carries a large common
    offset: a float32 prefix over all contributions would lose the rows' sums there (its error grows
    with the prefix); the blocked one stays within three float32 roundings of the largest row sum (the
    sum's, the in-block difference's and the canvas addition's), with no absolute slack, where a float32
    `index_add_`'s error grows with the contributions per row (above the blocked one's from K = 300)."""
    from spd.models.rows import (PREFIX_BLOCK, PREFIX_WRITE_FROM_K, add_rows, blocked_prefix_canvas_sum,
                                 canvas_write_forms, exported_canvas_write, touched_rows_canvas_write)

    generator = torch.Generator().manual_seed(0)
    canvas_size, width = 500, 16
    crowded = torch.randint(0, 4, (num_queries * 12,), generator=generator)  # 4 cells take 3/4 of the writes
    anywhere = torch.randint(0, canvas_size, (num_queries * 12,), generator=generator)
    canvas_rows = torch.where(torch.rand(num_queries * 12, generator=generator) < 0.75, crowded, anywhere)
    soft_beta = torch.rand(1, num_queries, 3, 4, 1, generator=generator)
    written = 1000.0 + torch.randn(num_queries, width, generator=generator)
    canvas = torch.randn(canvas_size, width, generator=generator)
    contributions = (written.double()[:, None, None, :] * soft_beta[0].double()).reshape(-1, width)
    exact = add_rows(torch.zeros(canvas_size, width, dtype=torch.float64), canvas_rows, contributions)
    forms = canvas_write_forms(canvas_rows, soft_beta, canvas_size)
    all_rows = canvas + blocked_prefix_canvas_sum(forms.query, forms.weight, forms.through, forms.before, written)
    touched = touched_rows_canvas_write(canvas, forms, written)
    chosen = exported_canvas_write(forms, canvas, written)
    torch.testing.assert_close(chosen, all_rows if num_queries >= PREFIX_WRITE_FROM_K else touched, rtol=0, atol=0)
    index_add_error = (add_rows(torch.zeros(canvas_size, width), canvas_rows, contributions.float()).double() - exact).abs()
    roundings = 3 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    for got in (all_rows, touched):
        assert got.dtype == torch.float32 and got.shape == (canvas_size, width)
        error = ((got.double() - canvas.double()) - exact).abs()
        assert error.max() <= roundings
        if num_queries >= 300:
            assert error.max() < index_add_error.max()
        # each element: float32 rounding of the row sum, plus that of a difference within one block
        block_rounding = 2 * PREFIX_BLOCK * torch.finfo(torch.float32).eps * contributions.abs().max().item()
        torch.testing.assert_close(got.double() - canvas.double(), exact, rtol=1e-6, atol=block_rounding)
        assert torch.equal(got[exact.abs().sum(1) == 0], canvas[exact.abs().sum(1) == 0])  # untouched rows unchanged
    for block in (1, 7, 64):  # any block size, also one that does not divide the contributions
        other = blocked_prefix_canvas_sum(forms.query, forms.weight, forms.through, forms.before, written, block)
        assert (other.double() - exact).abs().max() <= roundings
    if num_queries > 1:
        float32_prefix = (written[forms.query] * forms.weight[:, None]).cumsum(0)
        float32_sums = float32_prefix[forms.through] - float32_prefix[forms.before]
        assert (float32_sums.double() - exact).abs().max() > 1e-1  # why the prefix runs in blocks


def test_touched_rows_write_is_the_same_whatever_the_order_of_duplicate_writes():
    """Every contribution of a row writes that row's whole sum, bitwise the same: ONNX leaves the
    order of ScatterND's duplicate-index writes open, so any order must give the same canvas."""
    from spd.models.rows import blocked_prefix, canvas_write_forms, prefix_difference, touched_rows_update

    generator = torch.Generator().manual_seed(1)
    canvas_rows = torch.randint(0, 6, (40 * 12,), generator=generator)  # 480 writes to 6 rows
    forms = canvas_write_forms(canvas_rows, torch.rand(1, 40, 3, 4, 1, generator=generator), 10)
    offsets, in_block = blocked_prefix(forms.query, forms.weight, torch.randn(40, 8, generator=generator))
    sums = prefix_difference(offsets, in_block, forms.row_through, forms.row_before)
    for row in forms.row.unique():
        same_row = sums[forms.row == row]
        assert torch.equal(same_row, same_row[:1].expand_as(same_row))
    canvas = torch.randn(10, 8, generator=generator)
    reversed_order = torch.arange(forms.row.shape[0] - 1, -1, -1)
    torch.testing.assert_close(touched_rows_update(canvas, forms.row, sums),
                               touched_rows_update(canvas, forms.row[reversed_order], sums[reversed_order]), rtol=0, atol=0)


def _msda(order: str) -> MSDeformableAttention:
    torch.manual_seed(0)
    module = MSDeformableAttention(
        d_model=64, n_heads=2, level_dims=(64, 64, 48, 80), n_points=4, projected_levels=(2, 3), value_proj_order=order
    ).double()
    with torch.no_grad():  # random offsets/weights so that the test sees real deformable sampling
        module.sampling_offsets.weight.normal_(0, 0.5)
        module.attention_weights.weight.normal_(0, 0.5)
    return module


@pytest.mark.parametrize("order", ["project_first", "sample_first", "auto"])
def test_msda_matches_per_level_grid_sample_reference(order):
    module = _msda(order)
    sizes = [(16, 24), (8, 12), (4, 6), (2, 3)]
    maps = [torch.randn(2, c, h, w, dtype=torch.float64) for c, (h, w) in zip((64, 64, 48, 80), sizes)]
    h = torch.randn(2, 13, 64, dtype=torch.float64)
    grid = torch.rand(2, 13, 2, dtype=torch.float64) * 2 - 1
    locations, weights = module.sampling(h, grid, [m.shape[-2:] for m in maps])
    reference = msda_aggregate_reference(module, maps, locations, weights)
    values = module.value_maps(maps)
    torch.testing.assert_close(module.aggregate(values, locations, weights), reference)


def test_msda_rows_path_matches_grid_sample_in_float32_with_points_outside():
    """The inference path (every head's levels x points x corners as one bag of one embedding_bag over
    the row table) against the grid_sample reference, fp32, 1e-5 relative."""
    module = _msda("auto").float()
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(0, 3.0)  # many points land outside the maps
    maps = [torch.randn(3, c, h, w) for c, (h, w) in zip((64, 64, 48, 80), [(15, 21), (8, 11), (4, 6), (2, 3)])]
    h = torch.randn(3, 50, 64)
    grid = torch.rand(3, 50, 2) * 2 - 1
    with torch.no_grad():
        values = module.value_maps(maps)
        table, _, _, index, plan = _rows_plan(values, grid, torch.ones(3, 50, dtype=torch.bool))
        fast = module.forward_rows(h, plan, (table, index))
        reference = module(h, grid, values)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_msda_value_projection_orders_agree_and_gradcheck():
    first, second = _msda("project_first"), _msda("sample_first")
    maps = [torch.randn(1, c, h, w, dtype=torch.float64) for c, (h, w) in zip((64, 64, 48, 80), [(8, 8), (4, 4), (2, 2), (1, 1)])]
    h = torch.randn(1, 5, 64, dtype=torch.float64)
    grid = torch.rand(1, 5, 2, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(first(h, grid, first.value_maps(maps)), second(h, grid, second.value_maps(maps)))
    level3 = maps[2].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m: second(h, grid, second.value_maps([maps[0], maps[1], m, maps[3]])), (level3,)
    )
    assert torch.autograd.gradcheck(
        lambda m: first(h, grid, first.value_maps([maps[0], maps[1], m, maps[3]])), (level3,)
    )


def _ramp_l1(cells_h: int, cells_w: int) -> torch.Tensor:
    """An L1 map whose two channels are the pixel x and y of each cell's centre."""
    x = torch.arange(cells_w, dtype=torch.float64) * 4 + 1.5
    y = torch.arange(cells_h, dtype=torch.float64) * 4 + 1.5
    return torch.stack([x.expand(cells_h, cells_w), y[:, None].expand(cells_h, cells_w)])[None]


def test_ldrm_feat28_pixel_alignment():
    ldrm = LocalRefinement(in_dim=2, mid_dim=4, out_dim=4, patch=7).double()
    l1 = _ramp_l1(30, 40)  # a 120 x 160 image
    queries = torch.tensor([[[50.0, 60.0], [61.3, 47.9], [80.7, 70.2], [63.99, 52.0]]], dtype=torch.float64)
    origin = ldrm.patch_origin(queries)  # (c0, r0) in cells
    patches = ldrm.gather_patch_cells(l1, origin, 7)
    up = _upsample2(_upsample2(patches))  # the two bilinear x2 steps of LDRM: (K, 2, 28, 28)
    i = torch.arange(28, dtype=torch.float64)
    for k in range(queries.shape[1]):
        c0, r0 = origin[0, k].tolist()
        expected_x = (4 * c0 + i).expand(28, 28)
        expected_y = (4 * r0 + i)[:, None].expand(28, 28)
        torch.testing.assert_close(up[k, 0, 3:25, 3:25], expected_x[3:25, 3:25])
        torch.testing.assert_close(up[k, 1, 3:25, 3:25], expected_y[3:25, 3:25])
    # The query sits inside the patch's central cell: offset (u mod 4) + 12.
    offset = queries[0] - 4 * origin[0].double()
    torch.testing.assert_close(offset, torch.remainder(queries[0], 4) + 12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("patch", [5, 7, 9])
def test_ldrm_fast_path_matches_full_patch(patch, dtype):
    torch.manual_seed(0)
    ldrm = LocalRefinement(in_dim=8, mid_dim=6, out_dim=5, patch=patch).to(dtype)
    l1 = torch.randn(2, 8, 12, 16, dtype=dtype)  # a 48 x 64 image
    queries = torch.rand(2, 40, 2, dtype=dtype) * torch.tensor([64.0, 48.0], dtype=dtype) - 0.5  # borders too
    table, layout, (l1_view,) = build_row_table([l1])
    with torch.no_grad():
        full, _ = ldrm(l1, queries)
        fast, _ = ldrm(l1_view, queries, rows=(table, level_index(layout, [0], l1.device)))
    atol = 1e-10 if dtype == torch.float64 else 1e-5 * float(full.abs().max())
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=atol)


def test_ldrm_gather_zeros_outside_the_map():
    ldrm = LocalRefinement(in_dim=1, mid_dim=2, out_dim=2, patch=7)
    l1 = torch.ones(1, 1, 4, 4)
    patches = ldrm.gather_patch_cells(l1, ldrm.patch_origin(torch.tensor([[[0.0, 0.0]]])), 7)
    assert patches[0, 0, 3:, 3:].eq(1).all()
    assert patches[0, 0, :3].eq(0).all()
    assert patches[0, 0, :, :3].eq(0).all()
