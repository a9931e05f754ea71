"""The CUDA kernels of ops/msda_cuda_kernels.cuh, run on the CPU emulator (tests/cuda_emu),
against the CPU op; and mutants of those kernels, which these checks must catch."""

from __future__ import annotations

import platform

import pytest
import torch

import dino_scale.ops as msda_ops
from emulated_cuda import EMU, KERNELS, CompileError, EmulatedMsda, EmulatorError, build_libraries, compile_command
from test_msda import _run, make_inputs, with_non_finite_locations

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64", reason="cuda_emu is x86-64 only"),
    pytest.mark.skipif(msda_ops.NATIVE is None, reason="no CPU op to compare with"),
]

# Deliberately broken kernels: (replaced text, replacement, occurrences).
MUTANTS = {
    "block-size-not-a-multiple-of-32": [
        ("constexpr int kThreads = 256;", "constexpr int kThreads = 100;", 1),
        ("static_assert(kThreads % kWarp == 0", "// static_assert(kThreads % kWarp == 0", 1),
    ],
    "lane-returns-before-a-shuffle": [
        ("const bool active = c < D;", "const bool active = c < D;\n    if (!active) return;", 1),
    ],
    "height-and-width-swapped": [
        ("shapes[2 * l])", "shapes[@])", 2),
        ("shapes[2 * l + 1])", "shapes[2 * l])", 2),
        ("shapes[@])", "shapes[2 * l + 1])", 2),
    ],
    "channel-chunk-overwritten": [
        ("grad_weights[s] += sg.grad_attn;", "grad_weights[s] = sg.grad_attn;", 1),
        ("grad_locations[2 * s] += sg.grad_loc_x;", "grad_locations[2 * s] = sg.grad_loc_x;", 1),
        ("grad_locations[2 * s + 1] += sg.grad_loc_y;",
         "grad_locations[2 * s + 1] = sg.grad_loc_y;", 1),
    ],
}


BLOCK_SIZE = "block-size-not-a-multiple-of-32"


def _mutate(source: str, replacements) -> str:
    for old, new, count in replacements:
        assert source.count(old) == count, f"{old!r} occurs {source.count(old)} times, not {count}"
        source = source.replace(old, new)
    return source


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """The emulated kernels and every mutant, compiled concurrently once."""
    out = tmp_path_factory.mktemp("msda_emu")
    jobs = {"kernels": compile_command(EMU / "msda_emu.cpp", out / "msda_emu.so")}
    for name, replacements in MUTANTS.items():
        folder = out / name
        folder.mkdir()
        (folder / KERNELS.name).write_text(_mutate(KERNELS.read_text(), replacements))
        jobs[name] = compile_command(EMU / "msda_emu.cpp", folder / "msda_emu.so", [folder])
    folder = out / "static-assert"
    folder.mkdir()
    (folder / KERNELS.name).write_text(_mutate(KERNELS.read_text(), MUTANTS[BLOCK_SIZE][:1]))
    jobs["static-assert"] = [
        *compile_command(EMU / "msda_emu.cpp", folder / "msda_emu.so", [folder]), "-fsyntax-only"]
    return build_libraries(jobs)


@pytest.fixture(scope="module")
def emulated(libraries) -> EmulatedMsda:
    if isinstance(libraries["kernels"], CompileError):
        raise libraries["kernels"]
    return EmulatedMsda(libraries["kernels"])


def _cpu(*args):
    return torch.ops.dino_scale.ms_deform_attn_forward(*args)


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2 * torch.finfo(dtype).eps)


def mismatch(emulated: EmulatedMsda, inputs) -> str | None:
    """How the emulated kernels' output and gradients differ from the CPU op's, if they do."""
    dtype = inputs[0].dtype
    out, grads = _run(emulated.function(), inputs)
    cpu_out, cpu_grads = _run(_cpu, inputs)
    tol = _tolerance(dtype)
    named = [("output", out, cpu_out, tol)] + [
        (f"grad {name}", g, c, tol if g.dtype == dtype else 1e-4)
        for name, g, c in zip(("value", "sampling_locations", "attention_weights"), grads,
                              cpu_grads)
    ]
    for name, got, want, t in named:
        try:
            torch.testing.assert_close(got, want, rtol=t, atol=t)
        except AssertionError as exc:
            return f"{name}: {exc}"
    return None


def _inputs(dtype=torch.float32, **kwargs):
    shape = dict(batch=2, queries=6, heads=3, channels=5, levels=((5, 4), (3, 2), (2, 3)),
                 points=3, margin=0.2)
    shape.update(kwargs)
    loc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return make_inputs(dtype=dtype, loc_dtype=loc_dtype, **shape)


@pytest.mark.parametrize("channels", [1, 5, 33, 48, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_emulated_kernels_match_the_cpu_op(emulated, dtype, channels):
    assert mismatch(emulated, _inputs(dtype, channels=channels)) is None


CASES = {
    "one-level": dict(levels=((6, 5),), points=4),
    "points-outside-the-image": dict(margin=1.5),
    "no-batch": dict(batch=0),
    "no-queries": dict(queries=0),
    "empty-value": dict(levels=((0, 0),)),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_emulated_kernels_match_the_cpu_op_on_edge_shapes(emulated, case):
    assert mismatch(emulated, _inputs(**CASES[case])) is None


@pytest.mark.parametrize("channels", [5, 48])
def test_emulated_kernels_match_the_cpu_op_on_non_finite_locations(emulated, channels):
    inputs, _ = with_non_finite_locations(_inputs(channels=channels))
    assert mismatch(emulated, inputs) is None


def test_float64_gradcheck_through_the_emulated_kernels(emulated):
    value, shapes, starts, loc, weights = make_inputs(batch=1, queries=2, heads=1, channels=33,
                                                      levels=((2, 2), (1, 2)), points=2,
                                                      margin=0.3)
    op = emulated.function()
    assert torch.autograd.gradcheck(
        lambda v, locations, w: op(v, shapes, starts, locations, w),
        (value.requires_grad_(), loc.requires_grad_(), weights.requires_grad_()),
    )


def test_a_grid_beyond_cuda_limits_is_refused_before_launch(emulated):
    inputs = _inputs()
    # The kernels are told of 2^32 queries; the tensors stay small, as nothing is read.
    geometry = EmulatedMsda._geometry(inputs[0], inputs[3])
    geometry[6] = 1 << 32
    with pytest.raises(EmulatorError, match=r"sampling_locations .* N \* Lq \* M = 25769803776"):
        emulated.forward(*inputs, geometry=geometry)


def test_the_static_assert_refuses_a_block_size_that_is_not_whole_warps(libraries):
    failure = libraries["static-assert"]
    assert isinstance(failure, CompileError), "a block of 100 threads compiled"
    assert "a block must be whole warps" in str(failure)


@pytest.mark.parametrize("mutant", MUTANTS, ids=list(MUTANTS))
def test_each_broken_kernel_is_caught(libraries, mutant):
    library = libraries[mutant]
    assert not isinstance(library, CompileError), library
    broken = EmulatedMsda(library)
    caught = []
    for channels in (5, 48):
        try:
            caught.append(mismatch(broken, _inputs(channels=channels)))
        except EmulatorError as exc:
            caught.append(f"emulator: {exc}")
    assert any(caught), f"{mutant} passed every check"
    print(f"{mutant}: {next(c for c in caught if c)[:300]}")
