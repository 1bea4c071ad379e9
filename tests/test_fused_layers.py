"""QuantLinear / QuantConv2d on CUDA take the fused fake-quant kernels; their outputs and gradients match the
unfused reference path (HQDM_FUSED_FAKE_QUANT=0) of the same layer within dtype-relative bounds."""

from __future__ import annotations

import pytest
import torch

import hqdm
from hqdm.metrics import sqnr_db
from tests.test_runtime import _batch, _layer

FUSED_VS_UNFUSED_DB = 40.0
"""Same integers but for rare one-step flips (float summation order of the fused Hadamard): ≥ 60 dB typical in
float32; a wrong mask, scale or rotation falls far below 30 dB."""


def _run(layer, x, t, fused: bool, monkeypatch):
    monkeypatch.setenv("HQDM_FUSED_FAKE_QUANT", "1" if fused else "0")
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with hqdm.use_timesteps(layer, t):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


@pytest.mark.gpu
@pytest.mark.parametrize("kind,knobs", [("linear", ("single", "none", False)), ("linear", ("double", "dynamic", True)),
                                        ("conv", ("double", "static", False))])
def test_fused_layer_matches_unfused(kind, knobs, monkeypatch):
    layer = _layer(kind, (4, 8), knobs).cuda().train()
    batch = _batch(kind, 5)
    x, t = batch["x"].cuda(), batch["t"].cuda()
    ref, ref_gx, ref_g = _run(layer, x, t, False, monkeypatch)
    out, gx, g = _run(layer, x, t, True, monkeypatch)
    assert layer._fuses(x), "the fused path was not taken"
    assert sqnr_db(out, ref).item() > FUSED_VS_UNFUSED_DB
    assert sqnr_db(gx, ref_gx).item() > FUSED_VS_UNFUSED_DB
    for name in ref_g:
        assert sqnr_db(g[name], ref_g[name]).item() > FUSED_VS_UNFUSED_DB - 15, name  # LSQ sums: looser
