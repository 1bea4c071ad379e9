"""prepare(): bit-exact with quantizers off, family defaults, the report, user rules, generic fallback, errors."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from torch import nn

from hqdm import QuantConfig, Rule, prepare, set_quantizers_enabled
from hqdm.adapters import get_adapter
from hqdm.calibrate import forward_batch
from hqdm.layers import QuantLayer
from hqdm.prepare import quant_layers

MODEL_RTOL = 1e-4  # float32, whole model: rotation/centering round-off through ~20 layers, norms and softmax
HADANORM = dict(rotation="double", center="dynamic", normalize=True)


def outputs(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    adapter = get_adapter(model)
    with torch.no_grad():
        return [forward_batch(model, b, adapter) for b in batches]


def matmul_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# ---- quantizers off ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_dit", "tiny_unet", "tiny_unet_cond"])
def test_quantizers_off_rotation_none_is_bit_exact(fixture, request, batches, cond_batches):
    model = request.getfixturevalue(fixture)
    data = cond_batches if fixture == "tiny_unet_cond" else batches
    student, report = prepare(model, QuantConfig(rotation="none"))
    assert len(report.quantized) == len(matmul_layers(model))  # really swapped, not skipped
    set_quantizers_enabled(student, False)
    for ref, out in zip(outputs(model, data), outputs(student, data)):
        assert torch.equal(out, ref)


@pytest.mark.parametrize("knobs", [dict(rotation="single"), dict(rotation="double", center="static"), HADANORM],
                         ids=["hqdm", "double_static", "hadanorm"])
@pytest.mark.parametrize("fixture", ["tiny_dit", "tiny_unet"])
def test_quantizers_off_transforms_match_within_float32(fixture, knobs, request, batches):
    model = request.getfixturevalue(fixture)
    student, _ = prepare(model, QuantConfig(**knobs))
    set_quantizers_enabled(student, False)
    for ref, out in zip(outputs(model, batches), outputs(student, batches)):
        torch.testing.assert_close(out, ref, rtol=MODEL_RTOL, atol=MODEL_RTOL * ref.abs().max().item())


# ---- the report and family defaults --------------------------------------------------------------------------
DIT_ENDS = ("pos_embed.proj", "proj_out_1", "proj_out_2", "transformer_blocks.?.norm1.emb.timestep_embedder.linear_?")
UNET_ENDS = ("conv_in", "conv_out", "time_embedding.linear_?")


@pytest.mark.parametrize("fixture,ends,leftover", [
    ("tiny_dit", DIT_ENDS, "transformer_blocks.0.norm1.emb.class_embedder.embedding_table"),
    ("tiny_unet", UNET_ENDS, "conv_norm_out"),
    ("tiny_unet_cond", UNET_ENDS, "down_blocks.1.attentions.0.transformer_blocks.0.norm1"),
])
def test_report_lists_every_layer_with_family_precision(fixture, ends, leftover, request):
    model = request.getfixturevalue(fixture)
    student, report = prepare(model, QuantConfig(w_bits=4, a_bits=6))
    names = matmul_layers(model)
    assert [e.name for e in report.layers] == names
    table = str(report)
    for name in names:
        layer = student.get_submodule(name)
        assert isinstance(layer, QuantLayer), name
        bits = (8, 8) if any(fnmatch.fnmatchcase(name, p) for p in ends) else (4, 6)
        assert (layer.w_quant.spec.bits, layer.a_quant.spec.bits) == bits, name
        assert f"w{bits[0]}a{bits[1]}" in next(line for line in table.splitlines() if line.startswith(name + " "))
    assert leftover in dict(report.float_modules) and leftover in table
    assert f"{len(names)} layers quantized" in table


def test_family_transforms_skip_the_image_input_layer(tiny_dit, tiny_unet):
    for model, first in ((tiny_dit, "pos_embed.proj"), (tiny_unet, "conv_in")):
        student, _ = prepare(model, QuantConfig(**HADANORM))
        cfg = student.get_submodule(first).config
        assert (cfg.rotation, cfg.center, cfg.normalize) == ("none", "none", False)
        body = quant_layers(student)
        assert sum(layer.config.normalize for layer in body.values()) == len(body) - 1


def test_user_rules_override_family_defaults(tiny_dit):
    rules = (
        Rule(pattern="transformer_blocks.0.attn1.to_q", skip=True),
        Rule(pattern="transformer_blocks.*.ff.net.2", w_bits=6),
        Rule(pattern="proj_out_2", w_bits=3, a_bits=5),  # later than the family's 8-bit end rule: wins
        Rule(pattern="transformer_blocks.1.attn1.to_v", rotation="none", a_dynamic=True),
    )
    student, report = prepare(tiny_dit, QuantConfig(rules=rules))
    assert type(student.get_submodule("transformer_blocks.0.attn1.to_q")) is nn.Linear
    entry = next(e for e in report.layers if e.name == "transformer_blocks.0.attn1.to_q")
    assert entry.config is None and "float (rule)" in str(report)
    for i in (0, 1):
        assert student.get_submodule(f"transformer_blocks.{i}.ff.net.2").w_quant.spec.bits == 6
    out2 = student.get_submodule("proj_out_2")
    assert (out2.w_quant.spec.bits, out2.a_quant.spec.bits) == (3, 5)
    v = student.get_submodule("transformer_blocks.1.attn1.to_v")
    assert v.config.rotation == "none" and v.a_quant.spec.dynamic and v.a_quant.spec.granularity == "token"
    assert student.get_submodule("transformer_blocks.1.attn1.to_q").config.rotation == "single"


def test_rules_parse_from_dicts_as_yaml_gives_them(tiny_unet):
    cfg = QuantConfig(rules=({"pattern": "conv_out", "skip": True},))
    student, report = prepare(tiny_unet, cfg)
    assert type(student.conv_out) is nn.Conv2d and isinstance(cfg.rules[0], Rule)


def test_label_dropout_is_zero_in_the_student_only(tiny_dit):
    student, report = prepare(tiny_dit, QuantConfig())
    drops = [m.dropout_prob for m in tiny_dit.modules() if type(m).__name__ == "LabelEmbedding"]
    assert drops and all(p > 0 for p in drops)  # the teacher keeps diffusers' behaviour
    assert all(m.dropout_prob == 0 for m in student.modules() if type(m).__name__ == "LabelEmbedding")
    assert sum("label dropout" in note for note in report.notes) == len(drops)
    assert not any(isinstance(m, QuantLayer) for m in tiny_dit.modules())  # not prepared in place


# ---- generic fallback ----------------------------------------------------------------------------------------
class Custom(nn.Module):
    """No adapter knows this: a conv stem, self-attention by nn.MultiheadAttention, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 32, 3, padding=1)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).flatten(2).transpose(1, 2)  # (B, HW, 32)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h)


def test_generic_fallback_on_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    student, report = prepare(model, QuantConfig(a_dynamic=True))
    assert report.family == "generic" and [e.name for e in report.quantized] == ["0", "2"]
    x = torch.randn(3, 5, 32)
    set_quantizers_enabled(student, False)
    torch.testing.assert_close(student(x), model(x), rtol=1e-5, atol=1e-5)


def test_layer_narrower_than_the_block_stays_unrotated_unless_a_rule_asks():
    student, report = prepare(Custom(), QuantConfig(a_dynamic=True))
    assert student.stem.config.rotation == "none" and student.head[0].config.rotation == "single"
    assert any(n.startswith("stem: input width 4 < Hadamard block 32") for n in report.notes)
    with pytest.raises(ValueError, match=r"Layer 'stem'.*width=4.*Rule\(pattern='stem', rotation='none'\)"):
        prepare(Custom(), QuantConfig(rules=(Rule(pattern="stem", block=32),)))


def test_generic_fallback_swaps_multihead_attention():
    mha = pytest.importorskip("hqdm.mha")
    torch.manual_seed(0)
    model = Custom().eval()
    stem = Rule(pattern="stem", rotation="none")  # 4 input channels: no Hadamard block fits, the error says so
    student, report = prepare(model, QuantConfig(a_dynamic=True, rules=(stem,)))
    assert isinstance(student.attn, mha.QuantMultiheadAttention)
    assert all(isinstance(getattr(student.attn, p), QuantLayer) for p in mha.PROJECTIONS)
    projections = [f"attn.{p}" for p in mha.PROJECTIONS]
    assert [e.name for e in report.layers] == ["stem", *projections, "head.0", "head.2"]
    assert "norm" in dict(report.float_modules)
    x = torch.randn(2, 4, 4, 4)
    set_quantizers_enabled(student, False)
    with torch.no_grad():
        torch.testing.assert_close(student(x), model(x), rtol=1e-4, atol=1e-4)
        set_quantizers_enabled(student, True)
        assert not torch.equal(student(x), model(x))


def test_rule_addresses_a_multihead_attention_projection():
    pytest.importorskip("hqdm.mha")
    rules = (Rule(pattern="stem", rotation="none"), Rule(pattern="attn.out_proj", w_bits=8),
             Rule(pattern="attn.v_proj", skip=True))
    student, report = prepare(Custom(), QuantConfig(a_dynamic=True, rules=rules))
    assert student.attn.out_proj.w_quant.spec.bits == 8 and student.attn.q_proj.w_quant.spec.bits == 4
    assert type(student.attn.v_proj) is nn.Linear
    described = {e.name: e.describe() for e in report.layers}
    assert described["attn.v_proj"] == "float (rule)" and described["attn.out_proj"].startswith("w8a4")


# ---- errors --------------------------------------------------------------------------------------------------
def test_rule_matching_nothing_names_the_pattern(tiny_dit):
    with pytest.raises(ValueError, match=r"'transformer_blocks\.\*\.attn2\.to_q' matches no Linear"):
        prepare(tiny_dit, QuantConfig(rules=(Rule(pattern="transformer_blocks.*.attn2.to_q", w_bits=8),)))


def test_unsupported_hadamard_block_names_layer_and_width(tiny_dit):
    with pytest.raises(ValueError, match=r"Layer '[\w.]+': HadamardSpec\(width=256, block=48\): block 48 does not "
                                         r"divide width 256.*Rule\(pattern="):
        prepare(tiny_dit, QuantConfig(block=48))
    with pytest.raises(ValueError, match=r"Layer 'proj_out_2'.*block 36 does not divide width 64"):
        prepare(tiny_dit, QuantConfig(rules=(Rule(pattern="proj_out_2", block=36),)))


def test_group_size_not_dividing_a_layer_is_named(tiny_dit):
    with pytest.raises(ValueError, match=r"Layer 'pos_embed\.proj'.*group_size=8 does not divide the reduction "
                                         r"width 4.*w_granularity="):
        prepare(tiny_dit, QuantConfig(w_granularity="group", w_group_size=8))


def test_unknown_family_is_named(tiny_dit):
    with pytest.raises(ValueError, match="family='sdxl'"):
        QuantConfig(family="sdxl")
    with pytest.raises(ValueError, match="family='sdxl'"):
        get_adapter(tiny_dit, "sdxl")
