"""Typed, frozen configuration of what to simulate: quantizer specs, per-layer knobs, model-wide rules.

Everything here is a frozen dataclass validated on construction, so a bad value fails where it is written
(a YAML file, a Python call) with a message naming the value, the allowed set and the fix.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields, replace
from typing import Literal

from hqdm.hadamard import HadamardSpec
from hqdm.qlayer import fold_parts
from hqdm.quant_primitives import qrange

Granularity = Literal["tensor", "channel", "token", "group"]
Rotation = Literal["none", "single", "double"]
Center = Literal["none", "dynamic", "static"]
Family = Literal["auto", "dit", "unet", "unet_cond", "sd3", "flux", "sana", "pixart", "generic"]

GRANULARITIES = ("tensor", "channel", "token", "group")
ROTATIONS = ("none", "single", "double")
CENTERS = ("none", "dynamic", "static")
FAMILIES = ("auto", "dit", "unet", "unet_cond", "sd3", "flux", "sana", "pixart", "generic")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}.")


def _check_bits(name: str, bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name}={bits!r} is out of range; quantizers support integer bit widths 2 to 8.")


@dataclass(frozen=True)
class QuantizerSpec:
    """How one tensor is fake-quantized: bit width, symmetry, scale granularity and how the scale is found."""

    bits: int = 8
    """Bit width, 2 to 8. Integers live in the signed range [-2^(bits-1), 2^(bits-1) - 1] (see `narrow_range`)."""
    symmetric: bool = True
    """Symmetric (zero point 0) or asymmetric (integer zero point inside the signed range)."""
    granularity: Granularity = "tensor"
    """One scale per tensor, per channel, per token (row over the channel axis) or per group of `group_size`."""
    group_size: int | None = None
    """Elements per group along the reduction axis; required with granularity='group'."""
    dynamic: bool = False
    """Dynamic: range read from each tensor. Static: a learned step size (LSQ), initialized by an MSE search."""
    timestep_buckets: int = 1
    """Static activation scales only: size of the per-timestep scale table (1 = one scale for all timesteps)."""
    narrow_range: bool = False
    """Symmetric weights only: integers in [-(2^(bits-1) - 1), 2^(bits-1) - 1] (e.g. [-7, 7] at 4 bits), so the
    single-rotation fold (W_int·H_raw, block 16) provably stays in one int8 digit."""

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)
        if not isinstance(self.narrow_range, bool):
            raise ValueError(f"narrow_range={self.narrow_range!r} must be True or False.")
        if self.narrow_range and not self.symmetric:
            raise ValueError(
                "narrow_range=True needs symmetric=True (got symmetric=False): an asymmetric quantizer shifts its "
                "integers by a zero point, so a narrow range bounds nothing. Set symmetric=True or narrow_range=False."
            )
        _check_choice("granularity", self.granularity, GRANULARITIES)
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(
                    f"group_size={self.group_size!r} is invalid for granularity='group'; give a positive integer "
                    "that divides the reduction width (e.g. 32, 64, 128)."
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size!r} is only meaningful with granularity='group' "
                f"(got granularity={self.granularity!r}); drop group_size or set granularity='group'."
            )
        if self.granularity == "token" and not self.dynamic:
            raise ValueError(
                "granularity='token' needs dynamic=True: tokens change from input to input, so a static per-token "
                "scale cannot be learned. Use dynamic=True, or granularity='tensor' for a static scale."
            )
        if not isinstance(self.timestep_buckets, int) or self.timestep_buckets < 1:
            raise ValueError(f"timestep_buckets={self.timestep_buckets!r} must be a positive integer.")
        if self.dynamic and self.timestep_buckets != 1:
            raise ValueError(
                f"timestep_buckets={self.timestep_buckets} needs a static quantizer (dynamic=False): dynamic "
                "quantizers read their range from every tensor and keep no table."
            )

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.narrow_range)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.narrow_range)[1]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def weight_spec(bits: int, granularity: Granularity = "channel", group_size: int | None = None,
                narrow_range: bool = False) -> QuantizerSpec:
    """Default weight quantizer: symmetric, learned per-output-channel step sizes."""
    return QuantizerSpec(bits=bits, symmetric=True, granularity=granularity, group_size=group_size, dynamic=False,
                         narrow_range=narrow_range)


def act_spec(bits: int, timestep_buckets: int = 1, dynamic: bool = False) -> QuantizerSpec:
    """Default activation quantizer: static per-tensor scales per timestep bucket, or dynamic per-token scales."""
    if dynamic:
        return QuantizerSpec(bits=bits, symmetric=True, granularity="token", dynamic=True)
    return QuantizerSpec(bits=bits, symmetric=True, granularity="tensor", timestep_buckets=timestep_buckets)


@dataclass(frozen=True)
class LayerQuantConfig:
    """The quantization of one Linear / Conv2d layer: weight and activation quantizers and the transform knobs."""

    w: QuantizerSpec | None = None
    """Weight quantizer; None keeps the weights in floating point."""
    a: QuantizerSpec | None = None
    """Activation (input) quantizer; None keeps the input in floating point."""
    rotation: Rotation = "single"
    """none | single (HQ-DM: rotate, fake-quantize, rotate back) | double (QuaRot: rotation folded into W)."""
    block: int | Literal["full"] = 32
    """Hadamard block size (block-diagonal H) or 'full' for the whole channel width."""
    seed: int | None = None
    """Optional seed of a random ±1 sign vector applied before the Hadamard."""
    center: Center = "none"
    """Subtract a per-channel mean before the rotation: none | dynamic (per sample) | static (calibrated)."""
    normalize: bool = False
    """HadaNorm: divide the centered input by a calibrated per-channel σ folded into W (needs rotation='double')."""
    correction_bits: int | Literal["float"] = 8
    """Bits of the separate per-output-channel copy W_c used for the centering correction μ·W_cᵀ."""
    auto_block: bool = field(default=False, compare=False, repr=False)
    """`block` was picked by QuantConfig(block='auto') (see `auto_block`), so a rule that changes the weight or
    the rotation picks it again; a rule that names a block clears it."""

    def __post_init__(self) -> None:
        _check_choice("rotation", self.rotation, ROTATIONS)
        _check_choice("center", self.center, CENTERS)
        if self.block != "full" and (isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1):
            raise ValueError(f"block={self.block!r} must be a positive integer Hadamard order or 'full'.")
        if self.normalize and self.rotation != "double":
            raise ValueError(
                f"normalize=True needs rotation='double' (got rotation={self.rotation!r}): σ is folded into the "
                "weights before their rotation. Set rotation='double' or normalize=False."
            )
        if self.normalize and self.center == "none":
            raise ValueError("normalize=True (HadaNorm) needs centering; set center='dynamic' or 'static'.")
        if self.correction_bits != "float":
            _check_bits("correction_bits", self.correction_bits)

    @property
    def quantized(self) -> bool:
        return self.w is not None or self.a is not None


@dataclass(frozen=True)
class Rule:
    """A per-layer override: modules whose diffusers name matches `pattern` (a glob) get these fields.

    Fields left as None inherit from earlier rules and the family defaults. `skip=True` keeps the layer in
    floating point. Rules apply in order; later rules win.
    """

    pattern: str
    skip: bool | None = None
    w_bits: int | None = None
    a_bits: int | None = None
    w_granularity: Granularity | None = None
    w_group_size: int | None = None
    w_narrow_range: bool | None = None
    a_dynamic: bool | None = None
    a_symmetric: bool | None = None
    rotation: Rotation | None = None
    block: int | Literal["full"] | None = None
    center: Center | None = None
    normalize: bool | None = None
    correction_bits: int | Literal["float"] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"Rule pattern={self.pattern!r} must be a non-empty glob over module names.")
        for name in ("w_bits", "a_bits"):
            if getattr(self, name) is not None:
                _check_bits(f"{name} (rule {self.pattern!r})", getattr(self, name))
        if self.w_narrow_range is not None and not isinstance(self.w_narrow_range, bool):
            raise ValueError(f"w_narrow_range={self.w_narrow_range!r} (rule {self.pattern!r}) must be True, False or "
                             "None (inherit).")

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclass(frozen=True)
class QuantConfig:
    """Model-wide quantization: bit widths, method knobs and per-layer rules over diffusers module names."""

    w_bits: int = 4
    """Weight bits of the body layers."""
    a_bits: int = 4
    """Activation bits of the body layers."""
    end_bits: int = 8
    """Bits of the input / output layers and timestep-embedding linears (the papers keep these at 8)."""
    rotation: Rotation = "single"
    """Default rotation of quantized layers (HQ-DM: single)."""
    block: int | Literal["full", "auto"] = "auto"
    """Default Hadamard block size (a supported order dividing every rotated width), 'full', or 'auto': 32 (HQ-DM),
    except 16 for single-rotation layers with weights of at most 4 bits, whose fold then provably runs as one int8
    GEMM instead of two (see `auto_block`; docs/BENCHMARKS.md "W4 single-rotation fold")."""
    center: Center = "none"
    """Default centering (HadaNorm: dynamic)."""
    normalize: bool = False
    """Default HadaNorm σ scaling (needs rotation='double')."""
    correction_bits: int | Literal["float"] = 8
    """Bits of the centering-correction weight copy."""
    a_dynamic: bool = False
    """Dynamic per-token activation scales instead of static per-timestep tables."""
    a_symmetric: bool = True
    """Symmetric activation quantizers."""
    w_granularity: Granularity = "channel"
    """Weight scale granularity."""
    w_group_size: int | None = None
    """Weight group size with w_granularity='group'."""
    w_narrow_range: bool = False
    """Symmetric narrow-range weights [-(2^(b-1) - 1), 2^(b-1) - 1] (e.g. [-7, 7]) in every quantized layer."""
    timestep_buckets: int = 25
    """Entries of each per-timestep activation-scale table."""
    num_train_timesteps: int = 1000
    """Timestep range the buckets divide (the noise scheduler's num_train_timesteps)."""
    family: str = "auto"
    """Adapter of the model family: auto (detect from the class), dit, unet, unet_cond, sd3, flux, sana, pixart,
    generic, or the name of an adapter registered with hqdm.register_adapter."""
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    """Per-layer overrides, applied after the family defaults, in order."""

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "end_bits"):
            _check_bits(name, getattr(self, name))
        _check_choice("rotation", self.rotation, ROTATIONS)
        _check_choice("center", self.center, CENTERS)
        if self.family not in FAMILIES:
            from hqdm.adapters import ADAPTERS

            _check_choice("family", self.family, ("auto", *ADAPTERS))  # built-in, or registered with hqdm
        _check_choice("w_granularity", self.w_granularity, ("tensor", "channel", "group"))
        if self.block not in ("full", "auto") and (isinstance(self.block, bool) or not isinstance(self.block, int)
                                                   or self.block < 1):
            raise ValueError(f"block={self.block!r} must be a positive integer Hadamard order, 'full' or 'auto'.")
        if not isinstance(self.w_narrow_range, bool):
            raise ValueError(f"w_narrow_range={self.w_narrow_range!r} must be True or False.")
        if self.normalize and self.rotation != "double":
            raise ValueError(
                f"normalize=True needs rotation='double' (got {self.rotation!r}); HadaNorm is "
                "rotation='double', center='dynamic', normalize=True."
            )
        if self.timestep_buckets < 1 or self.num_train_timesteps < self.timestep_buckets:
            raise ValueError(
                f"timestep_buckets={self.timestep_buckets} must be in [1, num_train_timesteps="
                f"{self.num_train_timesteps}]."
            )
        object.__setattr__(self, "rules", tuple(Rule(**r) if isinstance(r, dict) else r for r in self.rules))

    def layer(self, bits_w: int, bits_a: int) -> LayerQuantConfig:
        """The default layer config at the given weight / activation bits (block='auto' resolved for them)."""
        w_group = self.w_group_size if self.w_granularity == "group" else None
        auto = self.block == "auto"
        return resolve_auto_block(LayerQuantConfig(
            w=weight_spec(bits_w, self.w_granularity, w_group, self.w_narrow_range),
            a=QuantizerSpec(
                bits=bits_a,
                symmetric=self.a_symmetric,
                granularity="token" if self.a_dynamic else "tensor",
                dynamic=self.a_dynamic,
                timestep_buckets=1 if self.a_dynamic else self.timestep_buckets,
            ),
            rotation=self.rotation,
            block=DEFAULT_BLOCK if auto else self.block,
            center=self.center,
            normalize=self.normalize,
            correction_bits=self.correction_bits,
            auto_block=auto,
        ))

    def with_rules(self, *rules: Rule) -> QuantConfig:
        return replace(self, rules=self.rules + tuple(rules))


PRESETS: dict[str, dict] = {
    "hqdm": dict(rotation="single", center="none", normalize=False),
    "hadanorm": dict(rotation="double", center="dynamic", normalize=True),
    "none": dict(rotation="none", center="none", normalize=False),
}
"""Method presets: HQ-DM (single Hadamard), HadaNorm (center + σ + double Hadamard), plain fake quantization."""


def apply_rule(cfg: LayerQuantConfig | None, rule: Rule, base: QuantConfig) -> LayerQuantConfig | None:
    """Layer config after one matching rule; None means 'keep in floating point'."""
    if rule.skip:
        return None
    if cfg is None:
        if rule.skip is False or rule.w_bits is not None or rule.a_bits is not None:
            cfg = base.layer(base.w_bits, base.a_bits)
        else:
            return None
    w, a = cfg.w, cfg.a
    if w is not None and (rule.w_bits is not None or rule.w_granularity is not None or rule.w_narrow_range is not None):
        gran = rule.w_granularity or w.granularity
        group = rule.w_group_size if rule.w_group_size is not None else (w.group_size if gran == "group" else None)
        narrow = w.narrow_range if rule.w_narrow_range is None else rule.w_narrow_range
        w = replace(w, bits=rule.w_bits or w.bits, granularity=gran, group_size=group, narrow_range=narrow)
    if a is not None and (rule.a_bits is not None or rule.a_dynamic is not None or rule.a_symmetric is not None):
        dyn = a.dynamic if rule.a_dynamic is None else rule.a_dynamic
        a = replace(
            a,
            bits=rule.a_bits or a.bits,
            symmetric=a.symmetric if rule.a_symmetric is None else rule.a_symmetric,
            dynamic=dyn,
            granularity="token" if dyn else "tensor",
            timestep_buckets=1 if dyn else base.timestep_buckets,
        )
    knobs = {k: getattr(rule, k) for k in ("rotation", "block", "center", "normalize", "correction_bits")}
    cfg = replace(cfg, w=w, a=a, **{k: v for k, v in knobs.items() if v is not None})
    return resolve_auto_block(replace(cfg, auto_block=False) if rule.block is not None else cfg)


DEFAULT_BLOCK = 32
"""HQ-DM's Hadamard block: what block='auto' gives every layer whose fold does not need a smaller one."""
AUTO_BLOCKS = (32, 16)
"""Blocks block='auto' tries for a single-rotation layer, largest first: the largest whose fold fits one digit."""


def auto_block(w: QuantizerSpec | None, rotation: Rotation) -> int:
    """The Hadamard block QuantConfig(block='auto') gives a layer with weight spec `w` and `rotation`.

    rotation='single' folds Rᵀ into the integer weight, W_int·H_raw; the largest block of AUTO_BLOCKS whose fold
    provably stays in int8 for every weight in [qmin, qmax] (`hqdm.qlayer.fold_parts`, no random signs: a
    QuantConfig never sets them) runs one int8 GEMM instead of two digits. That is 16 at 4 bits ([-8, 7]: folded
    entries in [-128, 120]; [-7, 7]: ±112), 32 at 3 bits and below; at 5 to 8 bits no block of AUTO_BLOCKS fits,
    so those layers keep 32 and two digits (rotation='double' or 'none' run one GEMM). Everything else: 32.
    """
    if rotation != "single" or w is None or not w.symmetric:
        return DEFAULT_BLOCK
    fits = [n for n in AUTO_BLOCKS if fold_parts(w.qmin, w.qmax, HadamardSpec(n, n)) == 1]
    return fits[0] if fits else DEFAULT_BLOCK


def resolve_auto_block(cfg: LayerQuantConfig | None) -> LayerQuantConfig | None:
    """`cfg` with its block re-picked by `auto_block` where it was chosen automatically (cfg.auto_block)."""
    if cfg is None or not cfg.auto_block:
        return cfg
    block = auto_block(cfg.w, cfg.rotation)
    return cfg if block == cfg.block else replace(cfg, block=block)
