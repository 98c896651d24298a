"""Reading whether the CPU computes bf16 natively, and the one warning where it does not."""

from __future__ import annotations

import logging

import pytest
import torch

from iclsft import cpu
from tests.conftest import make_tiny_llama

# abridged /proc/cpuinfo of the two kinds of machine this project has run on, and of an Arm server
AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 avx512_bf16
"""
AVX512_BF16 = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 avx512f avx512dq avx512_vnni avx512_bf16 avx512_vbmi2
"""
ARM = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid sve bf16 i8mm
CPU implementer\t: 0x41
"""


def test_flags_are_read_from_the_first_processor():
    assert cpu.cpu_flags(AVX2) == frozenset("fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2".split())
    assert cpu.bf16_flags(cpu.cpu_flags(AVX2)) == []
    assert cpu.bf16_flags(cpu.cpu_flags(AVX512_BF16)) == ["avx512_bf16"]
    assert cpu.bf16_flags(cpu.cpu_flags(ARM)) == ["bf16"]
    assert cpu.cpu_flags("processor\t: 0\nmodel name\t: something\n") is None
    assert cpu.bf16_flags(None) == []


@pytest.fixture
def cpu_is(monkeypatch):
    """Make this machine's flags those of a given cpuinfo text (None: unreadable), with no warning given yet."""
    monkeypatch.setattr(cpu, "_warned", set())
    read = cpu.cpu_flags  # checked against literal flag sets above

    def set_to(text: str | None):
        monkeypatch.setattr(cpu, "cpu_flags", lambda cpuinfo=None: None if text is None else read(text))
    return set_to


def test_warns_once_where_bf16_is_emulated(cpu_is, caplog):
    log = logging.getLogger("iclsft.test")
    cpu_is(AVX2)
    with caplog.at_level(logging.WARNING, logger="iclsft.test"):
        assert cpu.warn_emulated_bf16("bf16 scoring", "4-8x slower", "score in float32", log)
        assert not cpu.warn_emulated_bf16("bf16 scoring", "4-8x slower", "score in float32", log)  # once per process
    (record,) = caplog.records
    assert record.getMessage().startswith("bf16 scoring on this CPU is emulated")
    assert record.getMessage().endswith("; score in float32")
    for native in (AVX512_BF16, ARM, None):  # native bf16, or flags unknown: nothing said
        cpu_is(native)
        assert not cpu.warn_emulated_bf16("bf16 scoring", "4-8x slower", "score in float32", log)


def test_engine_and_trainer_warn_for_bf16_on_an_emulating_cpu(cpu_is, caplog, smollm_tokenizer):
    from iclsft.engine.hf import HFEngine
    from iclsft.sft.train import autocast

    cpu_is(AVX2)
    model = make_tiny_llama(len(smollm_tokenizer))
    with caplog.at_level(logging.WARNING):
        HFEngine(model, progress=False)  # fp32: nothing
        autocast("fp32", "cpu")
        assert not caplog.records
        HFEngine(model.to(torch.bfloat16), progress=False)
        autocast("bf16-mixed", "cpu")
    said = [(r.name, r.getMessage().split(" on this CPU")[0]) for r in caplog.records]
    assert said == [("iclsft.engine.hf", "bf16 scoring"), ("iclsft.sft.train", "bf16-mixed training")]
