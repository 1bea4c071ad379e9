"""Flow-matching diffusers DiTs (SD3, FLUX, Sana) and PixArt, end to end on tiny random configs:
prepare → calibrate → quant_report → export (parity) → load_int → sample with the declared call."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hqdm import QuantConfig, calibrate, export, load_int, prepare, quant_report
from hqdm.adapters import get_adapter
from hqdm.metrics import sqnr_db
from hqdm.sampling import denoiser_of, make_scheduler, sample

INT_VS_FAKE_QUANT_DB = 40.0
"""The integer model holds the fake-quant model's integers; only float32 summation order differs (~130 dB seen)."""
SHAPE = (4, 8, 8)


def _sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8)


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def _sana():
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                  num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                  cross_attention_dim=32, caption_channels=32, sample_size=8, patch_size=1,
                                  mlp_ratio=2.0)


def _pixart(additional: bool = False):
    from diffusers import PixArtTransformer2DModel

    heads = 6 if additional else 2  # size embeddings take a third of the width each: 96 = 3·32
    return PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=2, cross_attention_dim=16 * heads, sample_size=8, patch_size=2,
                                    caption_channels=24, norm_num_groups=32, use_additional_conditions=additional)


MODELS = {  # family, builder, text width, pooled width, scheduler, an end layer, a body layer
    "sd3": ("sd3", _sd3, 32, 16, "flow_euler", "proj_out", "transformer_blocks.0.attn.to_q"),
    "flux": ("flux", _flux, 32, 16, "flow_euler", "x_embedder", "single_transformer_blocks.0.proj_mlp"),
    "sana": ("sana", _sana, 32, None, "flow_euler", "caption_projection.linear_1", "transformer_blocks.0.attn2.to_k"),
    "pixart": ("pixart", _pixart, 24, None, "dpm", "adaln_single.linear", "transformer_blocks.1.ff.net.2"),
    "pixart_sizes": ("pixart", lambda: _pixart(True), 24, None, "dpm", "proj_out", "transformer_blocks.0.attn1.to_v"),
}


PIPELINE_TIME = {  # what the diffusers pipelines pass as `timestep`, and what the models predict
    "sd3": ("continuous", 1000.0, "flow"),  # StableDiffusion3Pipeline: FlowMatchEuler timesteps σ·1000
    "flux": ("continuous", 1.0, "flow"),  # FluxPipeline: timestep / 1000 (the model multiplies by 1000)
    "sana": ("continuous", 1000.0, "flow"),  # SanaPipeline: flow-sigma timesteps σ·1000, flow_prediction
    "pixart": ("index", None, "epsilon"),  # PixArtSigmaPipeline: DPM-Solver integer timesteps, learned sigma
}


def _batches(call, text: int, pooled: int | None, n: int = 2, batch: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        if call.timesteps == "index":
            t = torch.randint(0, 1000, (batch,), generator=g)
        else:
            t = torch.rand(batch, generator=g) * call.time_max
        b = {"x": torch.randn(batch, *SHAPE, generator=g), "t": t, "context": torch.randn(batch, 3, text, generator=g)}
        if pooled:
            b["pooled"] = torch.randn(batch, pooled, generator=g)
        out.append(b)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_prepare_calibrate_export_load_int_sample(name, tmp_path):
    family, build, text, pooled, scheduler, end, body = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    adapter = get_adapter(model)
    assert adapter.name == family
    assert (adapter.call.timesteps, adapter.call.time_max, adapter.call.prediction) == PIPELINE_TIME[family]
    call = replace(adapter.call, input_shape=SHAPE) if family == "flux" else adapter.call  # FLUX has no sample size
    student, report = prepare(model, QuantConfig(w_bits=4, a_bits=8, timestep_buckets=4), call=call)
    layers = {e.name: e for e in report.layers}
    assert layers[end].config.w.bits == 8 and layers[body].config.w.bits == 4
    if family == "sana":
        assert layers["transformer_blocks.0.ff.conv_depth"].config is None  # depthwise: no integer path
    batches = _batches(call, text, pooled)
    calibrate(student, batches, progress=False)
    table = student.get_submodule(body).a_quant.scale.detach()
    assert len(set(table.flatten().tolist())) > 1  # the model's own time fills several buckets, not bucket 0
    fidelity = quant_report(student, model, batches)
    assert {"qkv", "attn_out"} <= set(fidelity.by_block()) or family == "flux" and "fc1" in fidelity.by_block()
    summary = export(student, tmp_path / "int", calibration_batches=batches)
    assert summary.parity["int_vs_fake_quant_db"] == "inf" or summary.parity["int_vs_fake_quant_db"] > 40
    int_model = load_int(tmp_path / "int")
    b = batches[0]
    with torch.no_grad():
        fq = adapter.predict(student, b["x"], b["t"], None, b["context"], b.get("pooled"))
        ints = adapter.predict(int_model, b["x"], b["t"], None, b["context"], b.get("pooled"))
    assert sqnr_db(ints, fq) > INT_VS_FAKE_QUANT_DB
    times = []
    cond = {"context": b["context"][:2]} | ({"pooled": b["pooled"][:2]} if pooled else {})
    out = sample(denoiser_of(int_model, get_adapter(student)), make_scheduler(scheduler),
                 torch.zeros(2, dtype=torch.long), get_adapter(student).input_shape(student), num_steps=3,
                 call=call, cond=cond, guidance_scale=2.0, null_cond={k: torch.zeros_like(v) for k, v in cond.items()},
                 generator=torch.Generator().manual_seed(0), callback=lambda i, t, x, p: times.append(t))
    assert out.shape == (2, *SHAPE) and torch.isfinite(out).all()
    if call.timesteps == "continuous":
        assert times[0][0].item() == pytest.approx(call.time_max)  # pure noise in the model's own time


def test_flux_needs_a_declared_shape_and_even_sizes():
    model = _flux()
    assert all(get_adapter(model, QuantConfig(family=f).family).name == f for f in ("sd3", "flux", "sana", "pixart"))
    with pytest.raises(ValueError, match="FLUX configs carry no sample size"):
        get_adapter(model).input_shape(model)
    with pytest.raises(ValueError, match="height and width must be even"):
        get_adapter(model).predict(model, torch.zeros(1, 4, 7, 8), torch.zeros(1))


def test_sana_with_a_timestep_scale_asks_for_its_range():
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                   num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                   cross_attention_dim=32, caption_channels=32, sample_size=8, mlp_ratio=2.0,
                                   timestep_scale=1000.0)
    with pytest.raises(ValueError, match=r"timestep_scale=1000.0.*time_max=1000000.0"):
        prepare(model, QuantConfig())
    call = replace(get_adapter(model).call, time_max=1e6)
    assert prepare(model, QuantConfig(a_dynamic=True), call=call)[1].family == "sana"
