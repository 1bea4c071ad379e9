"""prepare(): walk a model, resolve each layer's quantization from glob rules, and swap in quantized layers."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

from torch import nn

from hqdm.adapters import Adapter, remember_adapter, resolve_adapter
from hqdm.call import CallSpec
from hqdm.config import LayerQuantConfig, QuantConfig, Rule, apply_rule
from hqdm.fake_quantizer import FakeQuantizer
from hqdm.layers import QuantConv2d, QuantConvTranspose2d, QuantLayer, QuantLinear
from hqdm.timesteps import attach_timesteps

_SWAPPABLE = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.MultiheadAttention)
_MHA_PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class LayerEntry:
    """One swappable layer and what prepare did with it."""

    name: str
    kind: str
    block_type: str
    config: LayerQuantConfig | None

    def describe(self) -> str:
        c = self.config
        if c is None:
            return "float (rule)"
        w = "wF" if c.w is None else f"w{c.w.bits}"
        a = "aF" if c.a is None else f"a{c.a.bits}{'d' if c.a.dynamic else ''}"
        knobs = [c.rotation if c.rotation == "none" else f"{c.rotation}/{c.block}"]
        if c.center != "none":
            knobs.append(f"center={c.center}")
        if c.normalize:
            knobs.append("σ")
        return f"{w}{a} " + ",".join(knobs)


@dataclass
class PrepareReport:
    """What prepare swapped, how, and everything left in floating point."""

    family: str
    layers: list[LayerEntry] = field(default_factory=list)
    float_modules: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> list[LayerEntry]:
        return [e for e in self.layers if e.config is not None]

    def table(self) -> str:
        rows = [(e.name, e.kind, e.block_type, e.describe()) for e in self.layers]
        rows += [(name, kind, "-", "float (not a matmul layer)") for name, kind in self.float_modules]
        widths = [max(len(r[i]) for r in rows + [("layer", "kind", "block", "quantization")]) for i in range(4)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format("layer", "kind", "block", "quantization"), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        summary = (f"{self.family}: {len(self.quantized)} layers quantized, "
                   f"{len(self.layers) - len(self.quantized)} matmul layers kept float by rule, "
                   f"{len(self.float_modules)} other parameterized modules in float")
        return "\n".join([summary, *lines, *(f"note: {n}" for n in self.notes)])

    def __str__(self) -> str:
        return self.table()


def resolve_layer(name: str, config: QuantConfig, adapter: Adapter,
                  family_rules: list[Rule] | None = None) -> LayerQuantConfig | None:
    """Layer config for module `name`: defaults, then the family's rules, then the user's, later rules winning."""
    cfg: LayerQuantConfig | None = config.layer(config.w_bits, config.a_bits)
    rules = adapter.rules(config) if family_rules is None else family_rules
    for rule in [*rules, *config.rules]:
        if rule.matches(name):
            cfg = apply_rule(cfg, rule, config)
    return cfg


def prepare(model: nn.Module, config: QuantConfig, inplace: bool = False, adapter: Adapter | str | None = None,
            call: CallSpec | None = None) -> tuple[nn.Module, PrepareReport]:
    """Swap every Linear / Conv2d / ConvTranspose2d / MultiheadAttention of `model` for its quantized form.

    Layers whose input width is below the Hadamard block (a 1-channel input, a width-1 time MLP) stay unrotated
    unless a user rule asks for their rotation; for models without a family, the first and the last layer (in
    module order) stay at `end_bits`. torch's fused TransformerEncoderLayer fast path, which would read the float
    weights of quantized layers, is turned off where it covers them.

    Args:
        model: a diffusers model (DiT, UNet, SD3, FLUX, Sana, PixArt) or any nn.Module.
        config: bit widths, method knobs and per-layer rules over module names.
        inplace: modify `model` itself; by default a deep copy is prepared and `model` stays the FP teacher.
        adapter: the family (an Adapter or a registered name); None: `config.family`.
        call: the model's call declaration, replacing the adapter's (arguments, time convention, prediction).

    Returns:
        (student, report): the quantized model and a readable report of what was swapped and how. The student
        reads its timesteps from its own call (see `hqdm.timesteps`) and remembers its adapter, so `calibrate`,
        `quant_report` and `export` with family='auto' call it the same way.

    Raises:
        ValueError: a user rule that matches no layer, or a layer whose width a Hadamard block the user asked for
            cannot cover.
    """
    student = model if inplace else copy.deepcopy(model)
    adapter = resolve_adapter(student, config.family if adapter is None else adapter, call)
    names = [n for n, m in student.named_modules() if isinstance(m, _SWAPPABLE) and not _inside_mha(student, n)]
    _check_rules(config, names)
    report = PrepareReport(family=adapter.name, notes=adapter.setup_student(student))
    rules = adapter.rules(config) + _position_rules(adapter, config, names)
    span = adapter.call.bucket_span(config.num_train_timesteps)
    for name in names:
        module = student.get_submodule(name)
        entries, new = _swap(name, module, config, adapter, rules, span, report.notes)
        report.layers.extend(entries)
        if new is not None:
            _set_submodule(student, name, new)
    report.notes += _fast_paths_off(student)
    report.float_modules = _float_leftovers(student)
    attach_timesteps(student, adapter.call.timestep_call(type(student).forward))
    remember_adapter(student, adapter)
    return student, report


def _swap(name: str, module: nn.Module, config: QuantConfig, adapter: Adapter, rules: list[Rule], span: float,
          notes: list[str]):
    block = adapter.block_type(name, module)
    if isinstance(module, nn.MultiheadAttention):
        from hqdm.mha import PROJECTION_BLOCKS, QuantMultiheadAttention

        # one entry per projection, so a projection a rule keeps in float is listed as such
        widths = dict(zip(_MHA_PROJ, (module.embed_dim, module.kdim, module.vdim, module.embed_dim)))
        cfgs = {p: _fitted(f"{name}.{p}", resolve_layer(f"{name}.{p}", config, adapter, rules), widths[p], config,
                           notes) for p in _MHA_PROJ}
        blocks = {p: adapter.block_type(f"{name}.{p}", None, PROJECTION_BLOCKS[p]) for p in _MHA_PROJ}
        entries = [LayerEntry(f"{name}.{p}", "MultiheadAttention", blocks[p], c) for p, c in cfgs.items()]
        if all(c is None for c in cfgs.values()):
            return entries, None
        return entries, _build(name, lambda: QuantMultiheadAttention.from_float(module, cfgs, span))
    width = module.in_features if isinstance(module, nn.Linear) else module.in_channels
    cfg = _fitted(name, resolve_layer(name, config, adapter, rules), width, config, notes)
    entry = LayerEntry(name, type(module).__name__, block, cfg)
    if cfg is None or not cfg.quantized and cfg.rotation == "none" and cfg.center == "none":
        return [LayerEntry(name, type(module).__name__, block, None)], None
    if isinstance(module, nn.Linear):
        cls = QuantLinear
    else:
        cls = QuantConvTranspose2d if isinstance(module, nn.ConvTranspose2d) else QuantConv2d
    return [entry], _build(name, lambda: cls.from_float(module, cfg, span))


def _fitted(name: str, cfg: LayerQuantConfig | None, width: int, config: QuantConfig,
            notes: list[str]) -> LayerQuantConfig | None:
    """No rotation for a layer narrower than its Hadamard block, unless a user rule asks for one."""
    if cfg is None or cfg.rotation == "none":
        return cfg
    fits = width > 1 if cfg.block == "full" else width >= cfg.block
    asked = any(r.matches(name) and (r.rotation not in (None, "none") or r.block is not None) for r in config.rules)
    if fits or asked:
        return cfg
    notes.append(f"{name}: input width {width} < Hadamard block {cfg.block}: not rotated")
    return replace(cfg, rotation="none", normalize=False)


def _position_rules(adapter: Adapter, config: QuantConfig, names: list[str]) -> list[Rule]:
    """The first and the last layer at `end_bits` for adapters without layer names (their projections for an MHA);
    a model of fewer than three layers has no body to set its ends apart from, and keeps the configured bits."""
    if not adapter.end_by_position or len(names) < 3:
        return []
    ends = dict.fromkeys((names[0], names[-1]))
    return [Rule(pattern=p, w_bits=config.end_bits, a_bits=config.end_bits) for n in ends for p in (n, f"{n}.*")]


def _fast_paths_off(model: nn.Module) -> list[str]:
    """Turn off torch's fused encoder paths where they would bypass quantized layers (they read raw weights)."""
    notes = []
    for name, mod in model.named_modules():
        quantized = any(isinstance(m, (QuantLayer, FakeQuantizer)) for m in mod.modules())
        if isinstance(mod, nn.TransformerEncoderLayer) and quantized and mod.activation_relu_or_gelu:
            mod.activation_relu_or_gelu = 0  # read only by the fused path's eligibility check
            notes.append(f"{name}: torch's fused TransformerEncoderLayer path off (quantized layers inside)")
        if isinstance(mod, nn.TransformerEncoder) and quantized:
            mod.use_nested_tensor = False
    return notes


def _build(name: str, make):
    try:
        return make()
    except ValueError as err:
        raise ValueError(
            f"Layer {name!r}: {err} To change this layer only, add a rule that changes the offending field, e.g. "
            f"Rule(pattern={name!r}, block=...), Rule(pattern={name!r}, rotation='none'), "
            f"Rule(pattern={name!r}, w_granularity='channel') or Rule(pattern={name!r}, skip=True)."
        ) from err


def _check_rules(config: QuantConfig, names: list[str]) -> None:
    candidates = names + [f"{n}.{p}" for n in names for p in _MHA_PROJ]
    for rule in config.rules:
        if not any(rule.matches(n) for n in candidates):
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            raise ValueError(
                f"Rule pattern {rule.pattern!r} matches no Linear / Conv2d / MultiheadAttention in the model. "
                f"Module names look like: {shown}. Fix the glob (fnmatch syntax: '*' matches dots too)."
            )


def _inside_mha(model: nn.Module, name: str) -> bool:
    """out_proj of a MultiheadAttention is handled with its parent, not on its own."""
    parent = name.rpartition(".")[0]
    return bool(name) and isinstance(model.get_submodule(parent) if parent else model, nn.MultiheadAttention)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _float_leftovers(model: nn.Module) -> list[tuple[str, str]]:
    """Modules with parameters of their own that no quantized layer covers (norms, embeddings, other convs)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLayer, FakeQuantizer)) or _under_quant(model, name):
            continue
        if isinstance(mod, _SWAPPABLE):
            continue
        if any(True for _ in mod.parameters(recurse=False)):
            out.append((name, type(mod).__name__))
    return out


def _under_quant(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), QuantLayer):
            return True
    return False


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Every quantized layer of a prepared model, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
