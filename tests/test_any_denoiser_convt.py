"""QuantConvTranspose2d: exact with quantizers off, equal to its conv-over-zero-inserted-input form when on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hqdm import QuantConfig, prepare
from hqdm.config import LayerQuantConfig, QuantizerSpec
from hqdm.layers import (
    QuantConvTranspose2d,
    conv_weight_of_transpose,
    set_quantizers_enabled,
    transpose_weight_of_conv,
)
from hqdm.timesteps import use_timesteps

ATOL = 1e-5  # float32, different summation orders of the same products

GEOMETRIES = {
    "k4s2p1": dict(kernel_size=4, stride=2, padding=1),
    "k3s2p1op1": dict(kernel_size=3, stride=2, padding=1, output_padding=1),
    "k3s1p0": dict(kernel_size=3, stride=1, padding=0),
    "k2s2": dict(kernel_size=2, stride=2),
    "k3s3p2_dil2": dict(kernel_size=3, stride=3, padding=2, dilation=2),
    "rect": dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
}


def layer_config(rotation="none", center="none", normalize=False, dynamic=True) -> LayerQuantConfig:
    a = QuantizerSpec(bits=8, granularity="token", dynamic=True) if dynamic else QuantizerSpec(bits=8)
    return LayerQuantConfig(w=QuantizerSpec(bits=4, granularity="channel"), a=a, rotation=rotation,
                            block=32, center=center, normalize=normalize)


def make(geometry: str, cin: int = 32, cout: int = 16, groups: int = 1, seed: int = 0) -> nn.ConvTranspose2d:
    torch.manual_seed(seed)
    conv = nn.ConvTranspose2d(cin, cout, groups=groups, **GEOMETRIES[geometry])
    with torch.no_grad():
        conv.bias.normal_(0, 0.1)
    return conv


def x_in(cin: int = 32, seed: int = 1, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(2, cin, 5, 6, generator=torch.Generator().manual_seed(seed)) + offset


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("knobs", [dict(), dict(rotation="single"), dict(rotation="double"),
                                   dict(center="dynamic"), dict(rotation="double", center="dynamic",
                                                                normalize=True)],
                         ids=["plain", "single", "double", "center", "hadanorm"])
def test_matches_float_with_quantizers_off(geometry, knobs):
    conv = make(geometry)
    q = QuantConvTranspose2d.from_float(conv, layer_config(**knobs))
    set_quantizers_enabled(q, False)
    x = x_in(offset=1.5)  # a large mean: centering must be exact at borders and inserted zeros
    with torch.no_grad():
        torch.testing.assert_close(q(x), conv(x), atol=ATOL, rtol=0)


def test_groups_and_output_size():
    conv = make("k3s2p1op1", cin=8, cout=12, groups=4)
    q = QuantConvTranspose2d.from_float(conv, layer_config())
    set_quantizers_enabled(q, False)
    x = x_in(cin=8)
    with torch.no_grad():
        torch.testing.assert_close(q(x), conv(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(q(x, output_size=(9, 11)), conv(x, output_size=(9, 11)), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="output_size=.*not reachable"):
        q(x, output_size=(20, 20))


@pytest.mark.parametrize("geometry", ["k4s2p1", "k3s2p1op1", "k3s3p2_dil2"])
@pytest.mark.parametrize("rotation", ["none", "single", "double"])
def test_fake_quant_equals_the_conv_over_the_zero_inserted_input(geometry, rotation):
    """What an integer runtime computes: quantize z = pad(zero_insert(x)), convolve with stride 1."""
    q = QuantConvTranspose2d.from_float(make(geometry), layer_config(rotation, dynamic=False))
    x = x_in()
    q.a_quant.set_table(torch.tensor([0.03]), None)
    with torch.no_grad(), use_timesteps(q, torch.zeros(2)):
        z = q.transform_input(q.pad(x), None)
        ref = F.conv2d(z, q.quant_weight(), q.bias, 1, 0, q.dilation, q.groups)
        torch.testing.assert_close(q(x), ref, atol=ATOL, rtol=0)
        assert not torch.allclose(q(x), q.to_float()(x), atol=1e-3)  # quantized for real


def test_weight_layouts_round_trip_and_to_float():
    conv = make("k4s2p1", cin=8, cout=12, groups=2)
    w = conv_weight_of_transpose(conv.weight, 2)
    assert w.shape == (12, 4, 4, 4)
    assert torch.equal(transpose_weight_of_conv(w, 2), conv.weight)
    q = QuantConvTranspose2d.from_float(make("k4s2p1"), layer_config("double"))
    back = q.to_float()
    assert isinstance(back, nn.ConvTranspose2d)
    torch.testing.assert_close(back.weight, make("k4s2p1").weight, atol=1e-6, rtol=0)


def test_gradients_reach_weights_and_step_sizes():
    q = QuantConvTranspose2d.from_float(make("k4s2p1"), layer_config("single"))
    q(x_in()).square().mean().backward()
    assert q.weight.grad.abs().sum() > 0 and q.w_quant.scale.grad.abs().sum() > 0


def test_prepare_swaps_transposed_convs_with_the_method_knobs():
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ConvTranspose2d(32, 32, 4, 2, 1),
                          nn.Conv2d(32, 32, 3, padding=1)).eval()
    cfg = QuantConfig(rotation="double", center="dynamic", normalize=True, a_dynamic=False, timestep_buckets=1)
    student, report = prepare(model, cfg)
    assert isinstance(student[1], QuantConvTranspose2d) and student[1].config.center == "dynamic"
    assert [e.kind for e in report.quantized] == ["Conv2d", "ConvTranspose2d", "Conv2d"]
    set_quantizers_enabled(student, False)
    x = x_in(offset=0.5)
    with torch.no_grad():
        torch.testing.assert_close(student(x), model(x), atol=1e-4, rtol=0)
