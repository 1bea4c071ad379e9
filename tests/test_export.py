"""export -> load_int on tiny diffusers models: bit-exact round trip, prediction parity, parity refusal, and one
clear error for each way an export directory can be broken or a model cannot be exported."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_batches
from safetensors.torch import load_file, save
from torch import nn

import hqdm
from hqdm.adapters import get_adapter
from hqdm.export import ExportSummary, export, export_layer
from hqdm.export_format import MANIFEST_FILE, WEIGHTS_FILE
from hqdm.metrics import sqnr_db
from hqdm.prepare import quant_layers
from hqdm.quant_primitives import unpack_int4
from hqdm.runtime import IntConv2d, IntLinear, load_int
from hqdm.safe_io import seal_manifest

PREDICTION_MARGIN_DB = 1.0
"""Held-out batch: the integer model is as close to float as the fake-quant model (measured within 0.1 dB; rounding
flips from float32 summation order make the two round differently, not worse)."""
LAYER_PARITY_FLOOR_DB = 80.0
"""Each layer on its fake-quant twin's exact input: same integers, only float32 summation order (~130 dB measured)."""
CONFIGS = {"W8A8": dict(w_bits=8, a_bits=8), "W4A8": dict(w_bits=4, a_bits=8), "W4A4": dict(w_bits=4, a_bits=4)}
METHODS = {"hqdm": dict(rotation="single"), "hadanorm": dict(rotation="double", center="dynamic", normalize=True)}


def _student(model, batches, **cfg):
    student, _ = hqdm.prepare(model, hqdm.QuantConfig(timestep_buckets=10, **cfg))
    hqdm.calibrate(student, batches, progress=False)
    return student


def _predict(model, batch):
    with torch.no_grad():
        return get_adapter(model).predict(model, batch["x"], batch["t"], batch["y"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny DiT at W4A4 (HQ-DM single rotation), calibrated and exported once with parity."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=1, out_channels=1,
                                num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10,
                                norm_num_groups=32).eval()
    batches = make_batches()
    student = _student(dit, batches, w_bits=4, a_bits=4)
    path = tmp_path_factory.mktemp("export") / "dit"
    summary = export(student, path, calibration_batches=batches)
    return student, path, summary


@pytest.fixture
def broken(exported, tmp_path):
    """A fresh copy of the exported directory to break."""
    path = tmp_path / "copy"
    shutil.copytree(exported[1], path)
    return path


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip_bit_exact(exported):
    student, path, summary = exported
    stored = load_file(path / WEIGHTS_FILE)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    expected = {k: v for k, v in student.state_dict().items() if k in manifest["model_tensors"]}
    for name, layer in quant_layers(student).items():
        expected.update(export_layer(name, layer)[1])
    assert set(stored) == set(expected)
    for key, value in expected.items():
        assert stored[key].dtype == value.dtype and torch.equal(stored[key], value), key
    model = load_int(path)
    assert "IntLinear(W4A4 (10 timestep buckets), rotation=single" in repr(model)
    state = model.state_dict()
    for key in manifest["model_tensors"]:
        assert torch.equal(state[key], stored[key]), key
    for name, layer in quant_layers(student).items():
        int_layer, rec = model.get_submodule(name), manifest["layers"][name]
        assert isinstance(int_layer, IntLinear | IntConv2d)
        q = layer.state().w_int
        w_int = stored[rec["tensors"]["w_int"]]
        assert torch.equal(unpack_int4(w_int) if rec["weight"]["storage"] == "int4x2" else w_int, q)
        for role in ("a_scale", "bias", "mu", "sigma"):
            if role in rec["tensors"]:
                assert torch.equal(getattr(int_layer, role), stored[rec["tensors"][role]]), (name, role)
    assert isinstance(summary, ExportSummary) and summary.ratio < 1 and "bf16" in str(summary)


def test_float_tensors_in_bf16(exported, tmp_path):
    student, path, full = exported
    summary = export(student, tmp_path / "m", float_dtype=torch.bfloat16)
    stored = load_file(tmp_path / "m" / WEIGHTS_FILE)
    emb = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    assert stored[emb].dtype == torch.bfloat16 and torch.equal(stored[emb], student.state_dict()[emb].bfloat16())
    assert summary.model_bytes * 2 == full.model_bytes and summary.file_bytes < full.file_bytes
    batch = make_batches(1, 4, seed=5)[0]
    assert sqnr_db(_predict(load_int(tmp_path / "m"), batch), _predict(load_int(path), batch)).item() > 30


def test_manifest_records_the_layer_spec(exported):
    manifest = json.loads((exported[1] / MANIFEST_FILE).read_text())
    assert manifest["format"] == "hqdm-int" and manifest["format_version"] == 2
    assert manifest["model_class"] == "DiTTransformer2DModel" and manifest["num_train_timesteps"] == 1000
    rec = manifest["layers"]["transformer_blocks.0.ff.net.2"]
    assert rec["config"]["w"]["bits"] == 4 and rec["weight"]["storage"] == "int4x2"
    assert rec["act"]["table_shape"] == [10] and rec["hadamard"]["order"] == rec["config"]["block"]
    assert rec["fold"]["parts"] >= 1 and rec["accumulator"]["bound"] < 2**31
    parity = manifest["parity"]
    assert parity["output_bound_db"] == pytest.approx(parity["fake_quant_vs_float_db"] - 1.0, abs=0.02)
    assert parity["int_vs_float_db"] >= parity["output_bound_db"]


# ---------------------------------------------------------------------------------------- prediction parity
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", CONFIGS)
@pytest.mark.parametrize("family", ["dit", "unet"])
def test_prediction_matches_fake_quant(family, bits, method, tiny_dit, tiny_unet, batches, tmp_path):
    model = tiny_dit if family == "dit" else tiny_unet
    student = _student(model, batches, **CONFIGS[bits], **METHODS[method])
    summary = export(student, tmp_path / "m", calibration_batches=batches)
    worst = summary.parity["worst_layer_sqnr_db"]
    assert worst == "inf" or worst > LAYER_PARITY_FLOOR_DB
    held_out = make_batches(1, 4, seed=11)[0]
    ref = _predict(student, held_out)
    out = _predict(load_int(tmp_path / "m"), held_out)
    hqdm.set_quantizers_enabled(student, False)
    fp = _predict(student, held_out)
    assert sqnr_db(out, fp).item() > sqnr_db(ref, fp).item() - PREDICTION_MARGIN_DB


def test_lora_is_merged_and_dynamic_tokens(tiny_dit, batches, tmp_path):
    rules = (hqdm.Rule(pattern="pos_embed.proj", a_dynamic=False),)  # a patch conv cannot take per-token scales
    student = _student(tiny_dit, batches, w_bits=4, a_bits=8, a_dynamic=True, rules=rules)
    layer = student.get_submodule("transformer_blocks.0.attn1.to_q")
    layer.add_lora(4)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    export(student, tmp_path / "m", calibration_batches=batches)
    rec = json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())["layers"]["transformer_blocks.0.attn1.to_q"]
    assert rec["act"]["mode"] == "token" and "a_scale" not in rec["tensors"]
    held_out = make_batches(1, 4, seed=3)[0]
    assert sqnr_db(_predict(load_int(tmp_path / "m"), held_out), _predict(student, held_out)).item() > 40


# ---------------------------------------------------------------------------------------------------- refusals
def test_parity_refuses_a_sabotaged_model(tiny_dit, batches, tmp_path):
    student = _student(tiny_dit, batches, w_bits=8, a_bits=8)
    target = student.get_submodule("transformer_blocks.1.ff.net.2")
    target.forward = lambda x, f=target.forward: 1.3 * f(x)  # the fake-quant model no longer matches its weights
    with pytest.raises(ValueError, match=r"refused.*transformer_blocks\.1\.ff\.net\.2"):
        export(student, tmp_path / "m", calibration_batches=batches)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary directory left


def test_refuses_to_overwrite_unless_asked(exported, tmp_path):
    student, path, _ = exported
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export(student, path)
    (tmp_path / "m").mkdir()
    export(student, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", MANIFEST_FILE,
                                                                   WEIGHTS_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_model_class_load_int_could_not_rebuild_is_refused_before_writing(tmp_path):
    student, _ = hqdm.prepare(nn.Sequential(nn.Linear(32, 32)), hqdm.QuantConfig(a_dynamic=True))
    with pytest.raises(ValueError, match=r"Sequential is neither a diffusers model class nor registered.*register_"):
        export(student, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_accumulator_overflow_is_refused():
    wide = nn.Sequential(nn.Linear(140_000, 2))
    student, _ = hqdm.prepare(wide, hqdm.QuantConfig(w_bits=8, a_bits=8, a_dynamic=True, rotation="none"))
    with torch.no_grad():
        student[0].weight[:, 0] = 10.0  # a clear absmax: per-channel scales give |w_int| = 127 there
        student[0].w_quant.init_from_weight(student[0].weight)
    with pytest.raises(ValueError, match=r"'0'.*int32 accumulator can overflow.*K=140000"):
        export_layer("0", student[0])


def test_ungemmable_activation_granularities_are_refused(tiny_unet, batches):
    student = _student(tiny_unet, batches[:1], a_dynamic=True, rules=(hqdm.Rule(pattern="conv_in", skip=True),))
    with pytest.raises(ValueError, match=r"per-token.*Conv2d.*a_dynamic=False"):
        export_layer("down_blocks.0.resnets.0.conv1", student.get_submodule("down_blocks.0.resnets.0.conv1"))
    layer = student.get_submodule("time_embedding.linear_1")
    layer.config = type(layer.config)(**{**layer.config.__dict__, "a": hqdm.QuantizerSpec(granularity="channel")})
    with pytest.raises(ValueError, match=r"time_embedding.linear_1.*granularity 'channel'.*no integer GEMM"):
        export_layer("time_embedding.linear_1", layer)


# ------------------------------------------------------------------------------------------- broken directories
def test_truncated_safetensors(broken):
    data = (broken / WEIGHTS_FILE).read_bytes()
    (broken / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_int(broken)


def test_corrupted_safetensors(broken):
    data = bytearray((broken / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        load_int(broken)


def test_wrong_format_version(broken):
    manifest = json.loads((broken / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (broken / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format_version=99.*reads version 2"):
        load_int(broken)


def test_edited_manifest_number_is_refused(broken):
    manifest = json.loads((broken / MANIFEST_FILE).read_text())
    manifest["layers"]["transformer_blocks.0.attn1.to_q"]["act"]["bits"] = 8  # an edited bit width
    (broken / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="modified after export"):
        load_int(broken)


def test_missing_tensor(broken):
    import hashlib

    tensors = load_file(broken / WEIGHTS_FILE)
    del tensors["transformer_blocks.0.attn1.to_k.w_scale"]
    data = save(tensors)
    (broken / WEIGHTS_FILE).write_bytes(data)
    manifest = json.loads((broken / MANIFEST_FILE).read_text())
    manifest["files"][WEIGHTS_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (broken / MANIFEST_FILE).write_text(json.dumps(seal_manifest(manifest)))  # resealed: only the tensor is missing
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn1\.to_k\.w_scale.*does not contain it"):
        load_int(broken)


def test_config_of_another_model_class(broken, tiny_unet):
    tiny_unet.save_config(broken)
    with pytest.raises(ValueError, match="UNet2DModel.*DiTTransformer2DModel.*mixes files of two models"):
        load_int(broken)


def test_missing_file(broken):
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_int(broken)


# ------------------------------------------------------------------------------- sampling the exported digits model
SAMPLE_PSNR_FLOOR_DB = 30.0
"""Final images of the integer model against the fake-quant model's, same seeds, 10 DDIM steps: rounding flips
from float32 summation order compound over the steps (32-47 dB measured on the digits teachers, PTQ)."""
SAMPLE_MARGIN_DB = 5.0
"""... and the export moves the images less than quantization itself does: int-vs-fake-quant PSNR exceeds the fake
quant model's PSNR against the FP teacher by this much (7-20 dB measured)."""


@pytest.mark.parametrize(
    "asset, bits, method",
    [("digits_dit", "W4A4", "hqdm"), ("digits_dit", "W4A4", "hadanorm"), ("digits_unet", "W4A4", "hqdm"),
     ("digits_unet", "W4A8", "hadanorm")],
)
def test_exported_digits_model_samples_like_the_fake_quant_model(asset, bits, method, tmp_path):
    from diffusers import DDIMScheduler, DDPMScheduler

    from hqdm.data.digits import load_digits_tensors
    from hqdm.trainers.evaluation import draw, image_fidelity
    from hqdm.trainers.module import class_info
    from hqdm.trainers.source import load_pretrained, resolve_path

    folder = resolve_path(f"hqdm:{asset}")
    teacher = load_pretrained(folder).eval()
    x0, y = load_digits_tensors(16)
    g, noising = torch.Generator().manual_seed(0), DDPMScheduler()
    batches = []
    for _ in range(4):
        i, t = torch.randint(0, len(y), (32,), generator=g), torch.randint(0, 1000, (32,), generator=g)
        batches.append({"x": noising.add_noise(x0[i], torch.randn(32, 1, 16, 16, generator=g), t), "t": t, "y": y[i]})
    student = _student(teacher, batches, **CONFIGS[bits], **METHODS[method])
    export(student, tmp_path / "int", calibration_batches=batches[:1])
    integer = load_int(tmp_path / "int")
    adapter = get_adapter(teacher)
    _, null = class_info(teacher, adapter)
    labels, scheduler = torch.arange(8) % 10, DDIMScheduler.from_pretrained(folder)
    images = {name: draw(m, adapter, scheduler, labels, (1, 16, 16), 10, 1.0, null, seed=0)
              for name, m in (("int", integer), ("fake_quant", student), ("teacher", teacher))}
    export_psnr = image_fidelity(images["int"], images["fake_quant"])["psnr_db"]
    quant_psnr = image_fidelity(images["fake_quant"], images["teacher"])["psnr_db"]
    assert export_psnr >= SAMPLE_PSNR_FLOOR_DB, (export_psnr, quant_psnr)
    assert export_psnr >= quant_psnr + SAMPLE_MARGIN_DB, (export_psnr, quant_psnr)


# ------------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("model", ["dit", "unet"])
def test_export_from_cuda_equals_export_from_cpu(model, tiny_dit, tiny_unet, tmp_path):
    """A student on CUDA exports (parity on CUDA) the same integers as on CPU, and loads and runs on CUDA."""
    batches = make_batches()
    student = _student(tiny_dit if model == "dit" else tiny_unet, batches, w_bits=4, a_bits=4)
    export(student, tmp_path / "cpu")
    cuda_batches = [{k: v.cuda() for k, v in b.items()} for b in batches]
    export(student.cuda(), tmp_path / "cuda", calibration_batches=cuda_batches)
    cpu_t, cuda_t = load_file(tmp_path / "cpu" / WEIGHTS_FILE), load_file(tmp_path / "cuda" / WEIGHTS_FILE)
    assert set(cpu_t) == set(cuda_t)
    ints = [k for k, v in cpu_t.items() if not v.is_floating_point()]
    assert ints and all(torch.equal(cpu_t[k], cuda_t[k]) for k in ints)
    held_out = {k: v.cuda() for k, v in make_batches(1, 4, seed=11)[0].items()}
    out = _predict(load_int(tmp_path / "cuda", device="cuda"), held_out)
    ref = _predict(student, held_out)
    hqdm.set_quantizers_enabled(student, False)
    fp = _predict(student, held_out)
    assert out.is_cuda and sqnr_db(out, fp).item() > sqnr_db(ref, fp).item() - PREDICTION_MARGIN_DB
