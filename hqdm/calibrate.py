"""calibrate(): PTQ initialization from real forward calls.

Three passes over the calibration batches, all with every quantizer off (each layer sees full-precision inputs):

1. per-layer, per-timestep-bucket input statistics: channel mean, std, absmax -> static μ and HadaNorm σ (folded);
2. per-bucket range of what each activation quantizer sees (after centering, σ and the Hadamard);
3. per-bucket squared error of every clipping ratio in the MSE grid -> the step-size table.

Weight step sizes are searched again afterwards, since σ folding changed the weights.

Under torch.distributed (more than one process) every rank calls `calibrate` on its own share of the batches and
each pass's accumulators are all-reduced before they are used (sums, counts and squared errors summed, ranges
taken as min / max): every rank ends with the same state, the state one process reaches on all shares together.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hqdm.adapters import Adapter, get_adapter
from hqdm.layers import QuantLayer, set_quantizers_enabled
from hqdm.quant_primitives import MSE_GRID, range_to_qparams

SIGMA_FLOOR = 1e-4
"""σ is clamped to this fraction of the layer's largest channel std, so dead channels never divide by ~0."""


@dataclass
class LayerStats:
    """Input statistics of one layer, per timestep bucket (rows) and channel (columns)."""

    count: Tensor
    sum: Tensor
    sum_sq: Tensor
    sum_sq_centered: Tensor
    absmax: Tensor
    per_sample: bool = False
    """True when μ is the per-sample token mean (dynamic centering), so σ is measured around it."""

    @classmethod
    def empty(cls, buckets: int, width: int) -> LayerStats:
        z = torch.zeros(buckets, width, dtype=torch.float64)
        return cls(torch.zeros(buckets, dtype=torch.float64), z.clone(), z.clone(), z.clone(), z.clone())

    @property
    def mean(self) -> Tensor:
        """(C,) channel mean over all buckets."""
        return self.sum.sum(0) / self.count.sum().clamp_min(1)

    @property
    def std(self) -> Tensor:
        """(C,) channel std over all buckets, around the per-sample mean where centering is dynamic."""
        n = self.count.sum().clamp_min(1)
        if self.per_sample:
            return (self.sum_sq_centered.sum(0) / n).clamp_min(0).sqrt()
        return (self.sum_sq.sum(0) / n - self.mean.pow(2)).clamp_min(0).sqrt()


def forward_batch(model: nn.Module, batch, adapter: Adapter) -> Tensor:
    """Run one batch: a dict {x, t, y?, context?, pooled?, guidance?} through the adapter, or a tensor / tuple
    straight into the model."""
    if isinstance(batch, dict):
        return adapter.predict(model, batch["x"], batch["t"], batch.get("y"), batch.get("context"),
                               batch.get("pooled"), batch.get("guidance"))
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def eval_mode(*models: nn.Module) -> dict[nn.Module, bool]:
    """Put `models` in eval mode; returns every submodule's own train/eval flag for `restore_modes`."""
    modes = {m: m.training for model in models for m in model.modules()}
    for model in models:
        model.eval()
    return modes


def restore_modes(modes: dict[nn.Module, bool]) -> None:
    """Give every module back the train/eval flag `eval_mode` found (a frozen submodule stays in eval)."""
    for m, training in modes.items():
        m.training = training


def _buckets_of(layer: QuantLayer, batch: int, device) -> Tensor:
    q = layer.a_quant
    if q is None or q.spec.dynamic or q.spec.timestep_buckets == 1:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return q.bucket_index(batch, device)


def _n_buckets(layer: QuantLayer) -> int:
    q = layer.a_quant
    return 1 if q is None or q.spec.dynamic else q.spec.timestep_buckets


def _channels_last(x: Tensor, channel_dim: int) -> Tensor:
    x = x.movedim(channel_dim, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, C)


def _reduce_into(dst: Tensor, idx: Tensor, src: Tensor, how: str) -> None:
    """dst[idx[i]] = how(dst[idx[i]], src[i]) over the batch axis (amin / amax per timestep bucket)."""
    dst.scatter_reduce_(0, idx.reshape(-1, *[1] * (src.dim() - 1)).expand_as(src), src, how)


def _all_reduce(tensors: list[Tensor], how: str) -> None:
    """Reduce CPU accumulators in place across the default process group ('sum', 'min', 'max'); a no-op in one
    process. NCCL reduces device tensors only, so the accumulators travel to the rank's GPU and back."""
    import torch.distributed as dist

    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[how]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for t in tensors:
        moved = t if device is None else t.to(device)
        dist.all_reduce(moved, op=op)
        if moved is not t:
            t.copy_(moved.cpu())


def _run(model, batches, adapter, hooks: dict[QuantLayer, callable], desc: str, progress: bool) -> None:
    handles = [layer.register_forward_pre_hook(lambda m, args, fn=fn: fn(m, args[0])) for layer, fn in hooks.items()]
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                forward_batch(model, batch, adapter)
    finally:
        for h in handles:
            h.remove()


def _stats_pass(model, batches, adapter, layers, progress, sync) -> dict[QuantLayer, LayerStats]:
    stats = {layer: LayerStats.empty(_n_buckets(layer), layer.in_width) for layer in layers}

    def hook(layer: QuantLayer, x: Tensor) -> None:
        s, v = stats[layer], _channels_last(x.detach(), layer.channel_dim).double()  # (B, T, C)
        idx = _buckets_of(layer, v.shape[0], v.device).cpu()
        if layer.config.center == "dynamic" and v.shape[1] > 1:
            s.per_sample = True
            s.sum_sq_centered.index_add_(0, idx, (v - v.mean(dim=1, keepdim=True)).pow(2).sum(1).cpu())
        s.count.index_add_(0, idx, torch.full((v.shape[0],), float(v.shape[1]), dtype=torch.float64))
        s.sum.index_add_(0, idx, v.sum(1).cpu())
        s.sum_sq.index_add_(0, idx, v.pow(2).sum(1).cpu())
        _reduce_into(s.absmax, idx, v.abs().amax(1).cpu(), "amax")

    _run(model, batches, adapter, {layer: hook for layer in layers}, "calibrate: statistics", progress)
    if sync:
        _all_reduce([t for s in stats.values() for t in (s.count, s.sum, s.sum_sq, s.sum_sq_centered)], "sum")
        _all_reduce([s.absmax for s in stats.values()], "max")
        flags = [torch.tensor([s.per_sample], dtype=torch.uint8) for s in stats.values()]
        _all_reduce(flags, "max")  # a rank whose share never reached a layer learns how the others measured σ
        for s, flag in zip(stats.values(), flags):
            s.per_sample = bool(flag)
    return stats


def _apply_stats(layer: QuantLayer, stats: LayerStats) -> None:
    if stats.count.sum() == 0:
        raise RuntimeError("A quantized layer saw no input during calibration; check that the batches reach it.")
    with torch.no_grad():
        if layer.config.center != "none":
            layer.mu.copy_(stats.mean.to(layer.mu))
        if layer.config.normalize:
            std = stats.std
            layer.fold_sigma(std.clamp_min(SIGMA_FLOOR * std.max().clamp_min(1e-12)).to(layer.sigma))


def _range_pass(model, batches, adapter, layers, progress, sync) -> dict[QuantLayer, tuple[Tensor, Tensor]]:
    ranges = {}
    for layer in layers:
        shape = layer.a_quant.scale.shape
        ranges[layer] = (torch.full(shape, float("inf")), torch.full(shape, float("-inf")))

    def hook(layer: QuantLayer, x: Tensor) -> None:
        h = layer.act_input(x)
        lo, hi = layer.a_quant.observe_range(h)
        idx = _buckets_of(layer, h.shape[0], h.device).cpu()
        _reduce_into(ranges[layer][0], idx, lo.cpu(), "amin")
        _reduce_into(ranges[layer][1], idx, hi.cpu(), "amax")

    _run(model, batches, adapter, {layer: hook for layer in layers}, "calibrate: ranges", progress)
    if sync:
        _all_reduce([lo for lo, _ in ranges.values()], "min")
        _all_reduce([hi for _, hi in ranges.values()], "max")
    return {layer: _fill_unseen(lo, hi) for layer, (lo, hi) in ranges.items()}


def _fill_unseen(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Buckets no calibration sample fell into take the range of the nearest seen bucket."""
    nearest = _nearest_seen(torch.isfinite(lo.reshape(lo.shape[0], -1)).all(1))
    return lo[nearest], hi[nearest]


def _nearest_seen(seen: Tensor) -> Tensor:
    """(buckets,) index of the nearest seen bucket (the lower one on ties) for every bucket."""
    if not seen.any():
        raise RuntimeError("No calibration sample reached this layer's activation quantizer.")
    pos = torch.nonzero(seen).squeeze(1)
    return pos[(torch.arange(seen.shape[0])[:, None] - pos[None]).abs().argmin(1)]


def _mse_pass(model, batches, adapter, layers, ranges, progress, sync) -> None:
    errors = {layer: torch.zeros(layer.a_quant.scale.shape[0], len(MSE_GRID), *layer.a_quant.scale.shape[1:],
                                 dtype=torch.float64) for layer in layers}
    seen = {layer: torch.zeros(layer.a_quant.scale.shape[0], dtype=torch.bool) for layer in layers}

    def hook(layer: QuantLayer, x: Tensor) -> None:
        h = layer.act_input(x)
        idx = _buckets_of(layer, h.shape[0], h.device)
        lo, hi = (r.to(h.device)[idx] for r in ranges[layer])
        errors[layer].index_add_(0, idx.cpu(), layer.a_quant.candidate_errors(h, lo, hi).double().cpu())
        seen[layer][idx.cpu()] = True

    _run(model, batches, adapter, {layer: hook for layer in layers}, "calibrate: MSE search", progress)
    if sync:
        _all_reduce(list(errors.values()), "sum")
        flags = [v.to(torch.uint8) for v in seen.values()]
        _all_reduce(flags, "max")
        seen = {layer: f.bool() for layer, f in zip(seen, flags)}
    for layer in layers:
        q, (lo, hi) = layer.a_quant, ranges[layer]
        err = errors[layer][_nearest_seen(seen[layer])]  # unseen buckets: the nearest seen bucket's choice
        alpha = torch.tensor(MSE_GRID)[err.argmin(1)]  # (buckets, *entry)
        scale, zero_point = range_to_qparams(lo * alpha, hi * alpha, q.spec.qmin, q.spec.qmax, q.spec.symmetric)
        q.set_table(scale, zero_point)


def calibrate(
    model: nn.Module,
    batches: Iterable,
    family: str = "auto",
    progress: bool = True,
    sync: bool = True,
) -> dict[str, LayerStats]:
    """Initialize μ, σ and every static step size of a prepared model from real forward calls.

    Args:
        model: a model returned by `prepare`.
        batches: a re-iterable collection (list, DataLoader) of dicts {x, t, y?, context?, pooled?, guidance?}:
            the noisy input, its (B,) timesteps in the model's own time, labels, text embeddings; or plain tensors /
            tuples for generic models. Iterated three times.
        family: adapter used to call the model ('auto' detects it from the class).
        progress: show a progress bar per pass.
        sync: under torch.distributed with more than one process, all-reduce each pass's accumulators, so every
            rank (each calibrating on its own share of the batches) ends with the state of all shares together;
            every rank must then call `calibrate`. False calibrates each rank on its own batches alone.

    Returns:
        Per-layer input statistics (per timestep bucket: count, sum, sum of squares, absmax), by module name.
        The model (and each submodule) is back in the train / eval mode it was called in.
    """
    if isinstance(batches, Iterable) and iter(batches) is batches:
        raise ValueError("batches is a one-shot iterator; calibrate iterates it three times: pass a list or loader.")
    adapter = get_adapter(model, family)
    names = {m: n for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    if not names:
        raise ValueError("The model has no quantized layers: run hqdm.prepare(model, config) first.")
    layers = list(names)
    modes = eval_mode(model)
    enabled = {q: q.enabled for layer in layers for q in layer.quantizers()}
    set_quantizers_enabled(model, False)
    try:
        stats = _stats_pass(model, batches, adapter, layers, progress, sync)
        for layer in layers:
            _apply_stats(layer, stats[layer])
        static = [layer for layer in layers if layer.a_quant is not None and not layer.a_quant.spec.dynamic]
        if static:
            ranges = _range_pass(model, batches, adapter, static, progress, sync)
            _mse_pass(model, batches, adapter, static, ranges, progress, sync)
        for layer in layers:
            if layer.w_quant is not None:
                layer.w_quant.init_from_weight(layer.effective_weight())
            layer.calibrated.fill_(True)
    finally:
        for q, on in enabled.items():
            q.enabled = on
        restore_modes(modes)
    return {names[layer]: s for layer, s in stats.items()}


def is_calibrated(model: nn.Module) -> bool:
    """True when every quantized layer of `model` went through `calibrate`."""
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    return bool(layers) and all(bool(m.calibrated) for m in layers)
