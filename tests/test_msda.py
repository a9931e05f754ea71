"""The native multi-scale deformable attention op against the grid_sample reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dino_scale.ops as msda_ops
from dino_scale.ops import accumulate_dtype, ms_deform_attn, ms_deform_attn_reference


def make_inputs(
    batch: int = 2,
    queries: int = 5,
    heads: int = 2,
    channels: int = 3,
    levels: tuple[tuple[int, int], ...] = ((4, 5), (2, 3)),
    points: int = 2,
    dtype: torch.dtype = torch.float64,
    loc_dtype: torch.dtype | None = None,
    margin: float = 0.25,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[torch.Tensor, ...]:
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights).

    Locations are uniform in [-margin, 1 + margin], so with margin > 0 some samples have
    corners (or their whole footprint) outside the map.
    """
    gen = torch.Generator().manual_seed(seed)
    loc_dtype = loc_dtype or dtype
    spatial_shapes = torch.tensor(levels, dtype=torch.int64).reshape(-1, 2)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    value_len = int(areas.sum())
    n_levels = len(levels)
    value = torch.randn(batch, value_len, heads, channels, generator=gen, dtype=torch.float64)
    loc = torch.rand(batch, queries, heads, n_levels, points, 2, generator=gen, dtype=torch.float64)
    loc = loc * (1 + 2 * margin) - margin
    weights = torch.rand(batch, queries, heads, n_levels, points, generator=gen, dtype=torch.float64)
    return tuple(
        t.to(device=device, dtype=d)
        for t, d in (
            (value, dtype),
            (spatial_shapes, torch.int64),
            (level_start_index, torch.int64),
            (loc, loc_dtype),
            (weights, loc_dtype),
        )
    )


OP = torch.ops.dino_scale.ms_deform_attn_forward.default if msda_ops.NATIVE else None
pytestmark = pytest.mark.skipif(msda_ops.NATIVE is None, reason="native MSDA op not built")

# CPU kernel variants available on this machine (ATEN_CPU_CAPABILITY caps the choice).
ISAS = ["default"]
if sys.platform == "linux" and "avx2" in open("/proc/cpuinfo").read():
    ISAS.append("avx2")
if sys.platform == "linux" and "avx512bw" in open("/proc/cpuinfo").read():
    ISAS.append("avx512")


def _with_grads(inputs):
    value, shapes, starts, loc, weights = inputs
    return (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_())


def _run(fn, inputs, grad_out_seed=1):
    """Output and gradients w.r.t. (value, sampling_locations, attention_weights)."""
    value, shapes, starts, loc, weights = inputs
    leaves = [t.detach().requires_grad_() for t in (value, loc, weights)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return out, grads


def _reference_in_float64(value, shapes, starts, loc, weights):
    """The reference on the float64 copies of (possibly low-precision) inputs."""
    out = ms_deform_attn_reference(value.double(), shapes, starts, loc.double(), weights.double())
    return out.to(value.dtype)


GRADCHECK_CASES = {
    "odd-channels": dict(channels=3, heads=3, levels=((5, 3), (3, 2), (1, 1)), points=3),
    "one-level": dict(levels=((6, 4),), points=4, channels=2),
    "outside-the-map": dict(margin=1.0, channels=2),
    "single-query": dict(queries=1, batch=1),
    "empty-batch": dict(batch=0),
    "wide-static-channels": dict(channels=16, heads=1, queries=2, batch=1),
}


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=list(GRADCHECK_CASES))
def test_gradcheck_float64(case):
    value, shapes, starts, loc, weights = _with_grads(make_inputs(**GRADCHECK_CASES[case]))
    assert torch.autograd.gradcheck(
        lambda v, l, w: ms_deform_attn(v, shapes, starts, l, w), (value, loc, weights)
    )


def test_empty_batch_and_no_queries():
    for kwargs in (dict(batch=0), dict(queries=0)):
        value, shapes, starts, loc, weights = _with_grads(make_inputs(**kwargs))
        out = ms_deform_attn(value, shapes, starts, loc, weights)
        assert out.shape == (value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
        out.sum().backward()
        assert value.grad.shape == value.shape and not value.grad.any()
        assert loc.grad.shape == loc.shape and weights.grad.shape == weights.shape


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("channels", [32, 5, 16, 64])
def test_matches_reference_float32(isa, channels, monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", isa)
    inputs = make_inputs(channels=channels, heads=2, queries=9, levels=((7, 6), (4, 3), (2, 2)),
                         points=3, dtype=torch.float32)
    out, grads = _run(ms_deform_attn, inputs)
    ref_out, ref_grads = _run(ms_deform_attn_reference, inputs)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("value", "locations", "weights"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


def test_matches_reference_float64():
    inputs = make_inputs(channels=7, heads=3, queries=11, levels=((8, 5), (4, 3)), points=4)
    out, grads = _run(ms_deform_attn, inputs)
    ref_out, ref_grads = _run(ms_deform_attn_reference, inputs)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_accumulate_in_float32(dtype, isa, monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", isa)
    # Many queries hit the same pixels: grad_value sums hundreds of terms, which a
    # half-precision accumulator would visibly round.
    inputs = make_inputs(channels=32, heads=2, queries=300, levels=((3, 3), (2, 2)), points=4,
                         dtype=dtype, loc_dtype=torch.float32)
    out, grads = _run(ms_deform_attn, inputs)
    ref_out, ref_grads = _run(_reference_in_float64, inputs)
    assert out.dtype == dtype and grads[0].dtype == dtype
    assert grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, ref_out, rtol=2 * eps, atol=2 * eps)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=2 * eps, atol=2 * eps)
    # Location/weight grads are float32 sums over float32-converted half inputs.
    for g, r in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-3)


def test_mixed_dtypes_are_cast_to_the_accumulate_dtype():
    # autocast hands bfloat16 values with float32 (or float64) locations and weights.
    value, shapes, starts, loc, weights = make_inputs(dtype=torch.bfloat16, loc_dtype=torch.float64)
    loc.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, loc, weights)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert loc.grad.dtype == torch.float64
    assert accumulate_dtype(torch.bfloat16) == torch.float32
    assert accumulate_dtype(torch.float64) == torch.float64


def test_bilinear_semantics_by_hand():
    # One 2x2 level, one head, one channel: the centre of the map averages the four pixels,
    # a pixel centre reads that pixel, and a point on the left edge (half a pixel outside the first centre) reads half of pixel 0.
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 4, 1, 1)
    shapes = torch.tensor([[2, 2]])
    starts = torch.tensor([0])
    loc = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.0, 0.25], [1.5, 1.5]], dtype=torch.float64)
    loc = loc.view(1, 4, 1, 1, 1, 2)
    weights = torch.ones(1, 4, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn(value, shapes, starts, loc, weights).flatten()
    torch.testing.assert_close(out, torch.tensor([2.5, 3.0, 0.5, 0.0], dtype=torch.float64))


def test_all_samples_outside_give_zeros():
    value, shapes, starts, loc, weights = _with_grads(make_inputs())
    with torch.no_grad():
        loc.copy_(loc.sign() * 3 + 2)  # far outside every level
    out = ms_deform_attn(value, shapes, starts, loc, weights)
    out.sum().backward()
    assert not out.any() and not value.grad.any() and not loc.grad.any()
    assert not weights.grad.any()


def with_non_finite_locations(inputs):
    """The inputs with NaN, +inf and -inf in x or y of some sampling locations; and a mask of
    the samples hit."""
    value, shapes, starts, loc, weights = inputs
    loc = loc.clone()
    flat = loc.view(-1, 2)
    for i, (coordinate, bad) in enumerate([(0, float("nan")), (1, float("nan")),
                                           (0, float("inf")), (1, float("-inf")),
                                           (0, float("-inf")), (1, float("inf"))]):
        flat[3 * i + 1, coordinate] = bad
    hit = ~loc.isfinite().all(-1)
    return (value, shapes, starts, loc, weights), hit


@pytest.mark.parametrize("op", [ms_deform_attn, ms_deform_attn_reference],
                         ids=["native", "reference"])
def test_non_finite_locations_sample_nothing_and_get_zero_gradients(op):
    inputs, hit = with_non_finite_locations(make_inputs(channels=4, queries=6, margin=0.1))
    out, (g_value, g_loc, g_weights) = _run(op, inputs)
    value, shapes, starts, loc, weights = inputs
    # The same as giving those samples no weight and a harmless location.
    loc_ok = torch.where(hit[..., None], torch.zeros_like(loc), loc)
    weights_ok = torch.where(hit, torch.zeros_like(weights), weights)
    ref_out, (r_value, r_loc, r_weights) = _run(ms_deform_attn, (value, shapes, starts, loc_ok,
                                                                 weights_ok))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(g_value, r_value)
    assert not g_loc[hit].any() and not g_weights[hit].any()
    torch.testing.assert_close(g_loc[~hit], r_loc[~hit])
    torch.testing.assert_close(g_weights[~hit], r_weights[~hit])


def test_non_contiguous_inputs():
    value, shapes, starts, loc, weights = make_inputs(channels=4, heads=2)
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    loc_t = loc.transpose(0, 1).contiguous().transpose(0, 1)
    assert not value_t.is_contiguous() and not loc_t.is_contiguous()
    torch.testing.assert_close(
        ms_deform_attn(value_t, shapes, starts, loc_t, weights),
        ms_deform_attn(value, shapes, starts, loc, weights),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    value, shapes, starts, loc, weights = make_inputs(
        dtype=dtype, loc_dtype=accumulate_dtype(dtype), channels=4, queries=3
    )
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_())
    torch.library.opcheck(OP, args)


def test_torch_compile_fullgraph():
    value, shapes, starts, loc, weights = make_inputs(dtype=torch.float32, channels=4)

    def loss(v, l, w):
        return (ms_deform_attn(v, shapes, starts, l, w) ** 2).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager_leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]
    compiled_leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]
    expected = loss(*eager_leaves)
    got = compiled(*compiled_leaves)
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected)
    for a, b in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


def _bad(**changes):
    inputs = dict(zip(("value", "spatial_shapes", "level_start_index", "sampling_locations",
                       "attention_weights"), make_inputs()))
    for name, fn in changes.items():
        inputs[name] = fn(inputs[name])
    return inputs


BAD_INPUTS = {
    "value-3d": (_bad(value=lambda t: t[0]), ValueError, "value"),
    "value-int": (_bad(value=lambda t: t.long()), TypeError, "value"),
    "shapes-1d": (_bad(spatial_shapes=lambda t: t.flatten()), ValueError, "spatial_shapes"),
    "shapes-int32": (_bad(spatial_shapes=lambda t: t.int()), TypeError, "spatial_shapes"),
    "starts-wrong-length": (_bad(level_start_index=lambda t: t[:1]), ValueError,
                            "level_start_index"),
    "locations-no-xy": (_bad(sampling_locations=lambda t: t[..., :1]), ValueError,
                        "sampling_locations"),
    "locations-wrong-heads": (_bad(sampling_locations=lambda t: t[:, :, :1]), ValueError,
                              "sampling_locations"),
    "weights-wrong-points": (_bad(attention_weights=lambda t: t[..., :1]), ValueError,
                             "attention_weights"),
    "weights-int": (_bad(attention_weights=lambda t: t.long()), TypeError, "attention_weights"),
    "weights-on-meta": (_bad(attention_weights=lambda t: t.to("meta")), ValueError,
                        "attention_weights is on meta"),
    "shapes-on-meta": (_bad(spatial_shapes=lambda t: t.to("meta")), ValueError,
                       "spatial_shapes is on meta"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_inputs_name_the_argument(case):
    inputs, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        ms_deform_attn(**inputs)


def native_check_cases(device: str = "cpu"):
    """(arguments of the forward op, error it must raise) for inputs only C++ can check."""
    value, shapes, starts, loc, weights = make_inputs(device=device)

    def levels(*rows):
        return torch.tensor(rows, dtype=torch.int64, device=device)

    return [
        ((value, shapes, starts, loc.float(), weights), "sampling_locations must be Double"),
        ((value, shapes, starts + 1, loc, weights), r"level_start_index\[0\]"),
        ((value, shapes * 2, starts * 4, loc, weights), "spatial_shapes sum to"),
        ((value, shapes.int(), starts, loc, weights), "spatial_shapes must be int64"),
        ((value, shapes, starts, loc, weights[:, :2]), "attention_weights must be"),
        ((value, levels([-4, -5], [2, 3]), starts, loc, weights), "spatial_shapes has a negative"),
        ((value, levels([1 << 16, 1 << 15], [2, 3]), starts, loc, weights),
         "spatial_shapes level 0 has 2\\^31 pixels"),
        ((value, levels([1 << 40, 1 << 40], [2, 3]), starts, loc, weights),
         "spatial_shapes level 0 has 2\\^31 pixels"),
    ]


def test_native_checks_name_the_argument():
    """Direct torch.ops calls skip the Python checks; the C++ side still names arguments."""
    value, shapes, starts, loc, weights = make_inputs()
    for args, message in native_check_cases():
        with pytest.raises(RuntimeError, match=message):
            OP(*args)
    out = OP(value, shapes, starts, loc, weights)
    with pytest.raises(RuntimeError, match="grad_output must be"):
        torch.ops.dino_scale.ms_deform_attn_backward(value, shapes, starts, loc, weights, out[:1])


def test_reference_fallback_warns_and_matches(monkeypatch):
    monkeypatch.setattr(msda_ops, "NATIVE", None)
    monkeypatch.setattr(msda_ops, "_NATIVE_ERROR", "ImportError: test")
    monkeypatch.setattr(msda_ops, "_warned_devices", set())
    inputs = make_inputs(dtype=torch.bfloat16, loc_dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="grid_sample reference"):
        out = ms_deform_attn(*inputs)
    torch.testing.assert_close(out, _reference_in_float64(*inputs), rtol=0.02, atol=0.02)


def test_missing_extension_falls_back_with_a_warning(repo_root):
    """Without the installed extension and with the JIT build disabled, importing the package
    warns, names the cause, and the op still works through the reference."""
    script = (
        "import sys, warnings\n"
        "sys.modules['dino_scale.ops._C'] = None\n"  # makes `import dino_scale.ops._C` fail
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import dino_scale.ops as ops\n"
        "assert ops.NATIVE is None, ops.NATIVE\n"
        "messages = [str(w.message) for w in caught]\n"
        "assert any('falls back to the slow grid_sample reference' in m and 'DINO_SCALE_MSDA_JIT=0' in m"
        " for m in messages), messages\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_msda import make_inputs\n"
        "import torch\n"
        "inputs = make_inputs()\n"
        "torch.testing.assert_close(ops.ms_deform_attn(*inputs), ops.ms_deform_attn_reference(*inputs))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "DINO_SCALE_MSDA_JIT": "0"}
    result = subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [32, 48, 5])
def test_cuda_matches_cpu(dtype, channels):
    if not msda_ops.native.has_kernel("CUDA"):
        pytest.fail("CUDA device present but the extension was built without the CUDA kernel")
    inputs = make_inputs(channels=channels, heads=3, queries=64, levels=((9, 7), (5, 4), (2, 3)),
                         points=4, dtype=dtype, loc_dtype=accumulate_dtype(dtype), margin=0.2)
    cpu_out, cpu_grads = _run(ms_deform_attn, inputs)
    cuda_inputs = tuple(t.cuda() for t in inputs)
    cuda_out, cuda_grads = _run(ms_deform_attn, cuda_inputs)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 4 * torch.finfo(dtype).eps)
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, rtol=tol, atol=tol)
    for g, c in zip(cuda_grads, cpu_grads):
        loose = max(tol, 1e-4) if g.dtype != dtype else tol
        torch.testing.assert_close(g.cpu(), c, rtol=loose, atol=loose * 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_on_non_finite_locations():
    inputs, _ = with_non_finite_locations(make_inputs(channels=36, heads=2, dtype=torch.float32))
    cpu_out, cpu_grads = _run(ms_deform_attn, inputs)
    cuda_out, cuda_grads = _run(ms_deform_attn, tuple(t.cuda() for t in inputs))
    for got, want in zip((cuda_out, *cuda_grads), (cpu_out, *cpu_grads)):
        assert got.isfinite().all()
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_checks_levels_and_arguments_like_the_cpu_op():
    for args, message in native_check_cases("cuda"):
        with pytest.raises(RuntimeError, match=message):
            OP(*args)
    value, shapes, starts, loc, weights = make_inputs(device="cuda")
    with pytest.raises(RuntimeError, match=r"level_start_index\[1\]"):
        torch.ops.dino_scale.ms_deform_attn_backward(
            value, shapes, starts * 2, loc, weights, OP(value, shapes, starts, loc, weights))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backward_says_it_is_not_deterministic():
    value, shapes, starts, loc, weights = _with_grads(make_inputs(device="cuda"))
    out = ms_deform_attn(value, shapes, starts, loc, weights)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward_cuda"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gradcheck_and_opcheck():
    value, shapes, starts, loc, weights = _with_grads(
        make_inputs(channels=3, heads=2, margin=0.5, device="cuda")
    )
    assert torch.autograd.gradcheck(
        lambda v, l, w: ms_deform_attn(v, shapes, starts, l, w), (value, loc, weights)
    )
    torch.library.opcheck(OP, (value, shapes, starts, loc, weights))
