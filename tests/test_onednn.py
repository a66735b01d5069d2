"""Linear layers through oneDNN at inference (`spd.models.onednn`, issue 13): the same numbers as
`F.linear`, taken only where they may be, counted by the FLOP counter, routed for the baseline."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from spd.models import onednn
from spd.models.onednn import OneDNNLinears, linear, onednn_available, onednn_runs, takes_onednn

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build or CPU has no oneDNN linear kernel")
SLOWER_THAN_F_LINEAR = onednn._slower_than_f_linear  # the rule itself, before the fixture below replaces it


@pytest.fixture(autouse=True)
def onednn_fp32_wherever_it_runs(monkeypatch):
    """These tests hold oneDNN's kernel equal to F.linear, so they take it even where the routing rule
    prefers MKL's faster sgemm for fp32 (below AVX-512); `test_below_avx512_...` tests that rule."""
    monkeypatch.setattr(onednn, "_slower_than_f_linear", lambda dtype: False)

KERNEL = "mkldnn::_linear_pointwise"


def ran_onednn(fn) -> tuple[torch.Tensor, bool]:
    """fn()'s result, and whether oneDNN's linear kernel ran inside it."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any(event.name == KERNEL for event in prof.events())


def reference(x, weight, bias, gelu):
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_linear_equals_f_linear_and_runs_onednn(gelu, with_bias):
    torch.manual_seed(0)
    x, weight = torch.randn(2, 9, 7, 48), torch.randn(96, 48) / 48**0.5
    bias = torch.randn(96) if with_bias else None
    with torch.inference_mode():
        assert takes_onednn(x)
        out, onednn = ran_onednn(lambda: linear(x, weight, bias, gelu=gelu))
        expected = reference(x, weight, bias, gelu)
    assert onednn
    assert out.shape == (2, 9, 7, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_bf16_autocast_linear_is_autocasts_linear():
    """Under bf16 autocast the operands are cast as autocast casts them (fp32 weight and bias too):
    a bf16 result within bf16 rounding of autocast's own `F.linear` (the GELU fused in fp32 is, if
    anything, closer to the fp32 value)."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(300, 64), torch.randn(128, 64) / 8, torch.randn(128)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, onednn = ran_onednn(lambda: linear(x, weight, bias, gelu=True))
        expected = reference(x, weight, bias, gelu=True)
    assert onednn == onednn_runs(torch.bfloat16)  # F.linear where oneDNN has no bf16 inner product (AVX2)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_autograd_and_other_dtypes_take_f_linear():
    """oneDNN's kernel has no backward: under autograd `linear` is `F.linear` and trains."""
    x, weight = torch.randn(5, 8), torch.randn(4, 8, requires_grad=True)
    assert not takes_onednn(x)  # grad mode is on
    out, onednn = ran_onednn(lambda: linear(x, weight, gelu=True))
    assert not onednn
    out.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    with torch.inference_mode():
        assert not takes_onednn(x.double())
        torch.testing.assert_close(linear(x.double(), weight.double()), F.linear(x.double(), weight.double()))


def test_compiled_linear_traces_f_linear_in_one_graph():
    """Under torch.compile (and torch.export) the graph's own kernels decide: one graph, same numbers."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(16, 32), torch.randn(24, 32), torch.randn(24)
    compiled = torch.compile(lambda a: linear(a, weight, bias, gelu=True), fullgraph=True, backend="eager")
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), reference(x, weight, bias, True), rtol=1e-5, atol=1e-5)


def test_onednn_linears_routes_nn_linear_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    x = torch.randn(3, 32)
    with torch.inference_mode():
        expected = net(x)

        def routed():
            with OneDNNLinears():
                return net(x)

        out, onednn = ran_onednn(routed)
    assert onednn
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_flop_counter_counts_the_onednn_kernel_as_a_matmul():
    assert onednn.register_flop_formula()  # what `spd bench` calls before counting
    x, weight = torch.randn(2, 10, 32), torch.randn(24, 32)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        linear(x, weight, gelu=True)
    assert counter.get_total_flops() == 2 * 20 * 32 * 24


def test_feed_forward_fused_gelu_equals_its_layers_in_sequence():
    from spd.models.feedforward import FeedForward

    torch.manual_seed(0)
    ffn, x = FeedForward(16, 64).eval(), torch.randn(2, 5, 16)
    expand, act, contract = ffn
    with torch.inference_mode():
        torch.testing.assert_close(ffn(x), contract(act(expand(x))), rtol=1e-5, atol=1e-6)
    x.requires_grad_(True)
    ffn(x).sum().backward()  # training: F.linear and an out-of-place GELU
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_model_decodes_the_same_through_onednn_as_through_f_linear(tiny_model):
    """The whole model on its reference paths: inference (oneDNN linears) = autograd on (F.linear)."""
    from conftest import random_queries
    from spd.models.paths import InferencePaths

    torch.manual_seed(0)
    images, queries = torch.randn(1, 3, 64, 96), random_queries(1, 40, 64, 96)
    reference = InferencePaths.reference()
    with torch.no_grad():
        through_onednn = tiny_model(images, queries, paths=reference)
    through_f_linear = tiny_model(images, queries, paths=reference).detach()  # grad mode on
    torch.testing.assert_close(through_onednn, through_f_linear, rtol=1e-5, atol=1e-6)


def test_mismatched_dtypes_outside_autocast_fail_as_f_linear_does():
    x, weight = torch.randn(3, 8), torch.randn(4, 8).bfloat16()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="dtype"):
        linear(x, weight)


# --- the routing rule (issue 26) -------------------------------------------------------------------
@pytest.fixture
def fresh_routing(monkeypatch):
    """The rule's per-process decisions forgotten before and after the test."""
    def forget():
        onednn.onednn_available.cache_clear()
        onednn.kernel_problem.cache_clear()
        onednn._failed.clear()

    forget()
    yield monkeypatch
    forget()


def test_a_cpu_without_bf16_instructions_runs_f_linear_with_one_warning(fresh_routing):
    fresh_routing.setattr(onednn, "_bf16_instructions", lambda: False)
    torch.manual_seed(0)
    x, weight, bias = torch.randn(30, 64), torch.randn(128, 64) / 8, torch.randn(128)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(RuntimeWarning, match="no bf16 inner product"):
            out, ran = ran_onednn(lambda: linear(x, weight, bias, gelu=True))
        expected = reference(x, weight, bias, gelu=True)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process: the second call is quiet
            linear(x, weight, bias)
    assert not ran
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert onednn.kernel_report() == {"fp32": "oneDNN", "bf16": "F.linear"}


def test_a_kernel_that_fails_mid_run_falls_back_to_f_linear_for_good(fresh_routing):
    def broken(*args):
        raise RuntimeError("could not create a primitive descriptor for the inner product")

    onednn_runs(torch.float32)  # probe with the real kernel first: only the later call fails
    fresh_routing.setattr(onednn, "fused_linear_kernel", lambda: broken)
    x, weight = torch.randn(5, 8), torch.randn(4, 8)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="primitive descriptor"):
        out = linear(x, weight, gelu=True)
    torch.testing.assert_close(out, F.gelu(F.linear(x, weight)))
    assert not onednn_runs(torch.float32)


def test_an_arm_cpu_is_sent_to_the_plain_ops(fresh_routing):
    fresh_routing.setattr(onednn.platform, "machine", lambda: "aarch64")
    assert not onednn_runs(torch.float32) and not onednn_runs(torch.bfloat16)
    with torch.inference_mode():
        assert not takes_onednn(torch.randn(3, 8))


def test_import_spd_and_the_flop_formula_survive_a_torch_without_its_private_flop_registry():
    """`import spd` touches no private torch API; the bench's FLOP formula degrades to False."""
    import subprocess
    import sys

    code = ("import torch.utils.flop_counter as fc; del fc.flop_registry; import spd; "
            "from spd.models.onednn import register_flop_formula; print(register_flop_formula())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False"]


def test_below_avx512_fp32_takes_f_linear_quietly_as_the_faster_kernel(fresh_routing):
    import warnings

    fresh_routing.setattr(onednn, "_slower_than_f_linear", lambda dtype: dtype == torch.float32)
    x, weight = torch.randn(6, 16), torch.randn(8, 16)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a speed choice is not a failure: no warning
        assert not takes_onednn(x)
        out, ran = ran_onednn(lambda: linear(x, weight, gelu=True))
    assert not ran
    torch.testing.assert_close(out, F.gelu(F.linear(x, weight)))


@pytest.mark.parametrize("setting, capped", [
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, True), ({"ONEDNN_MAX_CPU_ISA": "sse41"}, True), ({"DNNL_MAX_CPU_ISA": "AVX2_VNNI"}, True),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, False), ({"ONEDNN_MAX_CPU_ISA": "ALL"}, False), ({}, False),
])
def test_a_onednn_capped_below_avx512_sends_fp32_to_f_linear(fresh_routing, setting, capped):
    """oneDNN capped by its own setting while PyTorch still runs AVX-512 (what the issue-26 matrix
    emulates): its fp32 inner product is the slower kernel there, so fp32 takes F.linear; bf16 is
    decided by its own instruction check, untouched here."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        fresh_routing.delenv(name, raising=False)
    for name, value in setting.items():
        fresh_routing.setenv(name, value)
    fresh_routing.setattr(onednn, "_avx512", lambda: True)
    onednn._onednn_capped_below_avx512.cache_clear()
    try:
        assert SLOWER_THAN_F_LINEAR(torch.float32) is capped
        assert SLOWER_THAN_F_LINEAR(torch.bfloat16) is False
    finally:
        onednn._onednn_capped_below_avx512.cache_clear()
