"""Sampling loop, guidance, grids and SQNR on a tiny analytic denoiser."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch import Tensor

from hqdm.call import CallSpec
from hqdm.metrics import sqnr_db
from hqdm.sampling import (
    PREDICTIONS,
    SCHEDULERS,
    RectifiedFlowEuler,
    add_noise,
    convert_prediction,
    guided,
    make_scheduler,
    path_coefficients,
    prediction_target,
    sample,
    save_grid,
    to_uint8,
)

SHAPE = (1, 4, 4)
NULL = 10


class Recorder:
    """eps = 0.1·x + 0.01·(y + 1): exact, elementwise, label-dependent; records every call's inputs."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def __call__(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        return 0.1 * x + 0.01 * (y.to(x.dtype) + 1).view(-1, 1, 1, 1)


def _labels() -> Tensor:
    return torch.tensor([0, 3, 7])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs(name):
    out = sample(Recorder(), make_scheduler(name), _labels(), SHAPE, num_steps=4, generator=_gen())
    assert out.shape == (3, *SHAPE)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["ddpm", "euler"])
def test_same_generator_same_output(name):
    sched = make_scheduler(name)
    a = sample(Recorder(), sched, _labels(), SHAPE, num_steps=5, generator=_gen(1))
    b = sample(Recorder(), sched, _labels(), SHAPE, num_steps=5, generator=_gen(1))
    c = sample(Recorder(), sched, _labels(), SHAPE, num_steps=5, generator=_gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_noise_is_drawn_on_cpu_from_the_generator():
    sched = make_scheduler("ddim")
    noise = torch.randn((3, *SHAPE), generator=_gen(5))
    from_gen = sample(Recorder(), sched, _labels(), SHAPE, num_steps=3, generator=_gen(5), device="cpu")
    from_noise = sample(Recorder(), sched, _labels(), SHAPE, num_steps=3, noise=noise)
    assert torch.equal(from_gen, from_noise)


def test_ddim_eta_uses_generator():
    sched = make_scheduler("ddim")
    det = sample(Recorder(), sched, _labels(), SHAPE, num_steps=4, generator=_gen(0))
    a = sample(Recorder(), sched, _labels(), SHAPE, num_steps=4, generator=_gen(0), eta=1.0)
    b = sample(Recorder(), sched, _labels(), SHAPE, num_steps=4, generator=_gen(0), eta=1.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, det)


def test_no_guidance_calls_denoiser_once_per_step_with_batch_b():
    den = Recorder()
    sample(den, make_scheduler("ddim"), _labels(), SHAPE, num_steps=6, generator=_gen())
    assert len(den.calls) == 6
    for x, t, y in den.calls:
        assert x.shape == (3, *SHAPE)
        assert t.shape == (3,) and t.dtype == torch.long
        assert torch.equal(y, _labels())


def test_guidance_calls_denoiser_once_per_step_with_batch_2b():
    den = Recorder()
    sample(den, make_scheduler("ddim"), _labels(), SHAPE, num_steps=6, guidance_scale=4.0, null_class=NULL)
    assert len(den.calls) == 6
    for x, t, y in den.calls:
        assert x.shape == (6, *SHAPE)
        assert torch.equal(x[:3], x[3:]) and torch.equal(t[:3], t[3:])
        assert torch.equal(y, torch.tensor([0, 3, 7, NULL, NULL, NULL]))


def test_guidance_formula_is_exact():
    den, s = Recorder(), 3.5
    x, t, y = torch.randn(3, *SHAPE, generator=_gen()), torch.full((3,), 500), _labels()
    eps_c, eps_u = den(x, t, y), den(x, t, torch.full_like(y, NULL))
    torch.testing.assert_close(guided(den, s, NULL)(x, t, y), eps_u + s * (eps_c - eps_u), atol=0, rtol=0)
    assert guided(den, 1.0, NULL) is den


def test_guided_sample_matches_manual_loop():
    sched, s = make_scheduler("ddim"), 2.0
    noise = torch.randn((3, *SHAPE), generator=_gen(3))
    out = sample(Recorder(), sched, _labels(), SHAPE, num_steps=4, guidance_scale=s, null_class=NULL, noise=noise)
    ref_sched, den, x = make_scheduler("ddim"), Recorder(), noise.clone()
    ref_sched.set_timesteps(4)
    for t in ref_sched.timesteps:
        tb = t.repeat(3)
        eps_c, eps_u = den(x, tb, _labels()), den(x, tb, torch.full((3,), NULL))
        x = ref_sched.step(eps_u + s * (eps_c - eps_u), t, x).prev_sample
    torch.testing.assert_close(out, x, atol=0, rtol=0)


def test_callback_sees_every_step():
    seen = []
    den = Recorder()
    cb = lambda i, t, x, eps: seen.append((i, t, x, eps))  # noqa: E731
    sample(den, make_scheduler("dpm"), _labels(), SHAPE, num_steps=5, generator=_gen(), callback=cb)
    assert [i for i, *_ in seen] == list(range(5))
    for (_, t, x, eps), (x_in, t_in, _) in zip(seen, den.calls):
        assert t.shape == (3,) and x.shape == eps.shape == (3, *SHAPE)
        assert torch.equal(x, x_in) and torch.equal(t, t_in)


def test_euler_gets_scaled_input_and_rounded_long_timesteps():
    sched, den = make_scheduler("euler"), Recorder()
    noise = torch.randn((3, *SHAPE), generator=_gen())
    sample(den, sched, _labels(), SHAPE, num_steps=7, noise=noise)
    ref = make_scheduler("euler")
    ref.set_timesteps(7)
    assert not torch.equal(ref.timesteps, ref.timesteps.round())  # float timesteps exercised
    for (_, t, _), t_ref in zip(den.calls, ref.timesteps):
        assert t.dtype == torch.long and torch.equal(t, t_ref.round().long().repeat(3))
    first_in = den.calls[0][0]
    sigma = ref.sigmas[0]
    torch.testing.assert_close(first_in, noise * sigma / (sigma**2 + 1).sqrt())


def test_scheduler_not_mutated():
    sched = make_scheduler("dpm")
    sample(Recorder(), sched, _labels(), SHAPE, num_steps=3, generator=_gen())
    assert sched.num_inference_steps is None
    assert len(sched.timesteps) == 1000


def test_errors():
    with pytest.raises(ValueError, match=r"'heun'.*'ddim'"):
        make_scheduler("heun")
    with pytest.raises(ValueError, match="null_class"):
        sample(Recorder(), make_scheduler("ddim"), _labels(), SHAPE, guidance_scale=2.0)
    with pytest.raises(ValueError, match="num_steps=0"):
        sample(Recorder(), make_scheduler("ddim"), _labels(), SHAPE, num_steps=0)
    with pytest.raises(ValueError, match="eta"):
        sample(Recorder(), make_scheduler("euler"), _labels(), SHAPE, num_steps=2, eta=0.5)
    with pytest.raises(ValueError, match="noise has shape"):
        sample(Recorder(), make_scheduler("ddim"), _labels(), SHAPE, num_steps=2, noise=torch.zeros(2, *SHAPE))


def test_to_uint8_clamps():
    out = to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]))
    assert out.dtype == torch.uint8
    assert out.tolist() == [0, 0, 128, 255, 255]


def test_save_grid_single_panel(tmp_path):
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    path = save_grid(images, str(tmp_path / "sub" / "grid.png"))
    with Image.open(path) as im:
        assert im.format == "PNG"
        cell = 8 * 8  # 8 px upscaled x8 to reach 64 px
        assert im.size == (2 * (cell + 2) + 2, 2 * (cell + 2) + 2)


def test_save_grid_two_captioned_panels(tmp_path):
    teacher, student = torch.zeros(3, 1, 32, 32), torch.ones(3, 1, 32, 32)
    path = save_grid([teacher, student], str(tmp_path / "pair.png"), nrow=3, labels=["teacher", "student"])
    single = save_grid(teacher, str(tmp_path / "one.png"), nrow=3)
    with Image.open(path) as pair, Image.open(single) as one:
        assert pair.width > 2 * one.width
        assert pair.height > one.height  # caption band
        assert one.size == (3 * (64 + 2) + 2, 64 + 2 + 2)
    with pytest.raises(ValueError, match="one caption per panel"):
        save_grid([teacher, student], str(tmp_path / "x.png"), labels=["teacher"])
    with pytest.raises(ValueError, match="C in"):
        save_grid(torch.zeros(2, 4, 8, 8), str(tmp_path / "x.png"))


def test_sqnr_db():
    ref = torch.ones(2, 3, 4)
    assert math.isinf(sqnr_db(ref, ref).item())
    torch.testing.assert_close(sqnr_db(ref + 0.1, ref).float(), torch.tensor(20.0), atol=1e-4, rtol=0)
    ref = ref.double()  # 1.01 is not exact in float32
    x = ref.clone()
    x[1] += 0.01
    per_sample = sqnr_db(x, ref, dim=0)
    assert per_sample.shape == (2,) and per_sample.dtype == torch.float64
    assert math.isinf(per_sample[0].item())
    torch.testing.assert_close(per_sample[1], torch.tensor(40.0, dtype=torch.float64))


# ---- declared calls: model time, prediction conversion, flow samplers, guidance interval -------------------------
X_STAR = torch.tensor([[0.5, -0.25, 0.75, -0.5]]).repeat(4, 1).view(1, *SHAPE)
"""The whole data distribution (a point mass): an exact denoiser of it lands every sampler on it."""


def _exact(call: CallSpec, alphas=None, T=1000):
    """The exact prediction of `call` for data = X_STAR at the model's own time t (computed from t itself)."""
    calls = []

    def denoiser(x, t, y):
        calls.append(t.clone())
        a, b = path_coefficients(call, t, T, alphas)
        eps = (x - a * X_STAR) / b
        truth = {"epsilon": eps, "sample": X_STAR.expand_as(x), "v_prediction": a * eps - b * X_STAR,
                 "flow": call.flow_sign * (eps - X_STAR)}
        return truth[call.prediction]

    return denoiser, calls


FLOW_CALLS = {
    "sd3_like": CallSpec(timesteps="continuous", time_max=1000.0, prediction="flow", path="flow"),
    "rf_velocity": CallSpec(timesteps="continuous", time_max=1.0, noise_at="zero", prediction="flow", path="flow"),
    "rf_x0": CallSpec(timesteps="continuous", time_max=1.0, noise_at="zero", prediction="sample", path="flow"),
    "flow_v": CallSpec(timesteps="continuous", time_max=1.0, prediction="v_prediction", path="flow"),
}


@pytest.mark.parametrize("scheduler", ["rf_euler", "flow_euler"])
@pytest.mark.parametrize("kind", list(FLOW_CALLS))
def test_flow_samplers_land_exact_predictions_on_the_data(scheduler, kind):
    call = FLOW_CALLS[kind]
    den, times = _exact(call)
    out = sample(den, make_scheduler(scheduler), torch.zeros(2, dtype=torch.long), SHAPE, num_steps=5,
                 generator=_gen(), call=call)
    torch.testing.assert_close(out, X_STAR.expand(2, *SHAPE), atol=1e-5, rtol=0)  # Euler is exact on straight paths
    first = times[0][0].item()
    assert first == pytest.approx(call.time_max if call.noise_at == "max" else 0.0)  # pure noise at the first step


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_ddim_converts_any_declared_prediction(prediction):
    sched = make_scheduler("ddim")  # steps noise predictions
    call = CallSpec(prediction=prediction)
    den, times = _exact(call, sched.alphas_cumprod)
    out = sample(den, sched, torch.zeros(2, dtype=torch.long), SHAPE, num_steps=4, generator=_gen(), call=call)
    torch.testing.assert_close(out, X_STAR.expand(2, *SHAPE), atol=1e-4, rtol=0)
    assert all(t.dtype == torch.long for t in times)


def test_continuous_time_on_a_diffusion_scheduler_is_the_scaled_index():
    call = CallSpec(timesteps="continuous", time_max=1.0)
    den = Recorder()
    sample(lambda x, t, y: den(x, t, y), make_scheduler("ddim"), _labels(), SHAPE, num_steps=4, call=call,
           generator=_gen())
    ref = make_scheduler("ddim")
    ref.set_timesteps(4)
    for (_, t, _), s in zip(den.calls, ref.timesteps):
        torch.testing.assert_close(t, (s / 1000.0).float().repeat(3))


def test_a_flow_call_on_a_diffusion_scheduler_is_refused():
    with pytest.raises(ValueError, match=r"DDIMScheduler steps a diffusion path but the model's call declares "
                                         r"path='flow'"):
        sample(Recorder(), make_scheduler("ddim"), _labels(), SHAPE, num_steps=2, call=FLOW_CALLS["rf_x0"])


def test_convert_prediction_round_trips_every_pair():
    g = _gen(4)
    x0, eps = torch.randn(2, *SHAPE, generator=g), torch.randn(2, *SHAPE, generator=g)
    for a, b in ((0.8, 0.6), (0.3, 0.7)):  # a variance-preserving point and a flow point
        x = a * x0 + b * eps
        truth = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - b * x0, "flow": eps - x0}
        for src in PREDICTIONS:
            for dst in PREDICTIONS:
                got = convert_prediction(truth[src], x, a, b, src, dst)
                torch.testing.assert_close(got, truth[dst], atol=1e-5, rtol=0)
        torch.testing.assert_close(convert_prediction(x0 - eps, x, a, b, "flow", "sample", flow_sign=-1), x0)
    with pytest.raises(ValueError, match="'score'"):
        convert_prediction(x0, x0, 1.0, 0.5, "score", "epsilon")


def test_training_targets_match_diffusers():
    sched = make_scheduler("ddpm", prediction_type="v_prediction")
    g = _gen(6)
    x0, noise, t = torch.randn(3, *SHAPE, generator=g), torch.randn(3, *SHAPE, generator=g), torch.tensor([5, 400, 990])
    call = CallSpec(prediction="v_prediction")
    torch.testing.assert_close(add_noise(call, x0, noise, t, 1000, sched.alphas_cumprod), sched.add_noise(x0, noise, t))
    torch.testing.assert_close(prediction_target(call, x0, noise, t, 1000, sched.alphas_cumprod),
                               sched.get_velocity(x0, noise, t), atol=1e-5, rtol=1e-5)
    rf = FLOW_CALLS["rf_velocity"]
    tf = torch.tensor([0.0, 0.25, 0.9])
    torch.testing.assert_close(add_noise(rf, x0, noise, tf, 1000), tf.view(-1, 1, 1, 1) * x0
                               + (1 - tf.view(-1, 1, 1, 1)) * noise)
    torch.testing.assert_close(prediction_target(rf, x0, noise, tf, 1000), x0 - noise, atol=1e-6, rtol=0)


def test_guidance_interval_guides_only_inside_it():
    den = Recorder()
    sample(den, make_scheduler("ddim"), _labels(), SHAPE, num_steps=4, guidance_scale=3.0, null_class=NULL,
           guidance_interval=(0.0, 0.5), generator=_gen())
    # DDIM with 4 of 1000 steps visits t = 750, 500, 250, 0: noise levels 0.75 (unguided), 0.5, 0.25, 0 (guided)
    assert [x.shape[0] for x, _, _ in den.calls] == [3, 6, 6, 6]
    with pytest.raises(ValueError, match="guidance_interval"):
        sample(den, make_scheduler("ddim"), _labels(), SHAPE, guidance_scale=2.0, null_class=NULL,
               guidance_interval=(0.8, 0.2))


def test_text_guidance_pairs_the_null_condition():
    seen = []

    def den(x, t, y, context):
        seen.append(context.clone())
        return 0.1 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    ctx, null = torch.ones(3, 2, 5), torch.zeros(3, 2, 5)
    sample(den, make_scheduler("ddim"), torch.zeros(3, dtype=torch.long), SHAPE, num_steps=2, guidance_scale=2.0,
           cond={"context": ctx}, null_cond={"context": null}, generator=_gen())
    assert all(torch.equal(c, torch.cat([ctx, null])) for c in seen)


def test_rectified_flow_euler_grid_and_shift():
    rf = RectifiedFlowEuler(shift=3.0)
    rf.set_timesteps(4)
    s = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    torch.testing.assert_close(rf.sigmas, 3 * s / (1 + 2 * s))
    torch.testing.assert_close(rf.timesteps, rf.sigmas[:-1] * 1000)
    with pytest.raises(ValueError, match="shift=0"):
        RectifiedFlowEuler(shift=0)
