"""The call declaration (CallSpec), adapter registration, timestep buckets of continuous time, and mode hygiene."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from hqdm import QuantConfig, calibrate, prepare, quant_report, set_quantizers_enabled
from hqdm.adapters import ADAPTERS, Adapter, get_adapter, register_adapter
from hqdm.call import KEYWORD_ONLY, CallSpec
from hqdm.timesteps import timesteps_of

WIDTH = 32


class Labeled(nn.Module):
    """forward(x, t, y): a class-conditional MLP with a time MLP of input width 1 and dropout."""

    def __init__(self, classes: int = 4, fail_on: int | None = None) -> None:
        super().__init__()
        self.inp = nn.Linear(WIDTH, WIDTH)
        self.time = nn.Linear(1, WIDTH)
        self.label = nn.Embedding(classes + 1, WIDTH)
        self.drop = nn.Dropout(0.5)
        self.body = nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)
        self.fail_on = fail_on

    def forward(self, x, t, y=None):
        if self.fail_on is not None and y is not None and (y == self.fail_on).any():
            raise TypeError("an error inside the model")  # must reach the caller unchanged
        h = self.inp(x) + self.time(t.float()[:, None, None].expand(-1, x.shape[1], 1))
        if y is not None:
            h = h + self.label(y)[:, None]
        return self.out(self.drop(torch.relu(self.body(h))))


def _batches(n=2, batch=4, continuous=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.rand(batch, generator=g) if continuous else torch.randint(0, 1000, (batch,), generator=g)
        out.append({"x": torch.randn(batch, 3, WIDTH, generator=g), "t": t,
                    "y": torch.randint(0, 4, (batch,), generator=g)})
    return out


LABELED = CallSpec(sample=0, timestep=1, class_labels=2, num_classes=4, null_class=4)


# ---- the declaration --------------------------------------------------------------------------------------------
def test_arguments_follow_the_declaration_exactly():
    x, t, y, ctx = torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.zeros(2, 5, 8)
    args, kwargs = LABELED.arguments(x, t, y)
    assert args == (x, t, y) and kwargs == {}
    named = CallSpec(sample="sample", timestep="sigma", class_labels="cls", context="text")
    args, kwargs = named.arguments(x, t, y, ctx)
    assert args == () and kwargs.keys() == {"sample", "sigma", "cls", "text"}
    args, kwargs = CallSpec().arguments(x, t, y)  # labels for a call without them are dropped
    assert args == (x, t) and kwargs == {}
    with pytest.raises(ValueError, match="a context tensor was given but the call declares no context"):
        CallSpec().arguments(x, t, None, ctx)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(sample=None), "sample=None"),
    (dict(timestep=2), r"positional arguments \[0, 2\] leave a gap"),
    (dict(class_labels=1), "class_labels=1 is declared for 'timestep'"),
    (dict(context="not a name"), "context='not a name' must be a keyword name"),
    (dict(timesteps="continuous"), "needs time_max > 0"),
    (dict(time_max=1.0), "time_max=1.0 applies to continuous time"),
    (dict(prediction="flow"), "prediction='flow' .* needs path='flow'"),
    (dict(prediction="score"), "prediction='score' is not supported"),
    (dict(noise_at="one"), "noise_at='one'"),
    (dict(null_class=-1), "null_class=-1"),
    (dict(input_shape=(3, 0, 4)), "input_shape"),
])
def test_bad_declarations_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CallSpec(**kwargs)


def test_timestep_call_resolves_names_and_positions_from_the_forward():
    assert LABELED.timestep_call(Labeled.forward) == LABELED.timestep_call(Labeled.forward)
    call = LABELED.timestep_call(Labeled.forward)
    assert (call.name, call.position) == ("t", 1)
    call = CallSpec(sample="x", timestep="t").timestep_call(Labeled.forward)
    assert (call.name, call.position) == ("t", 1)
    assert CallSpec(sample="x", timestep="sigma").timestep_call().position == KEYWORD_ONLY


def test_yaml_declaration_parses_through_jsonargparse_and_round_trips():
    from jsonargparse import ArgumentParser

    text = """
call:
  sample: x
  timestep: t
  class_labels: y
  timesteps: continuous
  time_max: 1.0
  noise_at: zero
  prediction: sample
  path: flow
  num_classes: 10
  null_class: 10
  input_shape: [3, 16, 16]
"""
    parser = ArgumentParser()
    parser.add_argument("--call", type=CallSpec)
    cfg = parser.instantiate_classes(parser.parse_object(yaml.safe_load(text)))
    call = cfg.call
    assert call == CallSpec(sample="x", timestep="t", class_labels="y", timesteps="continuous", time_max=1.0,
                            noise_at="zero", prediction="sample", path="flow", num_classes=10, null_class=10,
                            input_shape=(3, 16, 16))
    assert CallSpec.from_dict(call.to_dict()) == call
    with pytest.raises(ValueError, match=r"keys \['timestep_range'\] are unknown"):
        CallSpec.from_dict({"timestep_range": [0, 1]})


# ---- the generic adapter ----------------------------------------------------------------------------------------
def test_generic_adapter_passes_labels_and_a_real_type_error_propagates():
    torch.manual_seed(0)
    model = Labeled(fail_on=3).eval()
    student, report = prepare(model, QuantConfig(a_dynamic=True), call=LABELED)
    adapter = get_adapter(student)
    assert adapter.call == LABELED and report.family == "generic"
    x, t = torch.randn(2, 3, WIDTH), torch.tensor([10, 900])
    with torch.no_grad():
        a = adapter.predict(model, x, t, torch.tensor([0, 1]))
        b = adapter.predict(model, x, t, torch.tensor([2, 1]))
    assert not torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the labels reach the model
    with pytest.raises(TypeError, match="an error inside the model"):
        adapter.predict(student, x, t, torch.tensor([3, 0]))


def test_generic_model_without_time_argument_still_feeds_its_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                          nn.Linear(WIDTH, WIDTH)).eval()
    call = CallSpec(timestep=None)
    student, _ = prepare(model, QuantConfig(timestep_buckets=4), call=call)
    batches = [{"x": torch.randn(4, 3, WIDTH), "t": torch.tensor([0, 300, 600, 999])}]
    calibrate(student, batches, progress=False)
    with torch.no_grad():
        out = get_adapter(student).predict(student, batches[0]["x"], batches[0]["t"])
    assert out.shape == (4, 3, WIDTH) and torch.isfinite(out).all()


def test_first_last_layers_at_end_bits_and_width_one_time_mlp_unrotated():
    student, report = prepare(Labeled(), QuantConfig(w_bits=4, a_bits=4, a_dynamic=True), call=LABELED)
    assert student.inp.w_quant.spec.bits == 8 and student.out.w_quant.spec.bits == 8
    assert student.body.w_quant.spec.bits == 4 and student.time.w_quant.spec.bits == 4
    assert student.time.config.rotation == "none" and student.body.config.rotation == "single"
    assert any(n.startswith("time: input width 1 < Hadamard block") for n in report.notes)


# ---- registration -----------------------------------------------------------------------------------------------
def test_registered_adapter_is_found_by_name_and_class():
    class MyNet(Labeled):
        pass

    adapter = Adapter(name="test_my_net", call=LABELED, end_layers=("inp", "out", "time"))
    try:
        register_adapter(adapter, classes=[MyNet])
        assert get_adapter(MyNet()) is adapter and get_adapter(Labeled(), "test_my_net") is adapter
        assert get_adapter(Labeled()).name == "generic"
        with pytest.raises(ValueError, match="'test_my_net' exists already"):
            register_adapter(adapter)
        student, report = prepare(MyNet(), QuantConfig(a_dynamic=True))
        assert report.family == "test_my_net" and student.time.w_quant.spec.bits == 8
        from hqdm import safe_io

        assert safe_io.model_class(f"{MyNet.__module__}.{MyNet.__qualname__}") is MyNet
    finally:
        ADAPTERS.pop("test_my_net", None)
    with pytest.raises(ValueError, match="'dit' exists already"):
        register_adapter(Adapter(name="dit"), overwrite=True)


# ---- continuous time ----------------------------------------------------------------------------------------------
def test_continuous_time_in_zero_one_fills_every_bucket():
    call = CallSpec(sample=0, timestep=1, class_labels=2, timesteps="continuous", time_max=1.0)
    student, _ = prepare(Labeled(), QuantConfig(timestep_buckets=4), call=call)
    set_quantizers_enabled(student, False)  # only the bucket indices matter here
    seen = []
    layer = student.body
    layer.register_forward_pre_hook(lambda m, a: seen.append(m.a_quant.bucket_index(a[0].shape[0], a[0].device)))
    with torch.no_grad():
        student(torch.randn(4, 3, WIDTH), torch.tensor([0.05, 0.3, 0.6, 0.99]), torch.zeros(4, dtype=torch.long))
    assert seen[0].tolist() == [0, 1, 2, 3]
    assert timesteps_of(student).t is None  # cleared after the call


@pytest.mark.parametrize("time_max", [1.0, 1000])
def test_continuous_time_tables_resample_to_any_bucket_count(time_max):
    from hqdm.layers import resample_timesteps

    call = CallSpec(sample=0, timestep=1, class_labels=2, timesteps="continuous", time_max=time_max)
    assert call.time_max == float(time_max)
    student, _ = prepare(Labeled(), QuantConfig(timestep_buckets=4, a_dynamic=False), call=call)
    calibrate(student, _batches(continuous=True), progress=False)
    before = student.body.a_quant.scale.detach().clone()  # (4, ...)
    resample_timesteps(student, 8)  # more buckets than time_max = 1.0 "timesteps": allowed for continuous time
    after = student.body.a_quant.scale.detach()
    assert after.shape[0] == 8 and student.body.a_quant.spec.timestep_buckets == 8
    assert torch.equal(after[::2], before) and torch.equal(after[1::2], before)  # each old bucket split in two
    with pytest.raises(ValueError, match="integer >= 1"):
        resample_timesteps(student, 0)


# ---- mode hygiene -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
def test_calibrate_and_report_restore_every_module_mode(train):
    torch.manual_seed(0)
    model = Labeled()
    student, _ = prepare(model.train(train), QuantConfig(timestep_buckets=2), call=LABELED)
    student.drop.eval()  # a submodule the caller keeps in eval inside a training model
    calibrate(student, _batches(), progress=False)
    assert student.training == train and not student.drop.training and student.body.training == train
    model.train(not train)
    quant_report(student, model, _batches())
    assert student.training == train and not student.drop.training and model.training == (not train)


def test_call_declaration_and_adapter_registration_are_public():
    import hqdm
    from hqdm import adapters, call

    assert hqdm.CallSpec is call.CallSpec and hqdm.register_adapter is adapters.register_adapter
    assert hqdm.Adapter is adapters.Adapter and {"CallSpec", "Adapter", "register_adapter"} <= set(hqdm.__all__)
