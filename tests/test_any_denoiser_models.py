"""Plain nn.Module denoisers through the library: a ViT of nn.TransformerEncoderLayer (continuous time, noise at 0,
clean-image prediction, rectified flow) and an eps UNet with ConvTranspose2d up-sampling (integer time)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hqdm import QuantConfig, calibrate, prepare, quant_report
from hqdm.adapters import get_adapter
from hqdm.call import CallSpec
from hqdm.export import export_layer
from hqdm.layers import QuantConvTranspose2d, QuantLayer
from hqdm.metrics import sqnr_db
from hqdm.mha import QuantMultiheadAttention, split_attention
from hqdm.prepare import quant_layers
from hqdm.runtime import int_layer
from hqdm.sampling import add_noise, denoiser_of, make_scheduler, prediction_target, sample
from hqdm.timesteps import attach_timesteps

CLASSES, SIZE = 10, 8
SAMPLE_SQNR_DB = 20.0
"""W8A8 students sample within this of their FP model from the same noise (measured: ViT 24 dB, UNet 33 dB)."""
INT_VS_FAKE_QUANT_DB = 40.0
"""Integer layers hold the fake-quant integers; float32 summation order alone differs (~130 dB per layer)."""


def time_features(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B,) -> (B, width) sinusoidal features."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(width // 2, device=t.device) / (width // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TinyViT(nn.Module):
    """Class-conditional ViT: patch conv on a 1-channel image, width-1 time MLP, nn.TransformerEncoder blocks."""

    def __init__(self, width: int = 64, patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(1, width, patch, patch)
        self.time = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(CLASSES + 1, width)
        self.pos = nn.Parameter(torch.randn(1, (SIZE // patch) ** 2, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, activation="gelu", batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch * patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, p, n = x.shape[0], self.patch, SIZE // self.patch
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        h = h + (self.time(t.float()[:, None]) + self.label(y))[:, None]
        out = self.head(self.norm(self.blocks(h)))  # (B, N, p·p)
        return out.view(b, n, n, p, p).permute(0, 1, 3, 2, 4).reshape(b, 1, SIZE, SIZE)


class TinyUNet(nn.Module):
    """Unconditional eps UNet: stride-2 conv down, ConvTranspose2d up, one skip, sinusoidal integer time."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(1, width, 3, padding=1)
        self.temb = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.conv_out = nn.Conv2d(2 * width, 1, 3, padding=1)
        self.width = width

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h0 = F.silu(self.conv_in(x))  # (B, W, H, W)
        h = F.silu(self.down(h0)) + self.temb(time_features(t, self.width))[:, :, None, None]
        h = F.silu(self.up(F.silu(self.mid(h))))  # (B, W, H, W)
        return self.conv_out(torch.cat([h, h0], dim=1))


VIT_CALL = CallSpec(sample=0, timestep=1, class_labels=2, timesteps="continuous", time_max=1.0, noise_at="zero",
                    prediction="sample", path="flow", num_classes=CLASSES, null_class=CLASSES,
                    input_shape=(1, SIZE, SIZE))
UNET_CALL = CallSpec(sample=0, timestep=1, input_shape=(1, SIZE, SIZE))


def _batches(call: CallSpec, n: int = 3, batch: int = 8, alphas=None) -> list[dict]:
    """Noisy inputs in the model's own time, from smooth 'images' (upsampled 4×4 noise)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x0 = F.interpolate(torch.randn(batch, 1, 4, 4, generator=g), size=SIZE, mode="bilinear").clamp(-1, 1)
        noise = torch.randn(batch, 1, SIZE, SIZE, generator=g)
        t = torch.rand(batch, generator=g) if call.timesteps == "continuous" else torch.randint(0, 1000, (batch,),
                                                                                              generator=g)
        out.append({"x": add_noise(call, x0, noise, t, 1000, alphas), "t": t, "x0": x0, "noise": noise,
                    "y": torch.randint(0, CLASSES, (batch,), generator=g)})
    return out


def _fit(student, teacher, batches, steps: int = 6) -> list[float]:
    """A few QAT steps distilling the teacher's predictions (what `hqdm fit` does, by hand). The student stays in
    eval mode: dropout off, as in the eval-mode teacher (train mode changes nothing else in quantized layers)."""
    adapter, opt = get_adapter(student), torch.optim.Adam(student.parameters(), lr=1e-4)
    losses = []
    for i in range(steps):
        b = batches[i % len(batches)]
        with torch.no_grad():
            target = adapter.predict(teacher, b["x"], b["t"], b["y"])
        loss = F.mse_loss(adapter.predict(student, b["x"], b["t"], b["y"]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_vit_with_continuous_time_and_clean_image_prediction():
    torch.manual_seed(0)
    model = TinyViT().eval()
    student, report = prepare(model, QuantConfig(w_bits=8, a_bits=8, timestep_buckets=4), call=VIT_CALL)
    assert isinstance(student.blocks.layers[0].self_attn, QuantMultiheadAttention)
    assert student.embed.config.rotation == "none" and student.time[0].config.rotation == "none"  # 1 wide
    assert student.embed.w_quant.spec.bits == 8 and student.head.w_quant.spec.bits == 8
    batches = _batches(VIT_CALL)
    calibrate(student, batches, progress=False)
    assert not student.training
    table = student.blocks.layers[1].linear1.a_quant.scale.detach()
    assert len(set(table.flatten().tolist())) == 4  # t in [0, 1] fills all four buckets
    fidelity = quant_report(student, model, batches)
    names = {e.name for e in fidelity.layers}
    assert {f"blocks.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")} <= names
    assert {"qkv", "attn_out"} <= set(fidelity.by_block()) and fidelity.output_sqnr_db > 25

    labels, noise = torch.arange(4) % CLASSES, torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_steps=8, call=VIT_CALL, guidance_scale=2.0, null_class=get_adapter(student).null_class(student),
                  guidance_interval=(0.0, 0.8), noise=noise)
    seen = []
    fp = sample(denoiser_of(model, get_adapter(student)), make_scheduler("rf_euler"), labels, (1, SIZE, SIZE),
                callback=lambda i, t, x, p: seen.append(t), **kwargs)
    q = sample(denoiser_of(student), make_scheduler("rf_euler"), labels, (1, SIZE, SIZE), **kwargs)
    assert seen[0][0].item() == 0.0 and seen[-1][0].item() == pytest.approx(7 / 8)  # noise at 0 -> data at 1
    assert sqnr_db(q, fp) > SAMPLE_SQNR_DB
    losses = _fit(student, model, batches)
    assert all(math.isfinite(v) for v in losses)
    attn = student.blocks.layers[0].self_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.out_proj.w_quant.scale.grad.abs().sum() > 0


def test_vit_prediction_target_is_the_clean_image():
    b = _batches(VIT_CALL, n=1)[0]
    torch.testing.assert_close(prediction_target(VIT_CALL, b["x0"], b["noise"], b["t"], 1000), b["x0"])


def test_unet_with_transposed_conv_and_integer_time():
    torch.manual_seed(0)
    model = TinyUNet().eval()
    student, report = prepare(model, QuantConfig(w_bits=8, a_bits=8, timestep_buckets=4), call=UNET_CALL)
    assert isinstance(student.up, QuantConvTranspose2d)
    assert {type(m).__name__ for m in student.modules() if isinstance(m, QuantLayer)} == {
        "QuantConv2d", "QuantConvTranspose2d", "QuantLinear"}
    assert student.conv_in.config.rotation == "none" and student.conv_out.w_quant.spec.bits == 8
    sched = make_scheduler("ddim")
    batches = _batches(UNET_CALL, alphas=sched.alphas_cumprod)
    calibrate(student, batches, progress=False)
    fidelity = quant_report(student, model, batches)
    assert "up" in {e.name for e in fidelity.layers} and fidelity.output_sqnr_db > 25
    noise = torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(4, dtype=torch.long)
    fp = sample(denoiser_of(model, get_adapter(student)), sched, labels, (1, SIZE, SIZE), num_steps=6,
                call=UNET_CALL, noise=noise)
    q = sample(denoiser_of(student), sched, labels, (1, SIZE, SIZE), num_steps=6, call=UNET_CALL, noise=noise)
    assert sqnr_db(q, fp) > SAMPLE_SQNR_DB
    losses = _fit(student, model, batches)
    assert all(math.isfinite(v) for v in losses)
    assert student.up.weight.grad.abs().sum() > 0 and student.up.a_quant.scale.grad.abs().sum() > 0


# ---- the integer path of these models, as load_int will build it ---------------------------------------------------
def _integer_model(student: nn.Module, float_model: nn.Module) -> nn.Module:
    """The float model with attention split into projections and every quantized layer swapped for its exported
    integer layer (export_layer -> int_layer); a transposed conv reads the zero-inserted input."""
    model = copy.deepcopy(float_model)
    split_attention(model)
    for name, layer in quant_layers(student).items():
        new = int_layer(name, *export_layer(name, layer))  # an IntConvTranspose2d zero-inserts its own input
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    attach_timesteps(model, get_adapter(student).call.timestep_call(type(model).forward))
    return model.eval()


@pytest.mark.parametrize("k", [1, 2, 5])
def test_int_mm_is_exact_for_any_inner_width(k):
    from hqdm.int_matmul import int_mm, int_mm_reference

    g = torch.Generator().manual_seed(k)
    a = torch.randint(-128, 128, (5, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (7, k), generator=g, dtype=torch.int8)
    assert torch.equal(int_mm(a, w), int_mm_reference(a, w))


@pytest.mark.parametrize("kind", ["vit", "unet"])
def test_integer_layers_of_attention_projections_and_transposed_convs(kind):
    torch.manual_seed(0)
    model, call = (TinyViT(), VIT_CALL) if kind == "vit" else (TinyUNet(), UNET_CALL)
    model.eval()
    # the ViT's width-1 time input is a K = 1 integer GEMM (hqdm.int_matmul materializes its (1, N) weight)
    student, _ = prepare(model, QuantConfig(w_bits=4, a_bits=8, timestep_buckets=4), call=call)
    batches = _batches(call, alphas=make_scheduler("ddim").alphas_cumprod)
    calibrate(student, batches, progress=False)
    int_model, adapter, b = _integer_model(student, model), get_adapter(student), batches[0]
    with torch.no_grad():
        fq = adapter.predict(student, b["x"], b["t"], b["y"])
        ints = adapter.predict(int_model, b["x"], b["t"], b["y"])
    assert sqnr_db(ints, fq) > INT_VS_FAKE_QUANT_DB
