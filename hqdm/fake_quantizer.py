"""FakeQuantizer: simulates the quantization of one weight or activation tensor in floating point.

Scales live in a canonical view of the tensor:

    weight  W (N, ...)            -> (N, K)          K = all input axes flattened (PyTorch order)
                                     (N, K/g, g)     granularity='group'
    act     x (B, ..., C, ...)    -> (B, T, C)       channel axis moved last, T = tokens or pixels
                                     (B, T, C/g, g)  granularity='group'

Static activation scales are a table of `timestep_buckets` entries; each sample reads the entry of its own
timestep, which the prepared model takes from its own call (`hqdm.timesteps`). The forward has no `.item()`,
no `bool(tensor)` and no per-call Python state, so it traces into one graph under `torch.compile`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hqdm.config import QuantizerSpec
from hqdm.qlayer import learned_scale, table_qparams, weight_qparams, weight_view
from hqdm.quant_primitives import MSE_GRID, fake_quantize, mse_search, range_to_qparams
from hqdm.timesteps import Timesteps

Role = Literal["weight", "act"]


class FakeQuantizer(nn.Module):
    """Fake-quantizes a weight (`role='weight'`) or an activation (`role='act'`) according to a `QuantizerSpec`."""

    def __init__(
        self,
        spec: QuantizerSpec,
        role: Role,
        shape: tuple[int, ...],
        channel_dim: int = -1,
        num_train_timesteps: int = 1000,
    ) -> None:
        """Args:
        spec: what to simulate.
        role: 'weight' or 'act'.
        shape: the weight's shape, or (C,) the activation's channel width.
        channel_dim: the activation's channel axis (-1 for (B, N, C), 1 for (B, C, H, W)).
        num_train_timesteps: the timestep range the table buckets divide.
        """
        super().__init__()
        if role not in ("weight", "act"):
            raise ValueError(f"role={role!r}; choose 'weight' or 'act'.")
        self.spec, self.role, self.channel_dim = spec, role, channel_dim
        self.shape, self.num_train_timesteps = tuple(shape), num_train_timesteps
        self.enabled = True
        width = self.shape[0] if role == "act" else int(torch.tensor(self.shape[1:]).prod())
        if spec.granularity == "group" and width % spec.group_size:
            raise ValueError(
                f"group_size={spec.group_size} does not divide the reduction width {width} of this {role} "
                f"(shape {self.shape}); choose a divisor of {width}."
            )
        if role == "act" and spec.narrow_range:
            raise ValueError("narrow_range=True applies to weights only (it bounds the single-rotation weight fold); "
                             "use narrow_range=False for activation quantizers.")
        if role == "weight" and spec.granularity == "token":
            raise ValueError("granularity='token' applies to activations only; weights use tensor, channel or group.")
        if not spec.dynamic:
            entry = self._entry_shape()
            self.scale = nn.Parameter(torch.ones(entry))
            self.zero_point = None if spec.symmetric else nn.Parameter(torch.zeros(entry))
        self.register_buffer("initialized", torch.tensor(spec.dynamic))
        self.ready = spec.dynamic
        """Python mirror of the `initialized` buffer (kept in step on load), read by forward without a sync."""
        self.timesteps = Timesteps()
        """Where the per-sample timesteps come from: the model's shared `Timesteps` once `prepare` attached it."""
        self.register_load_state_dict_post_hook(_sync_ready)

    def extra_repr(self) -> str:
        s = self.spec
        gran = f"group({s.group_size})" if s.granularity == "group" else s.granularity
        kind = "dynamic" if s.dynamic else f"static×{s.timestep_buckets}" if self.role == "act" else "static"
        return f"{self.role}, {s.bits}-bit, {'sym' if s.symmetric else 'asym'}, {gran}, {kind}, enabled={self.enabled}"

    # ---- canonical view -------------------------------------------------------------------------------------
    def _entry_shape(self) -> tuple[int, ...]:
        """Shape of the learned scale: per weight, or per table (buckets first) for activations."""
        g, s = self.spec.granularity, self.shape
        if self.role == "weight":
            k = int(torch.tensor(s[1:]).prod())
            return {"tensor": (1,), "channel": (s[0],), "group": (s[0], k // (self.spec.group_size or 1))}[g]
        per = {"tensor": (), "channel": (s[0],), "group": (s[0] // (self.spec.group_size or 1),)}[g]
        return (self.spec.timestep_buckets, *per)

    def _view(self, x: Tensor) -> Tensor:
        g = self.spec.group_size
        if self.role == "weight":
            return weight_view(x, g)
        v = x.movedim(self.channel_dim, -1)
        v = v.reshape(v.shape[0], -1, v.shape[-1])  # (B, T, C)
        return v.reshape(*v.shape[:2], -1, g) if g else v  # (B, T, C/g, g)

    def _unview(self, v: Tensor, x: Tensor) -> Tensor:
        if self.role == "weight":
            return v.reshape(x.shape)
        moved = x.movedim(self.channel_dim, -1).shape
        return v.reshape(moved).movedim(-1, self.channel_dim)

    def _dynamic_dims(self, v: Tensor) -> tuple[int, ...]:
        if self.role == "weight":
            return {"tensor": tuple(range(v.dim())), "channel": (1,), "group": (2,)}[self.spec.granularity]
        return {"tensor": (1, 2), "token": (2,), "channel": (1,), "group": (3,)}[self.spec.granularity]

    def _static_dims(self, v: Tensor) -> tuple[int, ...]:
        """Dims of the canonical view that one table entry covers (activations; the batch axis stays)."""
        return {"tensor": (1, 2), "channel": (1,), "group": (1, 3)}[self.spec.granularity]

    def _broadcast_entry(self, entry: Tensor) -> Tensor:
        """Per-sample table entries (B, *entry) -> broadcastable against the canonical view."""
        return {
            "tensor": lambda e: e.reshape(-1, 1, 1),
            "channel": lambda e: e.reshape(e.shape[0], 1, -1),
            "group": lambda e: e.reshape(e.shape[0], 1, -1, 1),
        }[self.spec.granularity](entry)

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        v = self._view(x)
        scale, zero_point = self.qparams(v)
        return self._unview(fake_quantize_lean(v, scale, zero_point, self.spec.qmin, self.spec.qmax), x)

    def qparams(self, v: Tensor) -> tuple[Tensor, Tensor | None]:
        """Scale and zero point broadcastable against the canonical view `v`."""
        if self.spec.dynamic:
            with torch.no_grad():
                dims = self._dynamic_dims(v)
                lo, hi = v.amin(dim=dims, keepdim=True), v.amax(dim=dims, keepdim=True)
                return range_to_qparams(lo, hi, self.spec.qmin, self.spec.qmax, self.spec.symmetric)
        if not self.ready:
            raise RuntimeError(
                f"This static {self.role} quantizer is not calibrated yet: run hqdm.calibrate(model, batches) "
                "first, or use dynamic scales (a_dynamic=True)."
            )
        if self.role == "weight":
            return weight_qparams(self.scale, self.zero_point, self.spec.granularity == "group")
        idx = self.bucket_index(v.shape[0], v.device)
        scale, zp = table_qparams(self.scale, self.zero_point, idx)
        return self._broadcast_entry(scale), None if zp is None else self._broadcast_entry(zp)

    def bucket_index(self, batch: int, device: torch.device) -> Tensor:
        """(B,) table entry of each sample, from the timesteps of the model's call."""
        return self.timesteps.buckets(batch, self.spec.timestep_buckets, self.num_train_timesteps, device,
                                      "This activation quantizer")

    def table(self) -> tuple[Tensor, Tensor | None]:
        """The per-timestep table as the forward reads it: step sizes |s| ≥ EPS (buckets, *entry), zero points."""
        return learned_scale(self.scale.detach()), None if self.zero_point is None else self.zero_point.detach()

    # ---- initialization -------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_weight(self, w: Tensor) -> None:
        """Weight step sizes by an MSE search over clipped per-granularity ranges."""
        if self.spec.dynamic:
            return
        v = self._view(w.detach().float())
        dims = self._dynamic_dims(v)
        lo, hi = v.amin(dim=dims, keepdim=True), v.amax(dim=dims, keepdim=True)
        s, z = mse_search(v, lo, hi, self.spec.qmin, self.spec.qmax, self.spec.symmetric,
                          lambda e: e.sum(dim=dims, keepdim=True))
        self.scale.copy_(s.reshape(self.scale.shape))
        if self.zero_point is not None:
            self.zero_point.copy_(z.reshape(self.zero_point.shape))
        self.initialized.fill_(True)
        self.ready = True

    @torch.no_grad()
    def observe_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample (lo, hi) over what one table entry covers: each (B, *entry)."""
        v = self._view(x.detach().float())
        dims = self._static_dims(v)
        lo, hi = v.amin(dim=dims), v.amax(dim=dims)
        return lo.reshape(v.shape[0], *self._entry_shape()[1:]), hi.reshape(v.shape[0], *self._entry_shape()[1:])

    @torch.no_grad()
    def candidate_errors(self, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Squared error per sample of each clipping ratio in MSE_GRID given reference ranges: (B, A, *entry)."""
        v = self._view(x.detach().float())
        dims = self._static_dims(v)
        errs = []
        for alpha in MSE_GRID:
            s, z = range_to_qparams(lo * alpha, hi * alpha, self.spec.qmin, self.spec.qmax, self.spec.symmetric)
            s, z = self._broadcast_entry(s), None if z is None else self._broadcast_entry(z)
            err = (fake_quantize(v, s, z, self.spec.qmin, self.spec.qmax) - v).pow(2).sum(dim=dims)
            errs.append(err.reshape(v.shape[0], *self._entry_shape()[1:]))
        return torch.stack(errs, dim=1)

    @torch.no_grad()
    def set_table(self, scale: Tensor, zero_point: Tensor | None = None) -> None:
        """Load a calibrated activation table (buckets, *entry)."""
        self.scale.copy_(scale.reshape(self.scale.shape))
        if self.zero_point is not None and zero_point is not None:
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.initialized.fill_(True)
        self.ready = True

    @torch.no_grad()
    def resample_timesteps(self, buckets: int) -> None:
        """Resize the per-timestep table to `buckets` entries (area interpolation: averages when shrinking).

        The scale becomes a new Parameter: build the optimizer after resampling.
        """
        if self.role != "act" or self.spec.dynamic:
            raise ValueError("Only static activation quantizers keep a per-timestep table to resample.")
        index_time = isinstance(self.num_train_timesteps, int)  # continuous time spans a float range: any count
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1 or (
                index_time and buckets > self.num_train_timesteps):
            raise ValueError(f"buckets={buckets!r} must be an integer in [1, {self.num_train_timesteps}] (index time "
                             "has that many timesteps)" if index_time else
                             f"buckets={buckets!r} must be an integer >= 1.")
        from dataclasses import replace

        def resize(t: Tensor) -> Tensor:
            flat = t.reshape(t.shape[0], -1).T.unsqueeze(0)  # (1, E, buckets)
            return F.interpolate(flat, size=buckets, mode="area")[0].T.reshape(buckets, *t.shape[1:])

        self.spec = replace(self.spec, timestep_buckets=buckets)
        self.scale = nn.Parameter(resize(self.scale.data))
        if self.zero_point is not None:
            self.zero_point = nn.Parameter(resize(self.zero_point.data).round())


class _LeanFakeQuantize(torch.autograd.Function):
    """`fake_quantize` whose backward keeps only its inputs (x in its own dtype, scale, zero point) and recomputes
    the clip mask: autograd through the reference would keep two float32 copies of x's size (the clamp's input and
    q) per quantized tensor, 2-4x the activation memory of a bf16 model."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qrange = (qmin, qmax)
        return fake_quantize(x, scale, zero_point, qmin, qmax)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        v = x / scale  # the same expression as the forward, so the mask is the forward's
        r = v.round()
        z = 0.0 if zero_point is None else zero_point.round()
        q = r + z
        inside = (q >= qmin) & (q <= qmax)
        gx = torch.where(inside, g, 0.0).to(x.dtype) if ctx.needs_input_grad[0] else None
        gs = gz = None
        if ctx.needs_input_grad[1]:  # LSQ: round(v) − v inside, (clamped q) − z outside
            gs = (g * torch.where(inside, r - v, q.clamp(qmin, qmax) - z)).sum_to_size(scale.shape).to(scale.dtype)
        if zero_point is not None and ctx.needs_input_grad[2]:
            gz = (g * torch.where(inside, 0.0, -scale)).sum_to_size(zero_point.shape).to(zero_point.dtype)
        return gx, gs, gz, None, None


def fake_quantize_lean(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """`hqdm.quant_primitives.fake_quantize` (same forward, same STE / LSQ gradients) keeping only its inputs for
    the backward."""
    if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad or
                                           (zero_point is not None and zero_point.requires_grad)):
        return fake_quantize(x, scale, zero_point, qmin, qmax)
    return _LeanFakeQuantize.apply(x, scale, zero_point, qmin, qmax)


def _sync_ready(module: FakeQuantizer, incompatible_keys) -> None:
    """After load_state_dict: the Python flag follows the loaded `initialized` buffer."""
    module.ready = bool(module.initialized)
