"""quant_report(): per-layer output SQNR of a quantized model against its floating-point reference."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hqdm.adapters import get_adapter
from hqdm.calibrate import eval_mode, forward_batch, restore_modes
from hqdm.layers import QuantLayer
from hqdm.metrics import SQNRSum


def _db(signal: float, noise: float) -> float:
    return SQNRSum(signal, noise).db


@dataclass
class LayerSQNR:
    """Output SQNR of one layer, accumulated over the report batches."""

    name: str
    block_type: str
    signal: float = 0.0
    noise: float = 0.0

    @property
    def sqnr_db(self) -> float:
        return _db(self.signal, self.noise)


@dataclass
class QuantReport:
    """Per-layer and per-block-type SQNR (dB) of quantized vs reference outputs, and the model output's SQNR."""

    layers: list[LayerSQNR] = field(default_factory=list)
    output_signal: float = 0.0
    output_noise: float = 0.0

    @property
    def output_sqnr_db(self) -> float:
        return _db(self.output_signal, self.output_noise)

    def by_block(self) -> dict[str, float]:
        """SQNR per block type, pooling signal and noise energy over that type's layers."""
        sig, noise = defaultdict(float), defaultdict(float)
        for entry in self.layers:
            sig[entry.block_type] += entry.signal
            noise[entry.block_type] += entry.noise
        return {k: _db(sig[k], noise[k]) for k in sig}

    def table(self, per_layer: bool = True) -> str:
        lines = [f"{'block type':<14} {'layers':>6} {'SQNR dB':>8}"]
        counts = defaultdict(int)
        for entry in self.layers:
            counts[entry.block_type] += 1
        lines += [f"{k:<14} {counts[k]:>6} {v:>8.2f}" for k, v in self.by_block().items()]
        lines.append(f"{'model output':<14} {'':>6} {self.output_sqnr_db:>8.2f}")
        if per_layer:
            width = max((len(e.name) for e in self.layers), default=5)
            lines += ["", f"{'layer':<{width}} {'block':<12} {'SQNR dB':>8}"]
            lines += [f"{e.name:<{width}} {e.block_type:<12} {e.sqnr_db:>8.2f}" for e in self.layers]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str, title: str = "per-layer output SQNR") -> str:
        """Save a PNG: one bar per layer in model order, colored by block type."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        kinds = list(dict.fromkeys(e.block_type for e in self.layers))
        colors = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
        fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(self.layers)), 3.6), dpi=120)
        values = [min(e.sqnr_db, 80.0) for e in self.layers]
        ax.bar(range(len(values)), values, color=[colors[e.block_type] for e in self.layers])
        ax.set_xlabel("layer (model order)")
        ax.set_ylabel("SQNR (dB)")
        ax.set_title(f"{title} — model output {self.output_sqnr_db:.1f} dB")
        handles = [Patch(facecolor=colors[k], label=k) for k in kinds]  # one swatch per block type, in its colour
        ax.legend(handles=handles, fontsize=7, ncol=min(len(kinds), 6), loc="upper center",
                  bbox_to_anchor=(0.5, -0.18))
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


def _first(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _report_modules(quantized: nn.Module, reference: nn.Module) -> tuple[list[str], dict[str, list[str]]]:
    """(quantized layers with a same-named reference module, {attention name: its quantized projections}).

    Projections of a QuantMultiheadAttention are compared with what the float nn.MultiheadAttention's packed
    projections compute (`hqdm.mha.reference_projections`): its out_proj is never called as a module.
    """
    from hqdm.mha import PROJECTIONS, QuantMultiheadAttention

    refs = dict(reference.named_modules())
    attention = {n: [p for p in PROJECTIONS if isinstance(getattr(m, p), QuantLayer)]
                 for n, m in quantized.named_modules()
                 if isinstance(m, QuantMultiheadAttention) and isinstance(refs.get(n), nn.MultiheadAttention)}
    inside = tuple(f"{n}." for n in attention)
    names = [n for n, m in quantized.named_modules()
             if isinstance(m, QuantLayer) and n in refs and not (inside and n.startswith(inside))]
    return names, attention


@torch.no_grad()
def quant_report(
    quantized: nn.Module,
    reference: nn.Module,
    batches: Iterable,
    family: str = "auto",
    plot: str | None = None,
) -> QuantReport:
    """Per-layer output SQNR of `quantized` against `reference` on the same batches.

    Each quantized layer's output (its input already carries the error of the layers before it) is compared with
    the same-named layer of the floating-point reference, pooled over batches, then per block type (qkv,
    attn_out, fc1, fc2, adaLN, conv, ...): the view the HadaNorm paper uses.

    Args:
        quantized: a prepared (and calibrated) model.
        reference: the floating-point model it was prepared from.
        batches: dicts {x, t, y?, context?} (or tensors for generic models), as for `calibrate`.
        family: adapter ('auto' detects it).
        plot: optional PNG path for the per-layer bar plot.
    """
    from hqdm.mha import PROJECTION_BLOCKS, reference_projections

    adapter = get_adapter(quantized, family)
    layer_names, attention = _report_modules(quantized, reference)
    projections = [f"{a}.{p}" for a, ps in attention.items() for p in ps]
    names = layer_names + projections
    if not names:
        raise ValueError("No quantized layer of `quantized` has a same-named module in `reference`.")
    blocks = {n: adapter.block_type(n, reference.get_submodule(n)) for n in layer_names}
    blocks.update({n: adapter.block_type(n, None, PROJECTION_BLOCKS[n.rpartition(".")[2]]) for n in projections})
    report = QuantReport([LayerSQNR(n, blocks[n]) for n in names])
    entries = {e.name: e for e in report.layers}
    outs: dict[str, dict[str, Tensor]] = {"q": {}, "r": {}}
    handles = []

    def keep(key: str, n: str):
        def hook(module, args, out) -> None:
            outs[key][n] = _first(out).detach().double()

        return hook

    def keep_projections(a: str):
        def hook(module, args, kwargs, out) -> None:
            for p, y in reference_projections(module, args, kwargs, out).items():
                outs["r"][f"{a}.{p}"] = y.detach().double()

        return hook

    for n in names:
        handles.append(quantized.get_submodule(n).register_forward_hook(keep("q", n)))
    for n in layer_names:
        handles.append(reference.get_submodule(n).register_forward_hook(keep("r", n)))
    for a in attention:
        handles.append(reference.get_submodule(a).register_forward_hook(keep_projections(a), with_kwargs=True))
    modes = eval_mode(quantized, reference)
    try:
        for batch in batches:
            out_q = forward_batch(quantized, batch, adapter).double()
            out_r = forward_batch(reference, batch, adapter).double()
            report.output_signal += out_r.pow(2).sum().item()
            report.output_noise += (out_q - out_r).pow(2).sum().item()
            for n in names:
                entries[n].signal += outs["r"][n].pow(2).sum().item()
                entries[n].noise += (outs["q"][n] - outs["r"][n]).pow(2).sum().item()
    finally:
        for h in handles:
            h.remove()
        restore_modes(modes)
    if plot:
        report.plot(plot)
    return report
