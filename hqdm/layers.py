"""QuantLinear and QuantConv2d: a Linear / Conv2d whose input goes through centering, Hadamard and fake quantization.

    x ──(− μ)──(/ σ)──(· H)──Q_a──(· Hᵀ if single)──┐
                                                   ├─ x̂ · Q_w(W')ᵀ + b ──(+ μ · W_cᵀ)──▶ y
    W' = W            (rotation none / single)     │
    W' = W·diag(σ)·H  (double; folded in float64) ─┘

μ: per-sample mean over tokens / pixels (center='dynamic'; static μ for 2-D inputs) or a calibrated vector
(center='static'). W_c: a separate copy of the weight in its own basis at `correction_bits`, so the low-bit weight
error is never multiplied by |μ|/σ. Conv2d pads the uncentered input first and then convolves without padding,
which keeps centering exact at zero-padded borders; the rotation acts on input channels tap by tap.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hqdm import qlayer
from hqdm.config import LayerQuantConfig, QuantizerSpec
from hqdm.fake_quantizer import FakeQuantizer
from hqdm.hadamard import HadamardSpec, rotate


class QuantLayer(nn.Module):
    """State and input transform shared by QuantLinear and QuantConv2d."""

    channel_dim: int = -1

    def _setup_quant(self, config: LayerQuantConfig, num_train_timesteps: int) -> None:
        self.config, self.num_train_timesteps = config, num_train_timesteps
        width = self.in_width
        self.hadamard = None if config.rotation == "none" else HadamardSpec(width, config.block, config.seed)
        self.w_quant = None if config.w is None else FakeQuantizer(config.w, "weight", tuple(self.weight.shape))
        self.a_quant = None
        if config.a is not None:
            self.a_quant = FakeQuantizer(config.a, "act", (width,), self.channel_dim, num_train_timesteps)
        self.c_quant = None
        if config.center != "none" and config.correction_bits != "float":
            spec = QuantizerSpec(bits=config.correction_bits, granularity="channel", dynamic=True)
            self.c_quant = FakeQuantizer(spec, "weight", tuple(self.weight.shape))
        self.register_buffer("mu", torch.zeros(width))
        self.register_buffer("sigma", torch.ones(width))
        self.register_buffer("calibrated", torch.tensor(False))
        self.to(device=self.weight.device, dtype=self.weight.dtype)  # quantizer state lives beside the weight

    @property
    def in_width(self) -> int:
        return self.weight.shape[1]

    def get_extra_state(self) -> dict:
        """The layer's spec travels with its state_dict, so a checkpoint names what it was trained as."""
        return {"config": json.dumps(layer_config_to_dict(self.config)), "hadamard": self.hadamard_dict()}

    def set_extra_state(self, state: dict) -> None:
        saved = json.loads(state["config"])
        if saved != layer_config_to_dict(self.config):
            raise ValueError(
                f"Checkpoint layer config {saved} differs from this model's {layer_config_to_dict(self.config)}; "
                "prepare the model with the QuantConfig the checkpoint was trained with."
            )

    def hadamard_dict(self) -> dict | None:
        return None if self.hadamard is None else self.hadamard.to_dict()

    def quantizers(self) -> list[FakeQuantizer]:
        return [q for q in (self.w_quant, self.a_quant, self.c_quant) if q is not None]

    # ---- the transformed input ------------------------------------------------------------------------------
    def mean(self, x: Tensor) -> Tensor | None:
        """μ broadcastable against x: per sample over tokens/pixels (dynamic) or the calibrated vector."""
        return qlayer.center_mean(x, self.config.center, self.channel_dim, self.mu)

    def pre_quant(self, x: Tensor, mu: Tensor | None) -> Tensor:
        """((x − μ)/σ)·H: the tensor the activation quantizer sees."""
        sigma = self.sigma if self.config.normalize else None
        return qlayer.transform_input(x, mu, sigma, self.hadamard, self.channel_dim)

    def act_input(self, x: Tensor) -> Tensor:
        """What the activation quantizer sees for layer input `x` (used by calibration)."""
        return self.pre_quant(x, self.mean(x))

    def transform_input(self, x: Tensor, mu: Tensor | None) -> Tensor:
        """x̂ before the matmul: Q_a(((x − μ)/σ)·H), rotated back for rotation='single'.

        On CUDA, where `hqdm.kernels.fake_quant` implements the quantizer and rotation, the whole transform is one
        fused Triton pass forward and one backward (HQDM_FUSED_FAKE_QUANT=0 turns it off); elsewhere the reference.
        """
        if self._fuses(x):
            return self._fused_input(x, mu)
        h = self.pre_quant(x, mu)
        if self.a_quant is not None:
            h = self.a_quant(h)
        if self.config.rotation == "single":
            h = rotate(h, self.hadamard, dim=self.channel_dim, inverse=True)
        return h

    def _fuses(self, x: Tensor) -> bool:
        a = self.a_quant
        if not x.is_cuda or a is None or not a.enabled or not a.ready:
            return False
        from hqdm.kernels import fake_quant as fq

        return fq.fused_enabled() and fq.act_fusable(a.spec, self.hadamard)

    def _fused_input(self, x: Tensor, mu: Tensor | None) -> Tensor:
        from hqdm.kernels import fake_quant as fq

        a, s, z = self.a_quant, None, None
        if not a.spec.dynamic:
            s, z = qlayer.table_qparams(a.scale, a.zero_point, a.bucket_index(x.shape[0], x.device))  # (B,)
        return fq.fake_quant_act(x, s, z, qmin=a.spec.qmin, qmax=a.spec.qmax, rotation=self.config.rotation,
                                 hadamard=self.hadamard, mu=None if mu is None else mu.float(),
                                 sigma=self.sigma if self.config.normalize else None, channel_dim=self.channel_dim,
                                 symmetric=a.spec.symmetric)

    # ---- weights ---------------------------------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float | None = None) -> None:
        """Train a low-rank update instead of the weight: W_eff = W + (alpha/rank)·B·A, merged before fake quant.

        B starts at zero (W_eff = W at first); the base weight is frozen. The update lives in the weight's stored
        basis (rotated for rotation='double'), so merging it is exact.
        """
        if rank < 1:
            raise ValueError(f"LoRA rank={rank} must be a positive integer.")
        k = self.weight[0].numel()
        self.lora_A = nn.Parameter(torch.randn(rank, k, device=self.weight.device, dtype=self.weight.dtype) / k**0.5)
        self.lora_B = nn.Parameter(torch.zeros(self.weight.shape[0], rank, device=self.weight.device,
                                               dtype=self.weight.dtype))
        self.lora_scale = (alpha if alpha is not None else rank) / rank
        self.weight.requires_grad_(False)

    def effective_weight(self) -> Tensor:
        """The weight with any LoRA update merged in (what is fake-quantized and exported)."""
        if getattr(self, "lora_A", None) is None:
            return self.weight
        return self.weight + (self.lora_scale * (self.lora_B @ self.lora_A)).reshape(self.weight.shape)

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold the LoRA update into the weight and drop it."""
        if getattr(self, "lora_A", None) is None:
            return
        self.weight.copy_(self.effective_weight())
        del self.lora_A, self.lora_B
        self.weight.requires_grad_(True)

    def quant_weight(self) -> Tensor:
        """Q_w of the effective weight; on CUDA one fused kernel, computed once per optimizer step (cached)."""
        q = self.w_quant
        if q is None or not q.enabled:
            return self.effective_weight()
        if self.weight.is_cuda and q.ready:
            from hqdm.kernels import fake_quant as fq

            if fq.fused_enabled() and fq.weight_fusable(q.spec):
                return self._fused_weight(fq)
        return q(self.effective_weight())

    def _fused_weight(self, fq) -> Tensor:
        q = self.w_quant
        if getattr(self, "_w_cache", None) is None:
            self._w_cache = fq.WeightFakeQuantCache()
        lora = [getattr(self, n) for n in ("lora_A", "lora_B") if getattr(self, n, None) is not None]
        sources = [self.weight, q.scale, *lora, *([] if q.zero_point is None else [q.zero_point])]

        def compute() -> Tensor:
            w = self.effective_weight()
            return fq.fake_quant_weight(w, qlayer.learned_scale(q.scale), q.zero_point, qmin=q.spec.qmin,
                                        qmax=q.spec.qmax).reshape(w.shape)

        return self._w_cache(compute, *sources)

    def original_weight(self) -> Tensor:
        """The weight in its own basis: undoes the folded rotation and σ of rotation='double'."""
        w = self.effective_weight()
        if self.config.rotation == "double":
            w = rotate(w, self.hadamard, dim=1, inverse=True)
            if self.config.normalize:
                shape = [1] * w.dim()
                shape[1] = -1
                w = w / self.sigma.to(w.dtype).reshape(shape)
        return w

    def correction_weight(self) -> Tensor:
        """W_c: the weight in its own basis at correction_bits, per output channel."""
        w = self.original_weight()
        return w if self.c_quant is None else self.c_quant(w)

    # ---- the frozen description (export) ----------------------------------------------------------------------
    @torch.no_grad()
    def state(self) -> qlayer.LayerState:
        """This layer's quantization state as `hqdm.qlayer.LayerState` (LoRA merged, integers of the weight)."""
        cfg, w = self.config, self.effective_weight().detach()
        w_int, w_scale, w_zero = _ints_of(self.w_quant, w)
        a, dynamic = self.a_quant, self.a_quant.spec.dynamic
        a_scale, a_zero = (None, None) if dynamic else a.table()
        bias = None if self.bias is None else self.bias.detach().clone()
        c_int = c_scale = c_weight = None
        if cfg.center == "static":
            bias = qlayer.static_center_bias(self.mu, self.correction_weight(), bias)
        elif cfg.center == "dynamic" and self.c_quant is None:
            c_weight = self.original_weight().detach().reshape(w.shape[0], -1)
        elif cfg.center == "dynamic":
            c_int, c_scale, _ = _ints_of(self.c_quant, self.original_weight().detach())
        return qlayer.LayerState(
            kind="conv2d" if isinstance(self, QuantConv2d) else "linear", channel_dim=self.channel_dim,
            center=cfg.center, normalize=cfg.normalize, rotation=cfg.rotation, hadamard=self.hadamard,
            w_bits=self.w_quant.spec.bits, w_int=w_int, w_scale=w_scale, w_zero=w_zero, a_bits=a.spec.bits,
            a_symmetric=a.spec.symmetric, a_mode="token" if dynamic else "table",
            timestep_buckets=a.spec.timestep_buckets, num_train_timesteps=a.num_train_timesteps,
            a_scale=None if a_scale is None else a_scale.float(),
            a_zero=None if a_zero is None else a_zero.round().to(torch.int32), bias=bias,
            mu=None if cfg.center == "none" else self.mu.detach().clone(),
            sigma=self.sigma.detach().clone() if cfg.normalize else None,
            c_bits=cfg.correction_bits if cfg.center == "dynamic" else None, c_int=c_int, c_scale=c_scale,
            c_weight=c_weight, full_shape=tuple(w.shape), taps=w_int.shape[1] // self.in_width)

    # ---- offline folding (float64) --------------------------------------------------------------------------
    @torch.no_grad()
    def fold_rotation(self) -> None:
        """rotation='double': W ← W·H along input channels, in float64, cast back once."""
        w = self.weight.data.to(torch.float64)
        self.weight.data.copy_(rotate(w, self.hadamard, dim=1).to(self.weight.dtype))
        self._w_cache = None

    @torch.no_grad()
    def fold_sigma(self, sigma: Tensor) -> None:
        """HadaNorm: set σ and refold W·diag(σ)·H from the current weight, in float64.

        The refold is a right-multiplication over input channels, M ↦ M·Hᵀ·diag(σ_new/σ_old)·H, so a LoRA update
        B·A is refolded exactly by applying it to A.
        """
        sigma = sigma.to(self.sigma)  # fold the σ that is stored, so the forward divides by the same value
        ratio = sigma.to(torch.float64) / self.sigma.to(torch.float64)
        self.weight.data.copy_(self._refold(self.weight.data, ratio))
        if getattr(self, "lora_A", None) is not None:
            a = self.lora_A.data.reshape(-1, *self.weight.shape[1:])  # (r, C, ...) like the weight
            self.lora_A.data.copy_(self._refold(a, ratio).reshape(self.lora_A.shape))
        self.sigma.copy_(sigma)
        self._w_cache = None  # .data writes do not bump _version: drop any cached fake-quantized weight

    def _refold(self, m: Tensor, ratio: Tensor) -> Tensor:
        shape = [1] * m.dim()
        shape[1] = -1
        h = rotate(m.to(torch.float64), self.hadamard, dim=1, inverse=True) * ratio.reshape(shape)
        return rotate(h, self.hadamard, dim=1).to(m.dtype)


class QuantLinear(QuantLayer, nn.Linear):
    """nn.Linear with HQ-DM / HadaNorm input transform and fake quantization; see the module sketch."""

    channel_dim = -1

    def __init__(self, in_features: int, out_features: int, bias: bool, config: LayerQuantConfig,
                 num_train_timesteps: int = 1000, device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_quant(config, num_train_timesteps)

    @classmethod
    def from_float(cls, mod: nn.Linear, config: LayerQuantConfig, num_train_timesteps: int = 1000) -> QuantLinear:
        """Swap in: copies weight and bias, folds a 'double' rotation, initializes weight step sizes."""
        q = cls(mod.in_features, mod.out_features, mod.bias is not None, config, num_train_timesteps,
                device=mod.weight.device, dtype=mod.weight.dtype)
        return _load_float(q, mod)

    def forward(self, x: Tensor) -> Tensor:
        mu = self.mean(x)
        y = F.linear(self.transform_input(x, mu), self.quant_weight(), self.bias)
        if mu is not None:
            y = y + F.linear(mu, self.correction_weight())
        return y

    def to_float(self) -> nn.Linear:
        """A plain nn.Linear with the weight in its own basis (quantization dropped)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.data.copy_(self.original_weight().detach())
        if self.bias is not None:
            lin.bias.data.copy_(self.bias.detach())
        return lin


class QuantConv2d(QuantLayer, nn.Conv2d):
    """nn.Conv2d with HQ-DM / HadaNorm input transform over input channels and fake quantization."""

    channel_dim = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int,
                 bias: bool, padding_mode: str, config: LayerQuantConfig, num_train_timesteps: int = 1000,
                 device=None, dtype=None) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           padding_mode, device=device, dtype=dtype)
        if groups != 1 and (config.rotation != "none" or config.center != "none"):
            raise ValueError(
                f"Grouped convolution (groups={groups}) cannot take a Hadamard rotation or centering over input "
                "channels: both mix channels across groups. Add a rule with rotation='none', center='none' for it."
            )
        self._setup_quant(config, num_train_timesteps)

    @property
    def in_width(self) -> int:
        return self.in_channels

    @classmethod
    def from_float(cls, mod: nn.Conv2d, config: LayerQuantConfig, num_train_timesteps: int = 1000) -> QuantConv2d:
        """Swap in: copies weight and bias, folds a 'double' rotation, initializes weight step sizes."""
        q = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                mod.groups, mod.bias is not None, mod.padding_mode, config, num_train_timesteps,
                device=mod.weight.device, dtype=mod.weight.dtype)
        return _load_float(q, mod)

    def pad_amounts(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) zero padding this convolution applies."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            (th, tw) = total
            return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def pad(self, x: Tensor) -> Tensor:
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self.pad_amounts(), mode=mode)

    def conv(self, x: Tensor, w: Tensor, bias: Tensor | None, padded: bool) -> Tensor:
        if padded:
            return F.conv2d(x, w, bias, self.stride, 0, self.dilation, self.groups)
        if self.padding_mode != "zeros":
            return F.conv2d(self.pad(x), w, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def act_input(self, x: Tensor) -> Tensor:
        mu = self.mean(x)
        return self.pre_quant(x if mu is None else self.pad(x), mu)

    def forward(self, x: Tensor) -> Tensor:
        mu = self.mean(x)
        if mu is None:
            return self.conv(self.transform_input(x, None), self.quant_weight(), self.bias, padded=False)
        y = self.conv(self.transform_input(self.pad(x), mu), self.quant_weight(), self.bias, padded=True)
        correction = qlayer.correction_term(mu, qlayer.taps_summed(self.correction_weight()), self.channel_dim)
        return y + correction[:, :, None, None]  # (B|1, N, 1, 1)

    def to_float(self) -> nn.Conv2d:
        """A plain nn.Conv2d with the weight in its own basis (quantization dropped)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)
        conv.weight.data.copy_(self.original_weight().detach())
        if self.bias is not None:
            conv.bias.data.copy_(self.bias.detach())
        return conv


class QuantConvTranspose2d(QuantConv2d):
    """nn.ConvTranspose2d as what it equals: a stride-1 conv over the zero-inserted, padded input (kernel flipped).

        x ──insert stride−1 zeros──pad d(k−1)−p (+ output_padding)──▶ z ──QuantConv2d math, stride 1──▶ y

    `weight` holds that conv's (C_out, C_in/g, kh, kw) kernel, so per-output-channel weight scales, rotation along
    input channels, centering and export follow Conv2d exactly; `transpose_stride`, `transpose_padding` and
    `output_padding` keep the transposed conv's own arguments. Without centering the forward runs
    F.conv_transpose2d (the inserted zeros quantize to exactly 0, so both forms agree); with centering it convolves
    z, whose inserted and padded zeros are centered like any pixel (exact correction μ·W_cᵀ).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, output_padding, groups: int,
                 bias: bool, dilation, config: LayerQuantConfig, num_train_timesteps: int = 1000, device=None,
                 dtype=None) -> None:
        pair = nn.modules.utils._pair
        super().__init__(in_channels, out_channels, kernel_size, 1, 0, dilation, groups, bias, "zeros", config,
                         num_train_timesteps, device=device, dtype=dtype)
        self.transpose_stride, self.transpose_padding = pair(stride), pair(padding)
        self.output_padding = pair(output_padding)

    @classmethod
    def from_float(cls, mod: nn.ConvTranspose2d, config: LayerQuantConfig,
                   num_train_timesteps: int = 1000) -> QuantConvTranspose2d:
        """Swap in: the equivalent conv kernel of `mod`, a folded 'double' rotation, initialized weight step sizes.

        Raises:
            ValueError: padding_mode other than 'zeros' (the only one nn.ConvTranspose2d supports).
        """
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            raise ValueError(f"ConvTranspose2d padding={mod.padding!r}, padding_mode={mod.padding_mode!r}: only "
                             "integer zero padding is supported.")
        q = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.output_padding,
                mod.groups, mod.bias is not None, mod.dilation, config, num_train_timesteps,
                device=mod.weight.device, dtype=mod.weight.dtype)
        return _load_float(q, mod, conv_weight_of_transpose(mod.weight.detach(), mod.groups))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, transpose_stride={self.transpose_stride}, "
                f"transpose_padding={self.transpose_padding}, output_padding={self.output_padding}")

    def pad_amounts(self, output_padding: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) padding of the zero-inserted input (negative: cropping)."""
        oph, opw = self.output_padding if output_padding is None else output_padding
        (kh, kw), (dh, dw), (ph, pw) = self.kernel_size, self.dilation, self.transpose_padding
        top, left = dh * (kh - 1) - ph, dw * (kw - 1) - pw
        return (left, left + opw, top, top + oph)

    def pad(self, x: Tensor, output_padding: tuple[int, int] | None = None) -> Tensor:
        """z: x with stride − 1 zeros inserted between pixels, then padded (what the equivalent conv reads)."""
        return F.pad(zero_insert(x, self.transpose_stride), self.pad_amounts(output_padding))

    def _output_padding(self, x: Tensor, output_size) -> tuple[int, int]:
        if output_size is None:
            return self.output_padding
        want = tuple(output_size)[-2:]
        got = [(n - 1) * s - 2 * p + d * (k - 1) + 1 for n, s, p, d, k in
               zip(x.shape[-2:], self.transpose_stride, self.transpose_padding, self.dilation, self.kernel_size)]
        pads = tuple(w - g for w, g in zip(want, got))
        if any(not 0 <= op < max(s, d) for op, s, d in zip(pads, self.transpose_stride, self.dilation)):
            raise ValueError(f"output_size={tuple(output_size)} is not reachable from input {tuple(x.shape)}: "
                             f"sizes {got} plus output padding below max(stride, dilation).")
        return pads

    def forward(self, x: Tensor, output_size=None) -> Tensor:
        op = self._output_padding(x, output_size)
        mu = self.mean(x)
        if mu is None:
            w = transpose_weight_of_conv(self.quant_weight(), self.groups)
            return F.conv_transpose2d(self.transform_input(x, None), w, self.bias, self.transpose_stride,
                                      self.transpose_padding, op, self.groups, self.dilation)
        y = F.conv2d(self.transform_input(self.pad(x, op), mu), self.quant_weight(), self.bias, 1, 0, self.dilation,
                     self.groups)
        correction = qlayer.correction_term(mu, qlayer.taps_summed(self.correction_weight()), self.channel_dim)
        return y + correction[:, :, None, None]  # (B|1, N, 1, 1)

    def to_float(self) -> nn.ConvTranspose2d:
        """A plain nn.ConvTranspose2d with the weight in its own basis (quantization dropped)."""
        w = self.original_weight().detach()
        conv = nn.ConvTranspose2d(self.in_channels, self.out_channels, self.kernel_size, self.transpose_stride,
                                  self.transpose_padding, self.output_padding, self.groups, self.bias is not None,
                                  self.dilation, device=w.device, dtype=w.dtype)
        conv.weight.data.copy_(transpose_weight_of_conv(w, self.groups))
        if self.bias is not None:
            conv.bias.data.copy_(self.bias.detach())
        return conv


def zero_insert(x: Tensor, stride: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, C, (H−1)·s_h + 1, (W−1)·s_w + 1): stride − 1 zeros between neighbouring pixels."""
    sh, sw = stride
    if sh == sw == 1:
        return x
    b, c, h, w = x.shape
    out = x.new_zeros(b, c, (h - 1) * sh + 1, (w - 1) * sw + 1)
    out[:, :, ::sh, ::sw] = x
    return out


def conv_weight_of_transpose(w: Tensor, groups: int) -> Tensor:
    """(C_in, C_out/g, kh, kw) transposed-conv weight -> (C_out, C_in/g, kh, kw) kernel of the equivalent conv."""
    cin, cog, kh, kw = w.shape
    v = w.reshape(groups, cin // groups, cog, kh, kw).transpose(1, 2)  # (g, C_out/g, C_in/g, kh, kw)
    return v.reshape(groups * cog, cin // groups, kh, kw).flip(2, 3)


def transpose_weight_of_conv(w: Tensor, groups: int) -> Tensor:
    """Inverse of `conv_weight_of_transpose`."""
    cout, cig, kh, kw = w.shape
    v = w.flip(2, 3).reshape(groups, cout // groups, cig, kh, kw).transpose(1, 2)  # (g, C_in/g, C_out/g, kh, kw)
    return v.reshape(groups * cig, cout // groups, kh, kw)


def _ints_of(fq: FakeQuantizer, w: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """The integers a weight quantizer's fake quantization of `w` uses: int8 (N, K), scales, zero points (N|1, G)."""
    g = fq.spec.group_size
    scale, zero = fq.qparams(qlayer.weight_view(w, g))
    return qlayer.weight_ints(w, scale, zero, g, fq.spec.qmin, fq.spec.qmax)


def _load_float(q: QuantLayer, mod: nn.Module, weight: Tensor | None = None) -> QuantLayer:
    with torch.no_grad():
        q.weight.copy_(mod.weight if weight is None else weight)
        if mod.bias is not None:
            q.bias.copy_(mod.bias)
    q.train(mod.training)
    if q.config.rotation == "double":
        q.fold_rotation()
    if q.w_quant is not None:
        q.w_quant.init_from_weight(q.weight)
    return q


def layer_config_to_dict(cfg: LayerQuantConfig) -> dict:
    """JSON-able form of a LayerQuantConfig (used in checkpoints and the export manifest)."""
    return {
        "w": None if cfg.w is None else cfg.w.to_dict(),
        "a": None if cfg.a is None else cfg.a.to_dict(),
        "rotation": cfg.rotation,
        "block": cfg.block,
        "seed": cfg.seed,
        "center": cfg.center,
        "normalize": cfg.normalize,
        "correction_bits": cfg.correction_bits,
    }


def layer_config_from_dict(d: dict) -> LayerQuantConfig:
    """Inverse of `layer_config_to_dict`."""
    return LayerQuantConfig(
        w=None if d["w"] is None else QuantizerSpec(**d["w"]),
        a=None if d["a"] is None else QuantizerSpec(**d["a"]),
        **{k: d[k] for k in ("rotation", "block", "seed", "center", "normalize", "correction_bits")},
    )


def resample_timesteps(model: nn.Module, buckets: int) -> None:
    """Resize every per-timestep activation table of `model` to `buckets` entries (layer configs follow).

    Use it when the sampling schedule changes (e.g. tables trained with 100 buckets, deployed with 20 steps);
    the tables become new Parameters, so build the optimizer afterwards.
    """
    for layer in model.modules():
        q = getattr(layer, "a_quant", None) if isinstance(layer, QuantLayer) else None
        if q is None or q.spec.dynamic:
            continue
        q.resample_timesteps(buckets)
        layer.config = replace(layer.config, a=q.spec)


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every FakeQuantizer in `model` on or off (all off + rotation none is bit-exact with the original)."""
    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            m.enabled = enabled
