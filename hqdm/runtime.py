"""Integer runtime: IntLinear / IntConv2d, which run real integer GEMMs, and `load_int`, which rebuilds an export.

    x ──(− μ)──(/ σ)──(· R)── quantize (s_a, z_a) ──▶ a int8 (M, K) ──┐
                                                                     int_mm ──▶ acc int32 (M, N)
    W int8 (N, K)   rotation='single': (W_int − z_w)·R_raw, int8 digits ┘
    y = s_a · s_w · (acc − z_a·Σ_k w − z_w·Σ_k a + K·z_a·z_w) + b + μ·W_cᵀ

M = tokens (Linear) or output pixels (Conv2d: im2col of the padded, centered int8 input), K = C (Linear) or
C·kh·kw in PyTorch order (Conv2d). R = diag(signs)·blockdiag(H_n)/√n is the layer's Hadamard rotation (the
activation is quantized in the rotated basis). For rotation='single' the fake-quant layer rotates x̂ back
(x̂ = Q(xR)·Rᵀ), so Rᵀ folds into the weight: Q_w(W)·R = s_w·(W_int − z_w)·R_raw/√n, an exact integer matrix
with entries up to n·2^b. It is built here at load time from the stored low-bit integers (the file keeps 4 or
8 bits per weight) and split into balanced base-256 int8 digits, W = Σ_p D_p·256^p, stacked into one GEMM; the
digits' accumulators combine exactly in integers (`hqdm.int_matmul.combine_digits`) before the one float32
dequantization.

On CPU the float work around the GEMM is done in as few passes as the definition allows: the activation integers
round in place (`hqdm.quant_primitives.quantize_into_int8`, bit-identical to its `quantize`) and the
dequantization scales the float32 accumulator in place, in the reference's order. `torch._int_mm` stays the GEMM:
on the x86 CPUs measured, it is 4–9× faster than a float32 matmul of the same integer values
(bench/int_cpu_bench.py --gemm).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hqdm import int_fused, qlayer
from hqdm.adapters import get_adapter, remember_adapter
from hqdm.call import CallSpec
from hqdm.export_format import (
    CONFIG_FILE,
    MANIFEST_FILE,
    build_model,
    layer_state,
    read_config,
    read_manifest,
    read_tensors,
)
from hqdm.hadamard import signs
from hqdm.int_matmul import combine_digits, digits_dtype, im2col, im2col_channels_last, int_mm
from hqdm.quant_primitives import quantize_into_int8
from hqdm.timesteps import Timesteps, attach_timesteps


# ------------------------------------------------------------------------------------------------ the layers
class IntLayer(nn.Module):
    """Shared state of IntLinear / IntConv2d: transform, activation quantizer, integer GEMM, epilogue.

    Built from a `hqdm.qlayer.LayerState`; every step calls the functions of `hqdm.qlayer` that the fake-quant
    layer calls, so the two paths compute one definition.
    """

    channel_dim = -1

    def __init__(self, name: str, state: qlayer.LayerState, fold: dict | None = None) -> None:
        super().__init__()
        self.name = name
        self.rotation, self.center, self.normalize = state.rotation, state.center, state.normalize
        self.hadamard = state.hadamard
        self.w_bits, self.a_bits, self.a_mode, self.a_symmetric = (state.w_bits, state.a_bits, state.a_mode,
                                                                   state.a_symmetric)
        self.a_qmin, self.a_qmax = state.a_qrange
        self.buckets, self.num_train_timesteps = state.timestep_buckets, state.num_train_timesteps
        self.timesteps = Timesteps()
        """The model's shared timesteps once `load_int` attached them (`hqdm.timesteps`)."""
        gw = state.gemm_weight()
        if fold is not None and (gw.parts, gw.max_abs) != (fold["parts"], fold["max_abs"]):
            raise ValueError(
                f"layer {name!r}: the folded weight has {gw.parts} digits and max |w| {gw.max_abs}, the manifest "
                f"records {fold['parts']} and {fold['max_abs']}; the files come from an incompatible hqdm version "
                "or were edited. Re-export."
            )
        n = state.w_int.shape[0]
        self.parts, self.out_width = gw.parts, n
        self.register_buffer("w_ints", gw.ints)
        self.register_buffer("w_scale", gw.scale)
        self.register_buffer("w_zero", gw.zero)
        self.register_buffer("w_colsum", gw.colsum)
        self.digits_dtype = digits_dtype(state.w_int.shape[1] // gw.scale.shape[1], state.a_bits, gw.parts)
        """int32 where every partial sum of the digit combination provably fits it, else int64."""
        self.register_buffer("a_scale", state.a_scale)
        self.register_buffer("a_zero", None if state.a_zero is None else state.a_zero.to(torch.int64))
        self.register_buffer("bias", state.bias)
        self.register_buffer("mu", state.mu)
        self.register_buffer("sigma", state.sigma)
        self.register_buffer("c_weight", state.correction_summed())
        self.use_kernels: bool | None = None
        """None: the Triton kernels (`hqdm.int_fused`) on CUDA where the layer fits them; True / False: force."""
        self.fused = int_fused.fusable(self)
        if self.fused:
            for key, t in int_fused.kernel_buffers(self, None if state.hadamard is None else
                                                   signs(state.hadamard)).items():
                self.register_buffer(key, t)

    def extra_repr(self) -> str:
        acts = "per-token" if self.a_mode == "token" else f"{self.buckets} timestep buckets"
        return (f"W{self.w_bits}A{self.a_bits} ({acts}), rotation={self.rotation}, "
                f"center={self.center}, normalize={self.normalize}, weight digits={self.parts}")

    # ---- input transform and activation quantization (hqdm.qlayer) -------------------------------------------
    def mean(self, x: Tensor) -> Tensor | None:
        return qlayer.center_mean(x, self.center, self.channel_dim, self.mu)

    def pre_quant(self, x: Tensor, mu: Tensor | None) -> Tensor:
        return qlayer.transform_input(x, mu, self.sigma, self.hadamard, self.channel_dim)

    def quantize_act(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """int8 h, and per-sample (table) or per-token (B, T, 1) scales and integer zero points."""
        if self.a_mode == "token":  # h: (B, T, C)
            s, z = qlayer.token_qparams(h, self.a_qmin, self.a_qmax, self.a_symmetric)
        else:
            idx = self.timesteps.buckets(h.shape[0], self.buckets, self.num_train_timesteps, h.device,
                                         f"Layer {self.name!r}")
            s, z = qlayer.table_qparams(self.a_scale, self.a_zero, idx)
            view = (-1,) + (1,) * (h.dim() - 1)
            s, z = s.reshape(view), None if z is None else z.reshape(view)
        q = quantize_into_int8(h, s, z, self.a_qmin, self.a_qmax)
        return q, s, None if z is None else z.round().to(torch.int64)

    def takes_kernels(self, x: Tensor) -> bool:
        """Whether this call runs the fused Triton kernels (static per device and settings: compile-safe)."""
        if not self.fused or self.use_kernels is False:
            return False
        return bool(self.use_kernels) or (x.is_cuda and _triton_installed())

    # ---- integer GEMM and epilogue --------------------------------------------------------------------------
    def matmul(self, a: Tensor, za: Tensor | None) -> Tensor:
        """Σ_g s_w·Σ_k (a − z_a)(w − z_w), exact in integers per group, as float32 (M, N); a int8 (M, K).

        Per group the integer sum is exact (digits combined and zero points removed in integers) and rounds to
        float32 once, then scales by s_w; a fresh tensor, so callers may scale it further in place.
        """
        groups, _, gs = self.w_ints.shape
        y = None
        for g in range(groups):
            ag = a if groups == 1 else a[:, g * gs:(g + 1) * gs]
            acc = int_mm(ag, self.w_ints[g])  # (M, P·N) int32
            if self.parts > 1:
                acc = combine_digits(acc, self.parts, self.digits_dtype)  # (M, N)
            if za is not None or self.w_zero is not None:
                zw = None if self.w_zero is None else self.w_zero[:, g]
                rowsum = None if zw is None else ag.sum(1, dtype=torch.int64)
                acc = qlayer.remove_zero_points(acc.long(), rowsum, gs, za, zw, self.w_colsum[:, g])
            part = acc.float().mul_(self.w_scale[:, g])
            y = part if y is None else y.add_(part)
        return y

    def epilogue(self, y: Tensor, mu: Tensor | None) -> Tensor:
        """+ bias + μ·W_cᵀ (dynamic centering; static centering is already in the bias), in place; y: (B, T, N)."""
        if self.bias is not None:
            y.add_(self.bias)
        if self.c_weight is not None and mu is not None:
            y.add_(qlayer.correction_term(mu, self.c_weight, self.channel_dim)[:, None, :])  # (B|1, 1, N)
        return y


class IntLinear(IntLayer):
    """nn.Linear replacement: centering, σ, Hadamard, int8 activations, integer GEMM, float epilogue."""

    channel_dim = -1

    def forward(self, x: Tensor) -> Tensor:
        if self.takes_kernels(x):
            return int_fused.linear_forward(self, x)
        h32 = x.float()
        b, c = x.shape[0], x.shape[-1]
        mu = self.mean(h32)
        h = self.pre_quant(h32, mu).reshape(b, -1, c)  # (B, T, C)
        q, s, za = self.quantize_act(h)
        rows = q.shape[1]
        if za is not None:
            za = za.reshape(-1) if self.a_mode == "token" else za.reshape(b).repeat_interleave(rows)
        y = self.matmul(q.reshape(-1, c), za).view(b, rows, -1)  # (B, T, N)
        y.mul_(s.reshape(b, rows, 1) if self.a_mode == "token" else s.reshape(b, 1, 1))
        return self.epilogue(y, mu).reshape(*x.shape[:-1], -1).to(x.dtype)


class IntConv2d(IntLayer):
    """nn.Conv2d replacement: pad, center, σ, Hadamard, int8 activations, im2col, integer GEMM, float epilogue.

    The GEMM reads its columns from the int8 input in channels-last order, K = (group, kh, kw, c) with c running
    over the input channels of one weight group, because that im2col copies runs of contiguous channels instead of
    gathering single bytes; the weight's K axis is permuted to match once, at load. Weight groups that split a
    channel's taps (G not dividing C) keep PyTorch's (c, kh, kw) order and `im2col`.
    """

    channel_dim = 1

    def __init__(self, name: str, state: qlayer.LayerState, fold: dict | None, mod: dict) -> None:
        super().__init__(name, state, fold)
        self.kernel_size, self.stride = tuple(mod["kernel_size"]), tuple(mod["stride"])
        self.dilation, self.pad_amounts, self.pad_mode = tuple(mod["dilation"]), tuple(mod["pad"]), mod["pad_mode"]
        groups, channels = self.w_ints.shape[0], mod["in_channels"]
        self.channels_last = channels % groups == 0
        if self.channels_last:
            kh, kw = self.kernel_size
            w = self.w_ints.unflatten(2, (channels // groups, kh, kw))  # (G, P·N, C/G, kh, kw)
            self.w_ints = w.permute(0, 1, 3, 4, 2).reshape(self.w_ints.shape).contiguous()  # K: (kh, kw, C/G)

    def pad(self, x: Tensor) -> Tensor:
        return F.pad(x, self.pad_amounts, mode=self.pad_mode) if any(self.pad_amounts) else x

    def columns(self, q: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """im2col rows (B·Ho·Wo, K) of the padded int8 input in the weight's K order."""
        if not self.channels_last:
            return im2col(q, self.kernel_size, self.stride, self.dilation)
        return im2col_channels_last(q, self.kernel_size, self.stride, self.dilation, self.w_ints.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        if self.takes_kernels(x):
            return int_fused.conv_forward(self, x)
        h32 = x.float()
        b = x.shape[0]
        mu = self.mean(h32)  # of the unpadded input, as in QuantConv2d
        h = self.pad(self.pre_quant(h32, None)) if mu is None else self.pre_quant(self.pad(h32), mu)
        q, s, za = self.quantize_act(h)  # (B, C, Hp, Wp) int8; padding zeros became z_a
        cols, (ho, wo) = self.columns(q)  # (B·L, K)
        rows = ho * wo
        za = None if za is None else za.reshape(b).repeat_interleave(rows)
        y = self.matmul(cols, za).view(b, rows, -1).mul_(s.reshape(b, 1, 1))  # (B, L, N)
        y = self.epilogue(y, mu)
        return y.reshape(b, ho, wo, -1).permute(0, 3, 1, 2).to(x.dtype)  # (B, N, Ho, Wo)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


class IntConvTranspose2d(IntConv2d):
    """nn.ConvTranspose2d replacement: the stride-1 IntConv2d of the equivalent conv over the input with stride − 1
    zeros inserted between pixels (hqdm.layers.QuantConvTranspose2d's own form); `pad` holds the transposed conv's
    padding and output padding (negative entries crop)."""

    def __init__(self, name: str, state: qlayer.LayerState, fold: dict | None, mod: dict) -> None:
        super().__init__(name, state, fold, mod)
        self.transpose_stride = tuple(mod["transpose_stride"])

    def pad(self, x: Tensor) -> Tensor:
        from hqdm.layers import zero_insert

        return F.pad(zero_insert(x, self.transpose_stride), self.pad_amounts)


def int_layer(name: str, record: dict, tensors: dict[str, Tensor]) -> IntLayer:
    """The IntLinear / IntConv2d / IntConvTranspose2d of one exported layer (its manifest record and tensors)."""
    state = layer_state(name, record, tensors)
    if record["kind"] == "conv2d" and "transpose_stride" in record["module"]:
        return IntConvTranspose2d(name, state, record["fold"], record["module"])
    if record["kind"] == "conv2d":
        return IntConv2d(name, state, record["fold"], record["module"])
    return IntLinear(name, state, record["fold"])


# ------------------------------------------------------------------------------------------------- load_int
def load_int(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild an exported model with IntLinear / IntConv2d layers that run real integer GEMMs.

    Call it like the original diffusers model (`model(x, timestep=t, ...)`): per-timestep activation scales read
    the timesteps of that call. Integer layers compute their transform and epilogue in float32 and return `dtype`.

    Args:
        path: a directory written by `hqdm.export`.
        device: where the model runs.
        dtype: dtype of the floating-point parts (norms, embeddings, layers left unquantized).

    Returns:
        The diffusers model, in eval mode.

    Raises:
        FileNotFoundError: a file of the export is missing.
        ValueError: a wrong format version, config.json of another model class, a truncated or corrupted
            model.safetensors, or a tensor the manifest names but the file lacks.
    """
    path = Path(path)
    manifest = read_manifest(path)
    config = read_config(path, manifest)
    tensors = read_tensors(path, manifest)
    model = build_model(manifest, config)
    _load_float_tensors(model, manifest, tensors)
    model.to(device)
    if dtype != next(model.parameters()).dtype:
        model.to(dtype)
    for name, record in manifest["layers"].items():
        _check_module(model, name, record)
        _set_submodule(model, name, int_layer(name, record, tensors).to(device))
    adapter = get_adapter(model, manifest["family"])
    if manifest.get("call") is not None:  # the call the student was exported with (a declared one included)
        adapter = dataclasses.replace(adapter, call=CallSpec.from_dict(manifest["call"]))
    remember_adapter(model, adapter)  # hqdm.sampling.denoiser_of / quant_report call it as declared
    attach_timesteps(model, adapter.call.timestep_call(type(model).forward))
    return model.eval()


def _load_float_tensors(model: nn.Module, manifest: dict, tensors: dict[str, Tensor]) -> None:
    own = {k: tensors[k] for k in manifest["model_tensors"]}
    missing, unexpected = model.load_state_dict(own, strict=False)
    layers = tuple(f"{n}." for n in manifest["layers"])
    missing = [k for k in missing if not k.startswith(layers)]
    if missing or unexpected:
        raise ValueError(
            f"{CONFIG_FILE} builds a {manifest['model_class']} whose tensors do not match the export: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}. The config and weights come from different models."
        )


def _check_module(model: nn.Module, name: str, record: dict) -> None:
    try:
        mod = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"{CONFIG_FILE} builds a model without layer {name!r} named in {MANIFEST_FILE}.") from err
    want = nn.Conv2d if record["kind"] == "conv2d" else nn.Linear
    shape = list(mod.weight.shape) if isinstance(mod, want) else None
    if "transpose_stride" in record.get("module", {}):  # its record holds the equivalent conv's kernel shape
        want = nn.ConvTranspose2d
        shape = ([mod.out_channels, mod.in_channels // mod.groups, *mod.kernel_size]
                 if isinstance(mod, want) else None)
    if shape != record["weight"]["full_shape"]:
        raise ValueError(
            f"layer {name!r}: {CONFIG_FILE} builds a {type(mod).__name__} (weight {shape}) where {MANIFEST_FILE} "
            f"stores a {record['kind']} of weight {record['weight']['full_shape']}; the files come from two models."
        )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
