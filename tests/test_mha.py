"""QuantMultiheadAttention against nn.MultiheadAttention: exact with quantizers off, SQNR floor with them on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hqdm.config import LayerQuantConfig, QuantizerSpec, Rule
from hqdm.layers import QuantLinear, set_quantizers_enabled
from hqdm.mha import PROJECTIONS, QuantMultiheadAttention

E, HEADS, KDIM, VDIM = 64, 4, 96, 32
L, S, B = 5, 7, 3
ATOL = 1e-5  # float32: different but equivalent op orders (packed vs split projections, bmm vs matmul)
SQNR_FLOOR_DB = 25.0  # 8-bit per-channel weights, 8-bit per-token activations: measured ~40 dB


def config(rotation: str = "none", center: str = "none") -> LayerQuantConfig:
    return LayerQuantConfig(w=QuantizerSpec(bits=8, granularity="channel"),
                            a=QuantizerSpec(bits=8, granularity="token", dynamic=True), rotation=rotation,
                            center=center)


def make_mha(seed: int = 0, **kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, HEADS, **kwargs)
    with torch.no_grad():  # non-zero biases so that bias slicing is checked
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.1)
    return mha.eval()


def inputs(batch_first: bool, kdim: int = E, vdim: int = E, batched: bool = True, seed: int = 1):
    g = torch.Generator().manual_seed(seed)

    def rand(n: int, c: int) -> torch.Tensor:
        if not batched:
            return torch.randn(n, c, generator=g)
        return torch.randn(B, n, c, generator=g) if batch_first else torch.randn(n, B, c, generator=g)

    return rand(L, E), rand(S, kdim), rand(S, vdim)


def quant(mha: nn.MultiheadAttention, rotation: str = "none", enabled: bool = False,
          center: str = "none") -> QuantMultiheadAttention:
    q = QuantMultiheadAttention.from_float(mha, config(rotation, center))
    set_quantizers_enabled(q, enabled)
    return q


def masks(kind: str) -> dict:
    g = torch.Generator().manual_seed(2)
    bool_mask = torch.rand(L, S, generator=g) < 0.3
    bool_mask[:, 0] = False  # no fully masked row: both modules would return NaN there
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -2:], kpm[2, -1] = True, True
    return {
        "none": {},
        "bool": {"attn_mask": bool_mask},
        "float": {"attn_mask": torch.randn(L, S, generator=g)},
        "3d": {"attn_mask": torch.randn(B * HEADS, L, S, generator=g)},
        "kpm": {"key_padding_mask": kpm},
        "float_kpm": {"key_padding_mask": torch.zeros(B, S).masked_fill(kpm, float("-inf"))},
        "both": {"attn_mask": bool_mask, "key_padding_mask": kpm},
        "causal": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L)[:, :L], "is_causal": True},
    }[kind]


def assert_same(ref: tuple, out: tuple, atol: float = ATOL) -> None:
    torch.testing.assert_close(out[0], ref[0], atol=atol, rtol=0)
    if ref[1] is None:
        assert out[1] is None
    else:
        torch.testing.assert_close(out[1], ref[1], atol=atol, rtol=0)


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum())).item()


# ---- exact tier: quantizers disabled --------------------------------------------------------------------------
@pytest.mark.parametrize("rotation", ["none", "single"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kv_dims", [(E, E), (KDIM, VDIM)])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "3d", "kpm", "float_kpm", "both"])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_matches_float_when_disabled(rotation, batch_first, kv_dims, mask, need_weights, average):
    kdim, vdim = kv_dims
    mha = make_mha(kdim=kdim, vdim=vdim, batch_first=batch_first)
    q = quant(mha, rotation)
    args = inputs(batch_first, kdim, vdim)
    kw = dict(need_weights=need_weights, average_attn_weights=average, **masks(mask))
    assert_same(mha(*args, **kw), q(*args, **kw))


@pytest.mark.parametrize("need_weights", [True, False])
def test_self_attention_and_causal_hint(need_weights):
    mha = make_mha(batch_first=True)
    q = quant(mha, "single")
    x = inputs(True)[0]
    kw = dict(need_weights=need_weights, **masks("causal"))
    assert_same(mha(x, x, x, **kw), q(x, x, x, **kw))


@pytest.mark.parametrize("need_weights", [True, False])
def test_matches_torch_fast_path(need_weights):
    """In eval under no_grad, nn.MultiheadAttention takes its fused self-attention kernel."""
    mha = make_mha(batch_first=True)
    q = quant(mha, "single")
    x = inputs(True)[0]
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, -1] = True
    with torch.no_grad():
        assert_same(mha(x, x, x, key_padding_mask=kpm, need_weights=need_weights),
                    q(x, x, x, key_padding_mask=kpm, need_weights=need_weights))


def test_dynamic_center_matches_when_disabled():
    mha = make_mha(kdim=KDIM, vdim=VDIM)
    q = quant(mha, "single", center="dynamic")
    args = inputs(False, KDIM, VDIM)
    assert_same(mha(*args), q(*args))


@pytest.mark.parametrize("center", ["none", "dynamic"])
def test_layouts_agree_when_quantized(center):
    """Projections see (B, N, C) in every layout, so per-sample centering and per-token scales do not depend on it."""
    mha = make_mha(kdim=KDIM, vdim=VDIM, batch_first=True)
    q_bf = quant(mha, "single", enabled=True, center=center)
    q_sf = quant(make_mha(kdim=KDIM, vdim=VDIM, batch_first=False), "single", enabled=True, center=center)
    q_sf.load_state_dict(q_bf.state_dict())
    args = inputs(True, KDIM, VDIM)
    out_bf, w_bf = q_bf(*args)
    out_sf, w_sf = q_sf(*(x.transpose(0, 1) for x in args))
    torch.testing.assert_close(out_sf.transpose(0, 1), out_bf, atol=ATOL, rtol=0)
    torch.testing.assert_close(w_sf, w_bf, atol=ATOL, rtol=0)
    out_one, w_one = q_bf(*(x[1] for x in args))  # unbatched: one sample
    torch.testing.assert_close(out_one, out_bf[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(w_one, w_bf[1], atol=ATOL, rtol=0)


def test_is_causal_needs_mask():
    mha = make_mha()
    x = inputs(False)[0]
    with pytest.raises(RuntimeError):
        mha(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match="attn_mask"):
        quant(mha)(x, x, x, is_causal=True)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_unbatched(batch_first, need_weights, average):
    mha = make_mha(kdim=KDIM, vdim=VDIM, batch_first=batch_first)
    q = quant(mha, "single")
    args = inputs(batch_first, KDIM, VDIM, batched=False)
    kpm = torch.zeros(S, dtype=torch.bool)
    kpm[-1] = True
    kw = dict(need_weights=need_weights, average_attn_weights=average, key_padding_mask=kpm,
              attn_mask=masks("bool")["attn_mask"])
    ref, out = mha(*args, **kw), q(*args, **kw)
    assert out[0].shape == (L, E)
    assert_same(ref, out)


@pytest.mark.parametrize("add_bias_kv,add_zero_attn", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask", ["none", "both"])
def test_bias_kv_and_zero_attn(add_bias_kv, add_zero_attn, need_weights, mask):
    mha = make_mha(add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
    q = quant(mha, "single")
    args = inputs(False)
    kw = dict(need_weights=need_weights, **masks(mask))
    assert_same(mha(*args, **kw), q(*args, **kw))


def test_no_bias():
    mha = make_mha(bias=False, kdim=KDIM, vdim=VDIM)
    q = quant(mha)
    assert all(getattr(q, n).bias is None for n in PROJECTIONS)
    args = inputs(False, KDIM, VDIM)
    assert_same(mha(*args), q(*args))


def test_dropout_only_in_training():
    mha = make_mha(dropout=0.5, batch_first=True)
    q = quant(mha)
    args = inputs(True)
    assert_same(mha(*args), q(*args))  # eval: no dropout
    mha.train(), q.train()
    torch.manual_seed(3)
    ref = mha(*args)
    torch.manual_seed(3)
    out = q(*args)
    assert_same(ref, out)  # same RNG draws over the same (B·H, L, S) weights
    assert (out[1] == 0).any()


# ---- SQNR tier: 8-bit quantizers enabled ----------------------------------------------------------------------
@pytest.mark.parametrize("rotation", ["none", "single", "double"])
@pytest.mark.parametrize("kv_dims", [(E, E), (KDIM, VDIM)])
def test_8bit_sqnr(rotation, kv_dims):
    mha = make_mha(kdim=kv_dims[0], vdim=kv_dims[1], batch_first=True)
    q = quant(mha, rotation, enabled=True)
    args = inputs(True, *kv_dims)
    with torch.no_grad():
        ref, out = mha(*args, need_weights=False)[0], q(*args, need_weights=False)[0]
    assert sqnr_db(ref, out) > SQNR_FLOOR_DB


def test_projections_are_quantized():
    q = quant(make_mha(), enabled=True)
    for name in PROJECTIONS:
        assert isinstance(getattr(q, name), QuantLinear)
        assert getattr(q, name).w_quant.enabled and getattr(q, name).a_quant.enabled
    args = inputs(False)
    set_quantizers_enabled(q, False)
    off = q(*args)[0]
    set_quantizers_enabled(q, True)
    assert not torch.equal(off, q(*args)[0])


def test_gradients_flow():
    mha = make_mha(add_bias_kv=True, kdim=KDIM, vdim=VDIM, batch_first=True)
    q = quant(mha, "single", enabled=True).train()
    args = inputs(True, KDIM, VDIM)
    for need_weights in (True, False):
        q.zero_grad()
        out, _ = q(*args, need_weights=need_weights, key_padding_mask=masks("kpm")["key_padding_mask"])
        out.pow(2).mean().backward()
        for name in PROJECTIONS:
            grad = getattr(q, name).weight.grad
            assert grad is not None and grad.abs().sum() > 0, name
        assert q.bias_k.grad.abs().sum() > 0 and q.bias_v.grad.abs().sum() > 0


# ---- conversion -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rotation", ["none", "single"])
@pytest.mark.parametrize("kwargs", [{}, {"kdim": KDIM, "vdim": VDIM, "batch_first": True},
                                    {"bias": False, "add_bias_kv": True, "add_zero_attn": True, "dropout": 0.1}])
def test_to_float_round_trip(rotation, kwargs):
    mha = make_mha(**kwargs)
    back = quant(mha, rotation, enabled=True).to_float()
    assert type(back) is nn.MultiheadAttention
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "dropout", "batch_first", "add_zero_attn",
                 "_qkv_same_embed_dim", "training"):
        assert getattr(back, attr) == getattr(mha, attr), attr
    ref, new = mha.state_dict(), back.state_dict()
    assert ref.keys() == new.keys()
    for k in ref:
        torch.testing.assert_close(new[k], ref[k], atol=0, rtol=0)
    args = inputs(mha.batch_first, mha.kdim, mha.vdim)
    assert_same(mha(*args), back(*args), atol=0)


def test_to_float_undoes_double_rotation():
    mha = make_mha()
    back = quant(mha, "double").to_float()
    for k, v in mha.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, atol=1e-6, rtol=0)


def test_copies_attributes():
    mha = make_mha(dropout=0.2, batch_first=True, add_bias_kv=True)
    q = quant(mha)
    assert (q.embed_dim, q.num_heads, q.head_dim, q.dropout, q.batch_first) == (E, HEADS, E // HEADS, 0.2, True)
    assert torch.equal(q.bias_k, mha.bias_k) and q.bias_k is not mha.bias_k
    assert not q.training


def test_dict_config():
    mha = make_mha(kdim=KDIM, vdim=VDIM)
    q = QuantMultiheadAttention.from_float(mha, {"q_proj": config(), "k_proj": None, "v_proj": config("single"),
                                                 "out_proj": None})
    assert isinstance(q.q_proj, QuantLinear) and isinstance(q.v_proj, QuantLinear)
    assert type(q.k_proj) is nn.Linear and type(q.out_proj) is nn.Linear
    assert q.v_proj.config.rotation == "single"
    set_quantizers_enabled(q, False)
    args = inputs(False, KDIM, VDIM)
    assert_same(mha(*args), q(*args))
    assert q.k_proj.weight is not mha.k_proj_weight


def test_bad_config_key():
    with pytest.raises(ValueError, match="qkv"):
        QuantMultiheadAttention.from_float(make_mha(), {"qkv": config()})


# ---- inside torch's transformer layers: fused fast paths, reports, the module tree of the runtime -----------------
class Encoder(nn.Module):
    """Two nn.TransformerEncoderLayer (batch first, ReLU, even heads: eligible for torch's fused path)."""

    def __init__(self, nested: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(E, HEADS, 2 * E, dropout=0.1, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.head = nn.Linear(E, E)

    def forward(self, x, t=None, src_key_padding_mask=None):
        return self.head(self.blocks(x, src_key_padding_mask=src_key_padding_mask))


def _prepared(model: nn.Module, rules=()):
    from hqdm import QuantConfig, prepare

    return prepare(model, QuantConfig(w_bits=8, a_bits=8, a_dynamic=True, family="generic", rules=rules))


@pytest.mark.parametrize("nested", [False, True])
def test_transformer_encoder_runs_quantized_in_eval_and_train(nested):
    model = Encoder(nested).eval()
    student, report = _prepared(model)
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(3))
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, -2:] = True
    with torch.no_grad():
        for mask in (None, kpm):
            set_quantizers_enabled(student, False)
            off = student(x, src_key_padding_mask=mask)
            ref = model(x, src_key_padding_mask=mask)
            keep = ~kpm[..., None] if mask is not None else torch.ones(B, L, 1, dtype=torch.bool)
            torch.testing.assert_close(off * keep, ref * keep, atol=1e-4, rtol=0)  # padded rows: unspecified
            set_quantizers_enabled(student, True)
            assert sqnr_db(ref * keep, student(x, src_key_padding_mask=mask) * keep) < 80  # really quantized
        student.train()
        assert student(x).shape == (B, L, E)
    assert any("fused TransformerEncoderLayer path off" in n for n in report.notes)


def test_float_attention_with_quantized_feed_forward_is_not_bypassed():
    model = Encoder().eval()
    student, _ = _prepared(model, rules=(Rule(pattern="*self_attn*", skip=True),))
    assert isinstance(student.blocks.layers[0].self_attn, nn.MultiheadAttention)
    assert isinstance(student.blocks.layers[0].linear1, QuantLinear)
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # no hooks here: a hook alone would turn torch's fused path off
        assert sqnr_db(model.blocks(x), student.blocks(x)) < 80  # the fused path would read the float weights


def test_quant_report_lists_attention_projections_against_the_float_model():
    from hqdm import quant_report

    model = Encoder().eval()
    student, _ = _prepared(model)
    batches = [torch.randn(B, L, E, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    report = quant_report(student, model, batches)
    by_name = {e.name: e for e in report.layers}
    for p in PROJECTIONS:
        entry = by_name[f"blocks.layers.0.self_attn.{p}"]
        assert entry.block_type == ("attn_out" if p == "out_proj" else "qkv")
        assert 25 < entry.sqnr_db < 80, (p, entry.sqnr_db)  # 8-bit: quantized, yet matched to the right output
    assert "blocks.layers.1.linear2" in by_name and 25 < report.output_sqnr_db < 80


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kv_dims", [(E, E), (KDIM, VDIM)])
def test_reference_projections_are_what_the_split_projections_compute(batch_first, kv_dims):
    from hqdm.mha import reference_projections

    mha = make_mha(kdim=kv_dims[0], vdim=kv_dims[1], batch_first=batch_first)
    q = quant(mha)
    seen = {}
    for p in PROJECTIONS:
        getattr(q, p).register_forward_hook(lambda m, a, out, p=p: seen.__setitem__(p, out))
    query, key, value = inputs(batch_first, *kv_dims)
    with torch.no_grad():
        q(query, key, value)
        ref = reference_projections(mha, (query, key), {"value": value}, mha(query, key, value))
    for p in PROJECTIONS:
        torch.testing.assert_close(ref[p], seen[p], atol=ATOL, rtol=0)


def test_split_attention_keeps_the_model_output():
    from hqdm.mha import split_attention

    model = Encoder().eval()
    split = Encoder().eval()
    names = split_attention(split)
    assert names == ["blocks.layers.0.self_attn", "blocks.layers.1.self_attn"]
    assert all(type(split.get_submodule(f"{n}.{p}")) is nn.Linear for n in names for p in PROJECTIONS)
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(split(x), model(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="'head' is not an nn.MultiheadAttention"):
        split_attention(model, ["head"])
