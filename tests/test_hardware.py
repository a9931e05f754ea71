"""CPU feature detection and the warning for bf16 on CPUs that only emulate it."""

from __future__ import annotations

import logging

import pytest

from dino_scale.config import Config
from dino_scale.engine import ds_config
from dino_scale.hardware import cpu_features_line, cpu_flags, cpu_has_native_bf16

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n"


@pytest.fixture
def cpuinfo(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / f"cpuinfo{len(list(tmp_path.iterdir()))}"  # cpu_flags caches by path
        path.write_text(text)
        return str(path)
    return write


def test_flags_are_read_from_the_first_processor(cpuinfo):
    assert cpu_flags(cpuinfo(AVX2_ONLY)) == frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
    assert cpu_flags("/nonexistent/cpuinfo") == frozenset()


def test_native_bf16_needs_avx512_bf16_or_amx(cpuinfo):
    assert not cpu_has_native_bf16(cpu_flags(cpuinfo(AVX2_ONLY)))
    assert cpu_has_native_bf16(cpu_flags(cpuinfo(SAPPHIRE)))
    assert cpu_has_native_bf16(frozenset({"amx_bf16"}))


def test_the_features_line_says_what_the_cpu_has_and_lacks(cpuinfo):
    assert cpu_features_line(cpu_flags(cpuinfo(AVX2_ONLY))) == \
        "cpu: avx2 fma (no avx512f avx512_bf16 amx_bf16 amx_tile)"
    assert cpu_features_line(cpu_flags(cpuinfo(SAPPHIRE))) == "cpu: avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile"


@pytest.fixture
def ds_log(caplog):
    logger = logging.getLogger(ds_config.__name__)
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger=ds_config.__name__)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("precision, native, warned", [
    ("bf16", False, True), ("bf16", True, False), ("fp32", False, False),
])
def test_bf16_on_a_cpu_without_native_bf16_warns_at_start(monkeypatch, ds_log, precision, native, warned):
    monkeypatch.setattr(ds_config.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ds_config, "cpu_has_native_bf16", lambda: native)
    cfg = Config()
    cfg.deepspeed.precision = precision
    ds_config.build_deepspeed_config(cfg, world_size=1)
    messages = [r.getMessage() for r in ds_log.records]
    assert any("deepspeed.precision=bf16 on a CPU without native bf16" in m and "fp32" in m
               for m in messages) == warned, messages
