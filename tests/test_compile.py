"""Compile-clean hot paths: the prepared students and their `load_int` models trace into one graph with no breaks,
and calls at other timesteps (same shapes) reuse it instead of recompiling."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

import hqdm
from hqdm.adapters import get_adapter
from hqdm.trainers.source import asset_path

MODELS = {"dit": DiTTransformer2DModel, "unet": UNet2DModel}


def _batches(model, n: int = 2, seed: int = 0) -> list[dict]:
    c, s = model.config.in_channels, model.config.sample_size
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(2, c, s, s, generator=g), "t": torch.randint(0, 1000, (2,), generator=g),
             "y": torch.randint(0, 10, (2,), generator=g)} for _ in range(n)]


@pytest.fixture(scope="module", params=list(MODELS))
def models(request, tmp_path_factory):
    """(name, calibrated W4A4 student, its load_int model, batches) of a shipped digits teacher."""
    teacher = MODELS[request.param].from_pretrained(asset_path(f"digits_{request.param}")).eval()
    batches = _batches(teacher)
    student, _ = hqdm.prepare(teacher, hqdm.QuantConfig(w_bits=4, a_bits=4, timestep_buckets=10))
    hqdm.calibrate(student, batches, progress=False)
    path = tmp_path_factory.mktemp(request.param) / "int"
    hqdm.export(student, path)
    return request.param, student, hqdm.load_int(path), batches


def _call(model):
    adapter = get_adapter(model)
    return lambda b: adapter.predict(model, b["x"], b["t"], b["y"])


@pytest.mark.parametrize("which", ["eval", "train", "int"])
def test_zero_graph_breaks(models, which):
    name, student, int_model, batches = models
    model = int_model if which == "int" else getattr(student, which)()
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(_call(model))(batches[0])
    reasons = [r.reason for r in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, (name, which, reasons[:3])


@pytest.mark.parametrize("which", ["student", "int"])
def test_other_timesteps_reuse_the_compiled_graph(models, which):
    from torch._dynamo.testing import CompileCounter

    name, student, int_model, batches = models
    model = int_model if which == "int" else student.eval()
    torch._dynamo.reset()
    counter = CompileCounter()
    run = torch.compile(_call(model), backend=counter, fullgraph=True)
    with torch.no_grad():
        outs = [run({**batches[0], "t": torch.tensor(t)}) for t in ([0, 999], [420, 7], [999, 999])]
        eager = _call(model)({**batches[0], "t": torch.tensor([420, 7])})
    assert counter.frame_count == 1, (name, which, counter.frame_count)
    assert torch.equal(outs[1], eager)  # the compiled graph read the timesteps of its own call
