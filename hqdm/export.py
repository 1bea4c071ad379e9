"""export(): a prepared (calibrated, trained) student becomes a directory that `hqdm.load_int` runs in integers.

    out_dir/ config.json        the diffusers model config (student.save_config)
             hqdm_quant.json    format version; per layer: kind, quantizer specs, rotation, center / normalize,
                                fold, accumulator bound, tensor names; sizes, sha256 and parity figures
             model.safetensors  weights as int8, or int4 packed two per byte, [N, K] with K contiguous; scales,
                                zero points, activation tables, μ, σ, biases, W_c; every other model tensor
             README.md          model card: source, recipe, bits per layer, size, parity, metrics, command

Weights are stored at their own bit width in their own basis. rotation='single' folds Rᵀ into the weight
exactly in integers, which widens its range by up to the Hadamard order n: the export computes that fold, checks
it and the int32 accumulator bound and records the digit count, and `load_int` builds it (storing it would cost
16 bits per weight). Static centering folds μ·W_cᵀ into the bias in float64. Nothing is pickled; the directory
is written under a temporary name and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from hqdm import export_format as fmt
from hqdm import qlayer, safe_io
from hqdm.adapters import get_adapter
from hqdm.calibrate import forward_batch
from hqdm.fake_quantizer import FakeQuantizer
from hqdm.layers import QuantConv2d, QuantLayer, layer_config_to_dict, set_quantizers_enabled
from hqdm.metrics import SQNRSum
from hqdm.model_card import write_card
from hqdm.prepare import quant_layers
from hqdm.runtime import load_int
from hqdm.timesteps import timesteps_of, use_timesteps

PARITY_LAYER_SQNR_DB = 40.0
"""Per layer on identical inputs both paths hold the same integers; only float32 summation order (~1e-6) differs."""
PARITY_OUTPUT_MARGIN_DB = 1.0
"""End to end, the integer model may be at most 1 dB further from float than the fake-quant model: once float32
summation order flips one rounding, the two models round the same signal differently (equally far from float,
measured within 0.1 dB); a real mismatch adds an error of its own."""


@dataclass
class ExportSummary:
    """What export wrote: sizes against the bf16 model and the parity figures."""

    path: Path
    layers: int
    file_bytes: int
    """Bytes of model.safetensors."""
    weight_bytes: int
    """Integer weights (int8 or int4 packed)."""
    qparam_bytes: int
    """Scales, zero points, activation tables, μ, σ, W_c and biases of the quantized layers."""
    model_bytes: int
    """Every other tensor of the model (norms, embeddings, layers left in floating point), as stored."""
    bf16_bytes: int
    """The same model with every floating-point tensor in bf16."""
    parity: dict | None = None

    @property
    def ratio(self) -> float:
        """Exported size / bf16 size."""
        return self.file_bytes / self.bf16_bytes

    def __str__(self) -> str:
        mb = lambda b: f"{b / 2**20:10.2f} MiB"  # noqa: E731
        lines = [
            f"hqdm export: {self.layers} integer layers -> {self.path}",
            f"  integer weights           {mb(self.weight_bytes)}",
            f"  scales, tables, μ, σ, W_c {mb(self.qparam_bytes)}",
            f"  other model tensors       {mb(self.model_bytes)}",
            f"  {fmt.WEIGHTS_FILE:<25} {mb(self.file_bytes)}   {self.ratio:.3f}× the bf16 model "
            f"({self.bf16_bytes / 2**20:.2f} MiB)",
        ]
        if self.parity:
            p = self.parity
            lines.append(f"  parity ({p['batches']} batches): output SQNR vs float {p['int_vs_float_db']} dB integer, "
                         f"{p['fake_quant_vs_float_db']} dB fake quant (bound {p['output_bound_db']}); integer vs "
                         f"fake quant {p['int_vs_fake_quant_db']} dB; worst layer {p['worst_layer']} "
                         f"{p['worst_layer_sqnr_db']} dB (bound {p['layer_bound_db']:g})")
        return "\n".join(lines)


def export(student: nn.Module, out_dir: str | Path, calibration_batches=None, family: str = "auto",
           overwrite: bool = False, float_dtype: torch.dtype | None = None, card: dict | None = None) -> ExportSummary:
    """Write the integer model of a prepared student: config.json, hqdm_quant.json, model.safetensors, README.md.

    Args:
        student: a diffusers model returned by `hqdm.prepare` (calibrated; LoRA is merged into the export).
        out_dir: the directory to create.
        calibration_batches: batches as for `hqdm.calibrate` ({x, t, y?} dicts); when given, the integer model
            is loaded from the written files and compared with the fake-quant model on them (parity).
        family: adapter used to call the model for parity ('auto' detects it from the class).
        overwrite: replace an existing out_dir.
        float_dtype: store the model's other floating-point tensors (norms, embeddings, float layers) in this
            dtype, e.g. torch.bfloat16 to halve them; None keeps them bit-identical to the student's.
        card: what the README.md model card says beyond the manifest: {"source", "recipe", "metrics", "command",
            "name" (default: out_dir's name)}; `hqdm export` fills it from the run (see `hqdm.model_card.render`).

    Returns:
        ExportSummary (sizes against bf16, parity figures); `print` it for a table.

    Raises:
        FileExistsError: out_dir exists and overwrite is False, or it is not an export (a user folder, a file):
            overwrite replaces only a folder hqdm or diffusers wrote.
        PermissionError: out_dir's parent cannot be written.
        ValueError: a model class load_int could not rebuild (neither a diffusers class nor registered, or
            without recorded constructor arguments); a layer no integer GEMM can run (its activation granularity,
            missing quantizers, an int32 accumulator that can overflow); non-finite tensors; parity below the
            bounds.
    """
    out = Path(out_dir)
    safe_io.check_target(out, overwrite)  # before any work: never replace a user's folder or file
    _check_model(student)
    layers = quant_layers(student)
    records, tensors = {}, {}
    for name, layer in layers.items():
        records[name], own = export_layer(name, layer)
        tensors.update(own)
    model_tensors = _model_tensors(student, layers, float_dtype)
    safe_io.check_finite({**tensors, **model_tensors}, "export")
    manifest = _manifest(student, records, model_tensors, get_adapter(student, family))
    tmp = safe_io.staging_dir(out)
    try:
        fmt.write_config(student, tmp)
        file_bytes = fmt.write_weights(tmp, manifest, {**tensors, **model_tensors})
        fmt.write_manifest(tmp, manifest)
        if calibration_batches is not None:
            manifest["parity"] = check_parity(student, tmp, calibration_batches, family)
            fmt.write_manifest(tmp, manifest)
        bf16_bytes = _bf16_bytes(layers, model_tensors)
        write_card(tmp, (card or {}).get("name", out.name), manifest, {"file": file_bytes, "bf16": bf16_bytes}, card)
        safe_io.replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weight_bytes = sum(_nbytes(tensors[r["tensors"]["w_int"]]) for r in records.values())
    return ExportSummary(
        path=out, layers=len(records), file_bytes=file_bytes, weight_bytes=weight_bytes,
        qparam_bytes=sum(_nbytes(t) for t in tensors.values()) - weight_bytes,
        model_bytes=sum(_nbytes(t) for t in model_tensors.values()),
        bf16_bytes=bf16_bytes, parity=manifest["parity"],
    )


# ------------------------------------------------------------------------------------------------- one layer
def export_layer(name: str, layer: QuantLayer) -> tuple[dict, dict[str, Tensor]]:
    """The manifest record and the tensors of one quantized layer (tensor names are `{name}.{role}`).

    Raises:
        ValueError: a layer the integer runtime cannot run exactly, or whose int32 accumulator can overflow.
    """
    _check_layer(name, layer)
    cfg, conv = layer.config, isinstance(layer, QuantConv2d)
    st = layer.state()
    try:
        gw = st.gemm_weight()
    except ValueError as err:
        raise ValueError(f"layer {name!r}: {err}") from err
    n, k = st.w_int.shape
    roles = fmt.layer_tensors(st)
    record = {
        "kind": st.kind,
        "module": _module_record(layer, conv),
        "config": layer_config_to_dict(cfg),
        "weight": {"shape": [n, k], "full_shape": list(st.full_shape), "layout": "[N, K] row-major, K contiguous",
                   "storage": "int4x2" if qlayer.packs_int4(st.w_bits, st.w_int) else "int8",
                   "scale_shape": list(st.w_scale.shape)},
        "act": {"mode": st.a_mode, "bits": st.a_bits, "symmetric": st.a_symmetric,
                "timestep_buckets": st.timestep_buckets, "num_train_timesteps": st.num_train_timesteps,
                "table_shape": None if st.a_scale is None else list(st.a_scale.shape)},
        "hadamard": layer.hadamard_dict(),
        "fold": None if cfg.rotation != "single" else {
            "op": "(W_int - z_w) @ R_raw, R_raw = diag(signs) @ blockdiag(H_order), entries +-1",
            "at": "load", "parts": gw.parts, "base": qlayer.DIGIT_BASE, "max_abs": gw.max_abs,
            "scale": "w_scale / sqrt(order)"},
        "correction": _correction_record(cfg, roles),
        "taps": st.taps,
        "accumulator": _accumulator(name, gw, k, st.a_bits),
        "tensors": {role: f"{name}.{role}" for role, t in roles.items() if t is not None},
    }
    return record, {f"{name}.{role}": t.detach().cpu().contiguous() for role, t in roles.items() if t is not None}


def _check_layer(name: str, layer: QuantLayer) -> None:
    cfg, conv = layer.config, isinstance(layer, QuantConv2d)
    skip = f"Rule(pattern={name!r}, skip=True) keeps it in floating point"
    if cfg.w is None or cfg.a is None:
        raise ValueError(f"layer {name!r} quantizes only its {'input' if cfg.w is None else 'weight'}; an integer "
                         f"GEMM needs integer weights and activations. Give it both quantizers, or {skip}.")
    if cfg.a.granularity in ("channel", "group"):
        raise ValueError(
            f"layer {name!r}: activation granularity {cfg.a.granularity!r} gives input channels their own scales, "
            "which vary along the GEMM's reduction axis K, so no integer GEMM can apply them. Fix: per-tensor "
            f"per-timestep tables (Rule(pattern={name!r}, a_dynamic=False)) or per-token scales (a_dynamic=True)."
        )
    if conv and cfg.a.granularity == "token":
        raise ValueError(
            f"layer {name!r}: per-token (per-pixel) activation scales on a Conv2d vary inside each im2col row "
            f"(one row gathers kh·kw pixels), so no integer GEMM can apply them. Fix: Rule(pattern={name!r}, "
            "a_dynamic=False) and calibrate (per-timestep tables)."
        )
    if conv and layer.groups != 1:
        raise ValueError(f"layer {name!r}: grouped convolution (groups={layer.groups}) has no integer path; {skip}.")
    if not cfg.a.dynamic and not bool(layer.a_quant.initialized):
        raise ValueError(f"layer {name!r}: its activation scales are not calibrated; run hqdm.calibrate first.")


def _correction_record(cfg, roles: dict) -> dict | None:
    if cfg.center == "none":
        return None
    if cfg.center == "static":
        stored = "folded_into_bias"
    elif roles["c_weight"] is not None:
        stored = "float"
    else:
        stored = "int4x2" if roles["c_int"].dtype == torch.uint8 else "int8"
    return {"bits": cfg.correction_bits, "stored": stored}


def _accumulator(name: str, gw: qlayer.GemmWeight, k: int, a_bits: int) -> dict:
    try:
        return qlayer.accumulator_bound(gw, k, a_bits)
    except ValueError as err:
        raise ValueError(f"layer {name!r}: {err} Fix: weight groups shorten K per GEMM (Rule(pattern={name!r}, "
                         "w_granularity='group', w_group_size=...)), fewer activation bits, or skip=True.") from err


def _module_record(layer: QuantLayer, conv: bool) -> dict:
    if not conv:
        return {"in_features": layer.in_features, "out_features": layer.out_features}
    return {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
            "kernel_size": list(layer.kernel_size), "stride": list(layer.stride), "dilation": list(layer.dilation),
            "padding": layer.padding if isinstance(layer.padding, str) else list(layer.padding),
            "padding_mode": layer.padding_mode, "pad": list(layer.pad_amounts()),
            "pad_mode": "constant" if layer.padding_mode == "zeros" else layer.padding_mode,
            # a transposed conv: this stride-1 conv reads its input with stride − 1 zeros inserted (pad: its padding)
            **({"transpose_stride": list(layer.transpose_stride)} if hasattr(layer, "transpose_stride") else {})}


# ------------------------------------------------------------------------------------------------- the model
def _check_model(student: nn.Module) -> None:
    from hqdm.call import init_args_of

    safe_io.model_class_name(type(student))
    if not hasattr(student, "save_config") and init_args_of(student) is None:
        raise ValueError(
            f"{type(student).__name__} is not a diffusers model, so config.json must hold its constructor arguments "
            "and none were recorded: build it through a ModelSource (class_name + init_args), or call "
            "hqdm.call.record_init_args(model, {...}) on the model before hqdm.prepare."
        )
    if not quant_layers(student):
        raise ValueError("The model has no quantized layers: run hqdm.prepare(model, config) first.")


def _model_tensors(student: nn.Module, layers: dict[str, QuantLayer], float_dtype) -> dict[str, Tensor]:
    """Every state_dict tensor outside the quantized layers, under its own key (cloned: no shared storage)."""
    inside = tuple(f"{n}." for n in layers)
    out = {k: v.detach().cpu().clone().contiguous() for k, v in student.state_dict().items()
           if isinstance(v, Tensor) and not k.startswith(inside)}
    if float_dtype is None:
        return out
    return {k: v.to(float_dtype) if v.is_floating_point() else v for k, v in out.items()}


def _manifest(student: nn.Module, records: dict, model_tensors: dict, adapter) -> dict:
    from hqdm.mha import QuantMultiheadAttention

    steps = {r["act"]["num_train_timesteps"] for r in records.values()}
    return {
        "format": fmt.FORMAT,
        "format_version": fmt.FORMAT_VERSION,
        "hqdm_version": _version(),
        "model_class": safe_io.model_class_name(type(student)),
        "family": adapter.name,
        "call": adapter.call.to_dict(),
        "attention": [n for n, m in student.named_modules() if isinstance(m, QuantMultiheadAttention)],
        "num_train_timesteps": max(steps),
        "weight_layout": "[N, K] row-major, K contiguous; Conv2d K = C·kh·kw in PyTorch (c, kh, kw) order",
        "int4_packing": "two's complement nibbles, two per uint8 along K, low nibble = even k (pack_int4)",
        "layers": records,
        "model_tensors": sorted(model_tensors),
        "files": {},
        "parity": None,
    }


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _bf16_bytes(layers: dict[str, QuantLayer], model_tensors: dict[str, Tensor]) -> int:
    tensors = [*model_tensors.values()] + [p for m in layers.values() for p in (m.weight, m.bias) if p is not None]
    return sum(t.numel() * 2 if t.is_floating_point() else _nbytes(t) for t in tensors)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hqdm")
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------------- parity
def check_parity(student: nn.Module, path: str | Path, batches, family: str = "auto") -> dict:
    """Load the export at `path` and compare it with the fake-quant student, per layer and at the output.

    Per layer, each integer layer runs on the exact input its fake-quant twin sees and must reach
    PARITY_LAYER_SQNR_DB against it. End to end, SQNR(integer vs float) must reach SQNR(fake quant vs float) −
    PARITY_OUTPUT_MARGIN_DB, where float is the student with its quantizers off. SQNR = 10·log10(Σ ref² /
    Σ (x − ref)²) over all batches.

    Returns:
        {int_vs_float_db, fake_quant_vs_float_db, output_bound_db, int_vs_fake_quant_db, worst_layer,
        worst_layer_sqnr_db, layer_bound_db, batches, layer_sqnr_db: {name: dB}}.

    Raises:
        ValueError: a layer or the output below its bound; the message names them and the figures.
    """
    device = next(student.parameters()).device
    int_model = load_int(path, device=device)
    adapter = get_adapter(student, family)
    layers = quant_layers(student)
    sums = {name: SQNRSum() for name in layers}
    outs = {"int_vs_fq": SQNRSum(), "int_vs_fp": SQNRSum(), "fq_vs_fp": SQNRSum()}

    def hook(name):
        def fn(mod, args, out):
            twin = int_model.get_submodule(name)
            with use_timesteps(twin, timesteps_of(student).t):  # the student's call is in progress
                sums[name].add(twin(args[0]), out)
        return fn

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    was_training, enabled = student.training, {q: q.enabled for q in student.modules() if isinstance(q, FakeQuantizer)}
    student.eval()
    fq, ints = [], []
    try:
        with torch.no_grad():
            set_quantizers_enabled(student, True)
            for batch in batches:
                fq.append(forward_batch(student, batch, adapter))
                ints.append(forward_batch(int_model, batch, adapter))
                outs["int_vs_fq"].add(ints[-1], fq[-1])
            for h in handles:
                h.remove()
            set_quantizers_enabled(student, False)
            for batch, ref, out in zip(batches, fq, ints):
                fp = forward_batch(student, batch, adapter)
                outs["int_vs_fp"].add(out, fp)
                outs["fq_vs_fp"].add(ref, fp)
    finally:
        for h in handles:
            h.remove()
        for q, on in enabled.items():
            q.enabled = on
        student.train(was_training)
    return _parity_verdict(sums, outs, len(batches))


def _db(v: float) -> float | str:
    """A JSON-safe dB figure: rounded, or "inf" where the two paths agree exactly."""
    return round(v, 2) if math.isfinite(v) else "inf"


def _parity_verdict(sums: dict, outs: dict, n_batches: int) -> dict:
    per_layer = {name: s.db for name, s in sums.items()}
    worst = min(per_layer, key=per_layer.get)
    int_db, fq_db = outs["int_vs_fp"].db, outs["fq_vs_fp"].db
    bound = fq_db - PARITY_OUTPUT_MARGIN_DB
    figures = {
        "int_vs_float_db": _db(int_db), "fake_quant_vs_float_db": _db(fq_db), "output_bound_db": _db(bound),
        "int_vs_fake_quant_db": _db(outs["int_vs_fq"].db), "worst_layer": worst,
        "worst_layer_sqnr_db": _db(per_layer[worst]), "layer_bound_db": PARITY_LAYER_SQNR_DB, "batches": n_batches,
        "layer_sqnr_db": {k: _db(v) for k, v in per_layer.items()},
    }
    bad = sorted((v, k) for k, v in per_layer.items() if v < PARITY_LAYER_SQNR_DB)
    if bad or int_db < bound:
        shown = ", ".join(f"{k} {v:.1f} dB" for v, k in bad[:4]) or "none"
        raise ValueError(
            f"Export refused: the integer model disagrees with the fake-quant model on the {n_batches} calibration "
            f"batches. Layers below PARITY_LAYER_SQNR_DB = {PARITY_LAYER_SQNR_DB:g} dB on identical inputs: "
            f"{shown}. Output SQNR vs float: integer {int_db:.1f} dB, fake quant {fq_db:.1f} dB (bound: fake quant "
            f"− PARITY_OUTPUT_MARGIN_DB = {bound:.1f} dB). Nothing was written. A layer far below its bound computes "
            "something its fake-quant twin does not (a forward changed after prepare, or an unsupported module)."
        )
    return figures
