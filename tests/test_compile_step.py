"""The compiled training step (DistillModule(compile=True)): one graph, the eager loss and gradients, no recompile at
other timesteps, unchanged checkpoints and an exact resume; the cached teacher's step equals the live one's; fake
quantization keeps no float32 copies of a bf16 activation for the backward."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from hqdm.calibrate import calibrate
from hqdm.config import QuantConfig
from hqdm.data import DigitsDataModule
from hqdm.fake_quantizer import fake_quantize_lean
from hqdm.quant_primitives import fake_quantize
from hqdm.trainers import Diffusion, DistillModule, Evaluation, Loss, ModelSource

DIT = ModelSource(class_name="DiTTransformer2DModel", init_args=dict(
    sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=1, num_attention_heads=2,
    attention_head_dim=16, num_embeds_ada_norm=10))
UNET = ModelSource(class_name="UNet2DModel", init_args=dict(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=[16], layers_per_block=1,
    down_block_types=["DownBlock2D"], up_block_types=["UpBlock2D"], add_attention=False, norm_num_groups=8,
    num_class_embeds=11))  # one level, no attention: compiling its forward and backward stays cheap
FAST = dict(calibration_batches=1, diffusion=Diffusion(num_steps=2), evaluation=Evaluation(num_samples=2, buckets=2))
GRAPHS: list[int] = []
"""Graphs the counting backend compiled (one entry per graph)."""


@torch._dynamo.register_backend(name="hqdm_test_counting")
def counting(gm, example_inputs):
    """aot_eager (forward and backward graphs through AOTAutograd, no code generation) that counts its graphs."""
    from torch._dynamo.backends.debugging import aot_eager

    GRAPHS.append(1)
    return aot_eager(gm, example_inputs)


def module_of(source: ModelSource, compile: bool, backend: str = "hqdm_test_counting", **kw) -> DistillModule:
    torch.manual_seed(0)
    return DistillModule(source, quant=QuantConfig(timestep_buckets=4), compile=compile, compile_backend=backend,
                         **{**FAST, **kw})


def inputs_at(module: DistillModule, t: list[int]) -> dict:
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(2, 1, 8, 8, generator=g), "y": torch.tensor([3, 10])}
    return module.inputs(batch, g, timesteps=torch.tensor(t))


def loss_and_grads(module: DistillModule, loss_fn, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.student.zero_grad(set_to_none=True)
    loss, _ = loss_fn(inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("source, loss", [(DIT, Loss(feature_weight=0.5)), (UNET, Loss())], ids=["dit", "unet"])
def test_compiled_step_is_one_graph_with_the_eager_loss_and_gradients(source, loss):
    module = module_of(source, compile=True, loss=loss)
    calibrate(module.student, [{"x": i["x_t"], "t": i["t"], "y": i["y"]} for i in
                               (inputs_at(module, [10, 990]), inputs_at(module, [500, 250]))], progress=False)
    module.train()
    assert module.compiles
    torch._dynamo.reset()
    GRAPHS.clear()
    want, want_grads = loss_and_grads(module, module.compute_loss, inputs_at(module, [10, 990]))
    got, got_grads = loss_and_grads(module, module.step_loss, inputs_at(module, [10, 990]))
    later = [loss_and_grads(module, module.step_loss, inputs_at(module, t))[0] for t in ([999, 0], [420, 7])]
    eager_later = loss_and_grads(module, module.compute_loss, inputs_at(module, [420, 7]))[0]

    # fullgraph=True raises at any graph break, so one compiled graph is the whole forward: 0 breaks, and the
    # calls at other timesteps (same shapes) reused it.
    assert len(GRAPHS) == 1, f"{len(GRAPHS)} graphs: a break or a recompile"
    assert want_grads.keys() == got_grads.keys() and any(".a_quant.scale" in n for n in got_grads)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(later[1], eager_later, rtol=1e-5, atol=0)
    assert not torch.equal(later[0], later[1]), "the compiled graph must read each call's timesteps"


def test_compile_defaults_to_the_device_and_names_a_bad_backend():
    module = DistillModule(DIT, quant=QuantConfig(), **FAST)
    assert module.hparams.compile is None and not module.compiles  # on the CPU; CUDA turns it on
    with pytest.raises(ValueError, match="compile_backend='inductr' is not a torch.compile backend"):
        DistillModule(DIT, quant=QuantConfig(), compile_backend="inductr", **FAST)


def fit(module: DistillModule, root, steps: int, ckpt_path=None, **kw) -> Trainer:
    t = Trainer(default_root_dir=root, accelerator="cpu", logger=False, enable_progress_bar=False,
                enable_model_summary=False, max_steps=steps, limit_val_batches=0, **kw)
    t.fit(module, DigitsDataModule(resolution=8, batch_size=4), ckpt_path=ckpt_path)
    return t


def test_compiled_fit_keeps_checkpoint_keys_and_resumes_exactly(tmp_path):
    every_2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    full = module_of(DIT, compile=True, backend="eager")  # dynamo's graphs, run by eager autograd: the cheapest
    fit(full, tmp_path, 3, callbacks=[every_2])
    mid = next((tmp_path / "ckpt").glob("*step=2.ckpt"))
    saved = torch.load(mid, weights_only=False)["state_dict"]
    eager_keys = {k for k in module_of(DIT, compile=False).state_dict() if not k.startswith("teacher.")}
    assert set(saved) == eager_keys, "compiling must not rename or add state_dict keys"

    resumed = module_of(DIT, compile=True, backend="eager")
    fit(resumed, tmp_path, 3, enable_checkpointing=False, ckpt_path=mid)
    want, got = full.student.state_dict(), resumed.student.state_dict()
    tensors = [k for k, v in want.items() if isinstance(v, torch.Tensor)]
    assert any(not torch.equal(want[k], saved["student." + k]) for k in tensors), "step 3 must have trained"
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in tensors)


def test_cached_teacher_step_equals_the_live_teacher_step():
    """A trajectory row's recorded target is what the live teacher predicts for it: the same loss either way."""
    module = module_of(DIT, compile=False)
    rows = next(module.trajectory_sampler().rows(num_samples=2, batch_size=2, seed=0))
    calibrate(module.student, [{"x": rows["x_t"], "t": rows["t"], "y": rows["y"]}], progress=False)
    module.train()
    cached = module.inputs(rows)
    live = {**cached, "target": None}
    assert cached["target"] is not None
    calls = []
    handle = module.teacher.register_forward_hook(lambda *a: calls.append(1))
    cached_loss, live_loss = module.compute_loss(cached)[0], None
    assert not calls, "a cached-teacher step must not run the teacher"
    live_loss = module.compute_loss(live)[0]
    handle.remove()
    assert calls == [1]
    torch.testing.assert_close(cached_loss, live_loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "asym"])
def test_fake_quant_keeps_only_its_inputs_for_backward(asymmetric):
    """The forward is the reference's bit for bit, the STE / LSQ gradients agree with autograd through it, and a
    bf16 input leaves no float32 tensor of its size saved for the backward (the reference leaves two)."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 16, 32, generator=g)).to(torch.bfloat16).requires_grad_()
    s = (0.1 + 0.5 * torch.rand(4, 1, 1, generator=g)).requires_grad_()
    z = torch.randint(-3, 3, (4, 1, 1), generator=g).float().requires_grad_() if asymmetric else None
    leaves = [x, s] + ([z] if asymmetric else [])
    out = {}
    for name, fn in (("reference", fake_quantize), ("lean", fake_quantize_lean)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn(x, s, z, -8, 7)
        big_fp32 = [t for t in saved if t.dtype == torch.float32 and t.numel() == x.numel()]
        out[name] = (y, torch.autograd.grad(y, leaves, torch.ones_like(y) / 7), len(big_fp32))
    (y_ref, grads_ref, fp32_ref), (y, grads, fp32) = out["reference"], out["lean"]
    assert torch.equal(y, y_ref) and y.dtype == y_ref.dtype
    assert fp32_ref >= 2 and fp32 == 0
    assert (grads_ref[0] == 0).any() and (grads_ref[0] != 0).any()  # clipped and unclipped elements both present
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
