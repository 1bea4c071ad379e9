"""calibrate(): μ / σ from real forward calls, a full per-timestep table, re-searched weight scales, exact reload."""

from __future__ import annotations

import pytest
import torch

from hqdm import QuantConfig, calibrate, prepare, set_quantizers_enabled
from hqdm.adapters import get_adapter
from hqdm.calibrate import SIGMA_FLOOR, forward_batch, is_calibrated
from hqdm.fake_quantizer import FakeQuantizer
from hqdm.prepare import quant_layers
from hqdm.timesteps import timestep_buckets

BUCKETS = 10
T_SEEN = 400  # calibration timesteps < 400 reach buckets 0–3 only; 4–9 must be filled from bucket 3
HADANORM = dict(rotation="double", center="dynamic", normalize=True)
STATS_RTOL = 1e-4  # float32 model activations vs float64 statistics accumulated over 2 batches


def layer_inputs(model, name: str, batches) -> torch.Tensor:
    """Every (sample, token, channel) input of layer `name` of the float model: (B_total, T, C)."""
    seen = []
    hook = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    adapter = get_adapter(model)
    with torch.no_grad():
        for b in batches:
            forward_batch(model, b, adapter)
    hook.remove()
    return torch.cat([x.reshape(x.shape[0], -1, x.shape[-1]) for x in seen])


@pytest.fixture
def calibrated(tiny_dit, batch_maker):
    config = QuantConfig(timestep_buckets=BUCKETS, rules=({"pattern": "*ff.net.2", "center": "static"},), **HADANORM)
    student, _ = prepare(tiny_dit, config)
    before = {n: layer.w_quant.scale.detach().clone() for n, layer in quant_layers(student).items()}
    batches = batch_maker(n=2, batch=4, t_max=T_SEEN)
    stats = calibrate(student, batches, progress=False)
    return dict(student=student, teacher=tiny_dit, config=config, batches=batches, stats=stats, before=before)


def test_statistics_mu_and_sigma_match_the_float_inputs(calibrated):
    student, teacher, batches = calibrated["student"], calibrated["teacher"], calibrated["batches"]
    assert set(calibrated["stats"]) == set(quant_layers(student))
    static = student.get_submodule("transformer_blocks.0.ff.net.2")  # center='static', σ around the global mean
    x = layer_inputs(teacher, "transformer_blocks.0.ff.net.2", batches).reshape(-1, static.in_width)
    torch.testing.assert_close(static.mu.double(), x.mean(0), rtol=STATS_RTOL, atol=STATS_RTOL)
    dynamic = student.get_submodule("transformer_blocks.1.attn1.to_q")  # σ around each sample's own token mean
    x = layer_inputs(teacher, "transformer_blocks.1.attn1.to_q", batches)
    std = (x - x.mean(1, keepdim=True)).pow(2).mean((0, 1)).sqrt()
    expected = std.clamp_min(SIGMA_FLOOR * std.max())
    torch.testing.assert_close(dynamic.sigma.double(), expected, rtol=STATS_RTOL, atol=STATS_RTOL * std.max().item())
    for name, layer in quant_layers(student).items():
        if layer.config.center != "none":
            assert layer.mu.abs().sum() > 0, name
        if layer.config.normalize:
            assert not torch.allclose(layer.sigma, torch.ones_like(layer.sigma)), name
            ref = teacher.get_submodule(name).weight
            torch.testing.assert_close(layer.original_weight(), ref, rtol=1e-4, atol=1e-5)  # σ fold is exact


def nearest_seen(seen: list[int], bucket: int) -> int:
    return min(seen, key=lambda s: (abs(s - bucket), s))


def test_every_bucket_of_every_table_is_initialized(calibrated):
    student, batches = calibrated["student"], calibrated["batches"]
    seen = sorted({int(b) for batch in batches for b in timestep_buckets(batch["t"], BUCKETS, 1000)})
    assert max(seen) < BUCKETS - 1  # the test needs unseen buckets
    for name, layer in quant_layers(student).items():
        q = layer.a_quant
        assert bool(q.initialized) and bool(layer.calibrated), name
        table = q.scale.detach()
        assert table.shape[0] == BUCKETS and torch.isfinite(table).all() and (table > 0).all(), name
        for bucket in range(BUCKETS):
            if bucket not in seen:
                assert torch.equal(table[bucket], table[nearest_seen(seen, bucket)]), (name, bucket)
        assert len({round(v, 7) for v in table[seen].flatten().tolist()}) > 1, name  # seen buckets differ
    assert is_calibrated(student)


def test_weight_scales_are_searched_again_after_sigma_folding(calibrated):
    student, before = calibrated["student"], calibrated["before"]
    for name, layer in quant_layers(student).items():
        fresh = FakeQuantizer(layer.w_quant.spec, "weight", tuple(layer.weight.shape))
        fresh.init_from_weight(layer.effective_weight())
        assert torch.equal(layer.w_quant.scale, fresh.scale), name
        if layer.config.normalize:
            assert not torch.equal(layer.w_quant.scale, before[name]), name


def test_calibrate_restores_modes_and_switches(tiny_unet, batches):
    student, _ = prepare(tiny_unet, QuantConfig(timestep_buckets=BUCKETS, **HADANORM))
    student.train()
    layer = next(iter(quant_layers(student).values()))
    layer.w_quant.enabled = False
    calibrate(student, batches, progress=False)
    assert student.training and not layer.w_quant.enabled and layer.a_quant.enabled
    assert is_calibrated(student)
    student.eval()
    with torch.no_grad():
        out = forward_batch(student, batches[0], get_adapter(student))
    assert torch.isfinite(out).all()


def test_state_dict_round_trip_reproduces_outputs_exactly(calibrated):
    student, teacher, config = calibrated["student"], calibrated["teacher"], calibrated["config"]
    with torch.no_grad():  # a few steps of "training" so that every learned tensor differs from its init
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 1e-3 * p.abs().mean())
    fresh, _ = prepare(teacher, config)
    fresh.load_state_dict(student.state_dict())
    assert is_calibrated(fresh)
    adapter = get_adapter(student)
    with torch.no_grad():
        for batch in calibrated["batches"]:
            assert torch.equal(forward_batch(fresh, batch, adapter), forward_batch(student, batch, adapter))


def test_checkpoint_of_another_config_is_refused(calibrated):
    other, _ = prepare(calibrated["teacher"], QuantConfig(timestep_buckets=BUCKETS, rotation="single"))
    with pytest.raises((ValueError, RuntimeError), match="config"):
        other.load_state_dict(calibrated["student"].state_dict())


def test_quantized_outputs_stay_close_after_calibration(calibrated):
    student, teacher, batches = calibrated["student"], calibrated["teacher"], calibrated["batches"]
    adapter = get_adapter(student)
    set_quantizers_enabled(student, True)
    with torch.no_grad():
        ref = torch.cat([forward_batch(teacher, b, adapter) for b in batches])
        out = torch.cat([forward_batch(student, b, adapter) for b in batches])
    assert torch.isfinite(out).all()
    assert 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()) > 3.0  # W4A4 on a random tiny DiT


def test_calibrate_input_errors(tiny_dit, batches):
    student, _ = prepare(tiny_dit, QuantConfig(timestep_buckets=BUCKETS))
    with pytest.raises(ValueError, match="one-shot iterator"):
        calibrate(student, iter(batches), progress=False)
    with pytest.raises(ValueError, match="no quantized layers"):
        calibrate(tiny_dit, batches, progress=False)
    with pytest.raises(RuntimeError, match="without timesteps"):  # tables need timesteps: plain tensors have none
        calibrate(student, [b["x"] for b in batches], family="generic", progress=False)
