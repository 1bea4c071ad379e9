"""The trainer's side of declared calls: noising on the declared path, student dropout, the sampler check, and
text-conditioned batches from cached prompt embeddings."""

from __future__ import annotations

import pytest
import torch
from any_denoiser_zoo import UNET_CALL, VIT_CALL, ZooViT
from safetensors.torch import save_file

from hqdm import QuantConfig
from hqdm.data.text import PromptEmbeddingDataModule, load_prompt_embeds
from hqdm.trainers.inputs import DiffusionInputs
from hqdm.trainers.module import DistillModule
from hqdm.trainers.options import Diffusion
from hqdm.trainers.source import ModelSource

VIT_SOURCE = ModelSource(class_name=f"{ZooViT.__module__}.ZooViT", init_args={"size": 8, "width": 32})


def test_rectified_flow_noising_and_clean_image_target():
    inputs = DiffusionInputs(Diffusion(sampler="rf_euler"), 10, 0.0, target=True, call=VIT_CALL, declared=True)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    out = inputs({"x": x0, "y": torch.arange(6)}, torch.Generator().manual_seed(0))
    t = out["t"]
    assert t.is_floating_point() and ((0 <= t) & (t < 1)).all()  # continuous time in [0, time_max)
    g = torch.Generator().manual_seed(0)
    torch.rand(6, generator=g)  # the timesteps drawn first
    noise = torch.randn(x0.shape, generator=g)
    w = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(out["x_t"], w * x0 + (1 - w) * noise)  # noise at t = 0, data at t = 1
    assert torch.equal(out["target"], x0)  # prediction='sample'
    strat = inputs.stratified({"x": x0, "y": torch.arange(6)}, 4, torch.Generator().manual_seed(1))
    assert strat["t"].is_floating_point() and sorted((strat["t"] * 4).floor().long().tolist()[:4]) == [0, 1, 2, 3]


def test_declared_diffusion_call_must_match_the_prediction_type():
    call = UNET_CALL.__class__(**{**UNET_CALL.to_dict(), "prediction": "sample"})
    with pytest.raises(ValueError, match="diffusion.prediction_type: sample"):
        DiffusionInputs(Diffusion(), None, 0.0, target=True, call=call, declared=True)


def test_sampler_must_step_the_declared_path():
    with pytest.raises(ValueError, match="flow_euler or rf_euler"):
        DistillModule(VIT_SOURCE, QuantConfig(w_bits=8, a_bits=8), diffusion=Diffusion(sampler="ddim"), call=VIT_CALL)
    with pytest.raises(ValueError, match="guidance_interval"):
        Diffusion(guidance_interval=(0.8, 0.2))


@pytest.mark.parametrize("live", [False, True])
def test_student_dropout_is_an_explicit_option(live):
    module = DistillModule(VIT_SOURCE, QuantConfig(w_bits=8, a_bits=8), diffusion=Diffusion(sampler="rf_euler"),
                           call=VIT_CALL, student_dropout=live)
    drops = [m.p for m in module.student.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(p == (0.1 if live else 0.0) for p in drops)
    assert all(m.p == 0.1 for m in module.teacher.modules() if isinstance(m, torch.nn.Dropout))  # teacher untouched
    assert module.inputs.call == VIT_CALL and module.adapter.call == VIT_CALL


def test_prompt_embedding_dataset(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "p.safetensors"
    save_file({"x": torch.randn(5, 3, 8, 8, generator=g), "context": torch.randn(5, 4, 32, generator=g),
               "pooled": torch.randn(5, 16, generator=g)}, str(path))
    data = PromptEmbeddingDataModule(str(path), batch_size=2, val_fraction=0.2)
    data.prepare_data()
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["context"].shape == (2, 4, 32) and batch["pooled"].shape == (2, 16) and batch["y"].tolist() == [0, 0]
    assert len(data.val_set) == 1
    save_file({"context": torch.randn(2, 4, 32), "pooled": torch.randn(3, 16)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="pooled has shape"):
        load_prompt_embeds(str(tmp_path / "bad.safetensors"))
    save_file({"context": torch.randn(2, 4, 32), "text": torch.randn(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match="nothing else"):
        load_prompt_embeds(str(tmp_path / "odd.safetensors"))
