"""quant_report(): per-layer and per-block SQNR against the float model, its table and its PNG."""

from __future__ import annotations

import math

import pytest
import torch

from hqdm import QuantConfig, calibrate, prepare, quant_report

BODY_BLOCKS = ("adaLN", "qkv", "attn_out", "fc1", "fc2")
"""Block types at the body bits; the ends (patch_embed, temb, final) stay at 8 bits in both configs."""
DIT_BLOCKS = {"patch_embed", "temb", "final", *BODY_BLOCKS}


@pytest.fixture
def reports(tiny_dit, batches, tmp_path):
    out = {}
    for bits in (8, 4):
        student, _ = prepare(tiny_dit, QuantConfig(w_bits=bits, a_bits=bits, timestep_buckets=10))
        calibrate(student, batches, progress=False)
        out[bits] = quant_report(student, tiny_dit, batches, plot=str(tmp_path / f"w{bits}a{bits}.png"))
    return out


def test_per_block_sqnr_is_finite_and_w8a8_beats_w4a4(reports):
    w8, w4 = reports[8].by_block(), reports[4].by_block()
    assert set(w8) == set(w4) == DIT_BLOCKS
    assert all(math.isfinite(v) for v in [*w8.values(), *w4.values()])
    for block in BODY_BLOCKS:
        assert w8[block] > w4[block], (block, w8[block], w4[block])
    assert reports[8].output_sqnr_db > reports[4].output_sqnr_db
    assert all(math.isfinite(e.sqnr_db) for e in reports[4].layers)


def test_table_and_plot(reports, tmp_path):
    table = str(reports[4])
    for block in DIT_BLOCKS:
        assert block in table
    assert "model output" in table and "transformer_blocks.1.ff.net.2" in table
    for bits in (8, 4):
        png = tmp_path / f"w{bits}a{bits}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_restores_modes_and_needs_matching_names(tiny_dit, batches):
    student, _ = prepare(tiny_dit, QuantConfig(a_dynamic=True))
    student.train()
    report = quant_report(student, tiny_dit, batches[:1])
    assert student.training and not tiny_dit.training
    assert len(report.layers) == 21  # every swapped Linear / Conv2d of the tiny DiT
    with pytest.raises(ValueError, match="same-named module"):
        quant_report(student, torch.nn.Sequential(torch.nn.Linear(2, 2)), batches[:1])
