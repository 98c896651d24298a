"""The prefix part of tree attention (`prefix_attention`): torch's flash kernel and the compiled GEMMs
around an fp32 softmax, each against attention written out in float64 (softmax of q.k scaled, times v,
and the log-sum-exp), over row counts that are not a multiple of the chunk; and the fall-back to flash,
said once, where compiling fails."""

from __future__ import annotations

import logging

import pytest
import torch

import iclsft.engine.tree_attention as ta
from iclsft.engine.tree_attention import PREFIX_CHUNK, prefix_attention

G, M, P, D = 2, 2 * PREFIX_CHUNK + 44, 257, 16  # rows: two whole chunks and a part (scores per call set below)


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, G, n, D, generator=g) * 2 for n in (M, P, P))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def reference(q, k, v, scale):
    q, k, v = q.double(), k.double(), v.double()
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


@pytest.mark.parametrize(("kernel", "dtype", "tol"), [
    ("flash", torch.float32, 1e-5), ("gemm", torch.float32, 1e-5),
    # bf16 inputs read exactly by the reference; flash keeps q.k in fp32 (measured here: outputs off by
    # 0.015 at most, log-sum-exps 6e-5), gemm rounds q.k to bf16 before the softmax (scores of up to 21,
    # each off by up to 0.04: outputs 0.100, log-sum-exps 0.059)
    ("flash", torch.bfloat16, 0.03), ("gemm", torch.bfloat16, 0.15),
])
def test_each_kernel_equals_attention_written_out(monkeypatch, kernel, dtype, tol):
    monkeypatch.setattr(ta, "PREFIX_SCORES", PREFIX_CHUNK * P)  # calls of PREFIX_CHUNK rows: 3 here
    q, k, v = inputs(dtype)
    scale = D**-0.5
    out, lse = prefix_attention(q, k, v, scale, kernel)
    want_out, want_lse = reference(q, k, v, scale)
    assert out.shape == (1, G, M, D) and lse.shape == (1, G, M)
    assert (out.double() - want_out).abs().max() < tol
    assert (lse.double() - want_lse).abs().max() < tol


def test_an_unknown_kernel_is_one_line():
    q, k, v = inputs(torch.float32)
    with pytest.raises(ValueError, match="prefix kernel 'fast' is not one of flash, gemm"):
        prefix_attention(q, k, v, 1.0, "fast")


def test_a_machine_that_cannot_compile_falls_back_to_flash_once(monkeypatch, caplog):
    import torch._inductor.config as inductor

    q, k, v = inputs(torch.bfloat16)
    want, want_lse = prefix_attention(q, k, v, D**-0.5, "flash")
    torch._dynamo.reset()
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(ta, "_compiled", None)
    try:
        with caplog.at_level(logging.WARNING, logger="iclsft.engine.tree_attention"):
            out, lse = prefix_attention(q, k, v, D**-0.5, "gemm")
            again, _ = prefix_attention(q, k, v, D**-0.5, "gemm")
        assert torch.equal(out, want) and torch.equal(lse, want_lse) and torch.equal(again, want)
        warned = [r for r in caplog.records if "not available here" in r.getMessage()]
        assert len(warned) == 1 and "flash" in warned[0].getMessage() and ta._compiled is False
    finally:
        torch._dynamo.reset()
