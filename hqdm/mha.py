"""QuantMultiheadAttention: nn.MultiheadAttention with its four projections as (Quant)Linear modules.

nn.MultiheadAttention applies its input projection functionally from `in_proj_weight` (or q/k/v_proj_weight)
inside `F.multi_head_attention_forward`, and reads `out_proj.weight` directly, so swapping its Linear children
would leave it silently unquantized. This module re-implements the forward around real submodules:

    query ─ q_proj ─┐
    key   ─ k_proj ─┼─ heads ─ softmax(q·kᵀ/√d + mask) · v ─ merge heads ─ out_proj ─▶ out
    value ─ v_proj ─┘

Only the projections are fake-quantized; the attention matmuls stay in floating point. Projections run on
batch-first (B, N, C) tensors whatever `batch_first` says, so dynamic centering and per-sample timestep scales
see one sample per leading index, as they do in every other QuantLinear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hqdm.config import LayerQuantConfig
from hqdm.layers import QuantLinear

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""Submodule names of the four projections, also the keys of a per-projection config dict."""
PROJECTION_BLOCKS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "out_proj": "attn_out"}
"""Block type of each projection in reports (unless an adapter's block_types say otherwise)."""


class QuantMultiheadAttention(nn.Module):
    """Drop-in nn.MultiheadAttention whose q/k/v/out projections are QuantLinear (or plain nn.Linear) modules."""

    in_proj_weight = None
    in_proj_bias = None
    """No packed input projection: torch's fused paths (TransformerEncoderLayer / TransformerEncoder in eval) test
    `in_proj_bias is None` and then call this module instead of reading raw weights."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, out_proj: nn.Linear, num_heads: int,
                 dropout: float = 0.0, batch_first: bool = False, bias_k: Tensor | None = None,
                 bias_v: Tensor | None = None, add_zero_attn: bool = False) -> None:
        """Args:
        q_proj, k_proj, v_proj: input projections, (embed_dim, embed_dim | kdim | vdim) weights.
        out_proj: output projection, (embed_dim, embed_dim) weight.
        num_heads: attention heads; must divide embed_dim.
        dropout: dropout probability on the attention weights (training only).
        batch_first: inputs and output are (B, N, C) instead of (N, B, C).
        bias_k, bias_v: (1, 1, embed_dim) learned key / value appended to every sequence (add_bias_kv).
        add_zero_attn: append a zero key / value per head after the projections.
        """
        super().__init__()
        self.embed_dim = q_proj.out_features
        self.kdim, self.vdim = k_proj.in_features, v_proj.in_features
        _check_dims(q_proj, k_proj, v_proj, out_proj, num_heads)
        if (bias_k is None) != (bias_v is None):
            raise ValueError("bias_k and bias_v come together (add_bias_kv=True); got only one of them.")
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.num_heads, self.head_dim = num_heads, self.embed_dim // num_heads
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.bias_k = None if bias_k is None else nn.Parameter(bias_k.detach().clone())
        self.bias_v = None if bias_v is None else nn.Parameter(bias_v.detach().clone())

    @property
    def _qkv_same_embed_dim(self) -> bool:
        """As in nn.MultiheadAttention: key and value widths equal embed_dim (read by torch's fast-path checks)."""
        return self.kdim == self.embed_dim and self.vdim == self.embed_dim

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}, add_bias_kv={self.bias_k is not None}, "
                f"add_zero_attn={self.add_zero_attn}")

    # ---- conversion -----------------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, config: LayerQuantConfig | dict[str, LayerQuantConfig | None],
                   num_train_timesteps: int = 1000) -> QuantMultiheadAttention:
        """Swap in: splits the packed (or separate) input projection into q/k/v Linears and quantizes all four.

        Args:
            mha: the float module; its weights are copied, not shared.
            config: one LayerQuantConfig for all four projections, or a dict keyed by a subset of
                "q_proj", "k_proj", "v_proj", "out_proj"; a value of None (or a missing key) keeps that
                projection a plain nn.Linear.
            num_train_timesteps: timestep range of per-timestep activation scale tables.

        Raises:
            ValueError: unknown keys in `config`, or a projection width the config's Hadamard cannot rotate.
        """
        configs = _per_projection(config)
        floats = dict(zip(PROJECTIONS, (*_input_projections(mha), _copy_linear(mha.out_proj))))
        projs = {
            name: lin if configs[name] is None else QuantLinear.from_float(lin, configs[name], num_train_timesteps)
            for name, lin in floats.items()
        }
        q = cls(**projs, num_heads=mha.num_heads, dropout=mha.dropout, batch_first=mha.batch_first,
                bias_k=mha.bias_k, bias_v=mha.bias_v, add_zero_attn=mha.add_zero_attn)
        return q.train(mha.training)

    def to_float(self) -> nn.MultiheadAttention:
        """An equivalent nn.MultiheadAttention with the weights in their own basis (quantization dropped)."""
        linears = [_float_linear(getattr(self, name)) for name in PROJECTIONS]
        has_bias = linears[0].bias is not None
        if any((lin.bias is not None) != has_bias for lin in linears):
            raise ValueError(
                "nn.MultiheadAttention has one `bias` flag for all four projections, but these projections mix "
                f"biased and unbiased Linears ({[lin.bias is not None for lin in linears]}); cannot convert."
            )
        w = self.q_proj.weight
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, has_bias, self.bias_k is not None,
                                    self.add_zero_attn, self.kdim, self.vdim, self.batch_first,
                                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            q, k, v, out = linears
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            else:
                for p, lin in zip((mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight), (q, k, v)):
                    p.copy_(lin.weight)
            if has_bias:
                mha.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
                mha.out_proj.bias.copy_(out.bias)
            mha.out_proj.weight.copy_(out.weight)
            if self.bias_k is not None:
                mha.bias_k.copy_(self.bias_k)
                mha.bias_v.copy_(self.bias_v)
        return mha.train(self.training)

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """Same arguments, semantics and returns as nn.MultiheadAttention.forward.

        Returns:
            (out, weights): out (L, B, E), (B, L, E) with batch_first, or (L, E) unbatched; weights (B, L, S)
            averaged over heads, (B, H, L, S) with average_attn_weights=False, without B when unbatched,
            or None with need_weights=False.
        """
        batched = _check_inputs(query, key, value)
        query, key, value = (_batch_first(x, batched, self.batch_first) for x in (query, key, value))
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        bsz, tgt_len, src_len = query.shape[0], query.shape[1], key.shape[1]
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "is_causal=True is only a hint and needs attn_mask as well (as in nn.MultiheadAttention); pass "
                "attn_mask=nn.Transformer.generate_square_subsequent_mask(L)."
            )
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)  # (B, L, E), (B, S, E), (B, S, E)
        mask = self._merged_mask(attn_mask, key_padding_mask, bsz, tgt_len, src_len, query.dtype)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)  # (B, H, N, D)
        k, v, mask = self._extra_keys(k, v, mask)
        causal_hint = is_causal and key_padding_mask is None and not need_weights and k.shape[2] == src_len
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            attn, weights = attention_reference(q, k, v, mask, dropout_p, self.training)
        else:
            attn, weights = F.scaled_dot_product_attention(q, k, v, None if causal_hint else mask, dropout_p,
                                                           is_causal=causal_hint), None
        out = self.out_proj(attn.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim))  # (B, L, E)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)  # (B, L, S)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def _merged_mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, bsz: int, tgt_len: int,
                     src_len: int, dtype: torch.dtype) -> Tensor | None:
        """attn_mask and key_padding_mask as one additive float mask, (1 | B, 1 | H, L, S) or None."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, "attn_mask", dtype)
            if mask.shape == (tgt_len, src_len):
                mask = mask[None, None]  # (1, 1, L, S)
            elif mask.shape == (bsz * self.num_heads, tgt_len, src_len):
                mask = mask.view(bsz, self.num_heads, tgt_len, src_len)
            else:
                raise RuntimeError(
                    f"attn_mask has shape {tuple(attn_mask.shape)}; expected (L, S) = {(tgt_len, src_len)} or "
                    f"(B·num_heads, L, S) = {(bsz * self.num_heads, tgt_len, src_len)}."
                )
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise RuntimeError(
                    f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected (B, S) = {(bsz, src_len)} "
                    "(or (S,) for unbatched input)."
                )
            kpm = _additive(key_padding_mask, "key_padding_mask", dtype)[:, None, None, :]  # (B, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        return mask

    def _extra_keys(self, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append bias_k / bias_v (add_bias_kv) and a zero key / value (add_zero_attn), padding the mask to match."""
        b, extra = k.shape[0], []
        if self.bias_k is not None:
            extra.append(tuple(self._split_heads(p.expand(b, 1, -1)) for p in (self.bias_k, self.bias_v)))
        if self.add_zero_attn:
            zeros = k.new_zeros(k.shape[0], self.num_heads, 1, self.head_dim)
            extra.append((zeros, zeros))
        for ek, ev in extra:
            k, v = torch.cat([k, ek.to(k.dtype)], dim=2), torch.cat([v, ev.to(v.dtype)], dim=2)  # (B, H, S+1, D)
            mask = None if mask is None else F.pad(mask, (0, 1))
        return k, v, mask


def reference_projections(mha: nn.MultiheadAttention, args: tuple, kwargs: dict, output) -> dict[str, Tensor]:
    """What the four projections of a float nn.MultiheadAttention output during one call, in the layout of
    QuantMultiheadAttention's projections ((B, N, E), batch first; (1, N, E) unbatched): for per-layer reports.

    Args:
        mha: the float module.
        args, kwargs: the call's arguments (query, key, value, ...), as a forward hook with kwargs sees them.
        output: the call's return value ((out, weights)); out is the output projection's output.
    """
    names = ("query", "key", "value")
    inputs = [args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names)]
    batched = inputs[0].dim() == 3
    q, k, v = (_batch_first(x, batched, mha.batch_first) for x in inputs)
    out = {name: lin(x) for name, lin, x in zip(PROJECTIONS, _input_projections(mha), (q, k, v))}
    out["out_proj"] = _batch_first(output[0], batched, mha.batch_first)
    return out


def split_attention(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace nn.MultiheadAttention modules of `model` by equal QuantMultiheadAttention with plain nn.Linear
    projections (the module tree a prepared student has, e.g. for loading integer projections into it).

    Args:
        model: any nn.Module; changed in place.
        names: module names to replace; None: every nn.MultiheadAttention.

    Returns:
        The names replaced.

    Raises:
        ValueError: a name that is not an nn.MultiheadAttention of `model`.
    """
    found = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name in names if names is not None else found:
        if name not in found:
            raise ValueError(f"{name!r} is not an nn.MultiheadAttention of {type(model).__name__}; its attention "
                             f"modules are {found}.")
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, QuantMultiheadAttention.from_float(getattr(owner, child), {}))
    return list(names if names is not None else found)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float = 0.0,
                        training: bool = False) -> tuple[Tensor, Tensor]:
    """softmax(q·kᵀ/√d + mask) · v with explicit weights: ((B, H, L, D) output, (B, H, L, S) weights after dropout)."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # (B, H, L, S)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=training)
    return weights @ v, weights


# ---- helpers ------------------------------------------------------------------------------------------------
def _check_dims(q: nn.Linear, k: nn.Linear, v: nn.Linear, out: nn.Linear, num_heads: int) -> None:
    e = q.out_features
    if (q.in_features, k.out_features, v.out_features, out.in_features, out.out_features) != (e,) * 5:
        raise ValueError(
            f"Projection shapes do not form a MultiheadAttention: q {tuple(q.weight.shape)}, k "
            f"{tuple(k.weight.shape)}, v {tuple(v.weight.shape)}, out {tuple(out.weight.shape)}; all must "
            f"output embed_dim={e} and q / out must take embed_dim inputs."
        )
    if num_heads < 1 or e % num_heads:
        raise ValueError(f"num_heads={num_heads} must be a positive divisor of embed_dim={e}.")


def _per_projection(config: LayerQuantConfig | dict[str, LayerQuantConfig | None]) -> dict:
    if isinstance(config, LayerQuantConfig):
        return dict.fromkeys(PROJECTIONS, config)
    if not isinstance(config, dict):
        raise ValueError(f"config must be a LayerQuantConfig or a dict keyed by {list(PROJECTIONS)}, "
                         f"got {type(config).__name__}.")
    unknown = sorted(set(config) - set(PROJECTIONS))
    if unknown:
        raise ValueError(f"config keys {unknown} are not projections of MultiheadAttention; use keys from "
                         f"{list(PROJECTIONS)} (None or a missing key keeps that projection in floating point).")
    return {name: config.get(name) for name in PROJECTIONS}


def _input_projections(mha: nn.MultiheadAttention) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """q / k / v as nn.Linear copies, from the packed in_proj_weight or the separate q/k/v_proj_weight."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.chunk(3)
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
    linears = []
    for w, b in zip(weights, biases):
        lin = nn.Linear(w.shape[1], e, b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        linears.append(lin.train(mha.training))
    return tuple(linears)


def _copy_linear(mod: nn.Linear) -> nn.Linear:
    """A plain nn.Linear with a copy of `mod`'s parameters (drops subclasses such as NonDynamicallyQuantizable)."""
    lin = nn.Linear(mod.in_features, mod.out_features, mod.bias is not None, device=mod.weight.device,
                    dtype=mod.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(mod.weight)
        if mod.bias is not None:
            lin.bias.copy_(mod.bias)
    return lin.train(mod.training)


def _float_linear(mod: nn.Linear) -> nn.Linear:
    return mod.to_float() if isinstance(mod, QuantLinear) else mod


def _check_inputs(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """True for batched (3-D) inputs, False for unbatched (2-D) ones."""
    if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(
            f"query, key and value must all be 3-D (batched) or all 2-D (unbatched); got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}."
        )
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree on all but the last axis.")
    return query.dim() == 3


def _batch_first(x: Tensor, batched: bool, batch_first: bool) -> Tensor:
    if not batched:
        return x.unsqueeze(0)  # (1, N, C)
    return x if batch_first else x.transpose(0, 1)  # (B, N, C)


def _additive(mask: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = masked out) as 0 / −inf, a float mask as is."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise ValueError(f"{name} has dtype {mask.dtype}; use a bool mask (True = masked out) or a float additive one.")
    return mask.to(dtype)
