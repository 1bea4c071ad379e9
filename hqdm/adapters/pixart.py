"""diffusers PixArtTransformer2DModel (PixArt-α / Σ): DiT with cross-attention on T5 tokens, integer DDPM time."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hqdm.adapters.base import Adapter, expand_timesteps, first_channels, text_inputs
from hqdm.call import CallSpec

VAE_SCALE = 8
"""Pixels per latent cell of PixArt's VAE: the resolution conditioning of PixArt-α 1024 is given in pixels."""


class PixArtAdapter(Adapter):
    """PixArt: text through `encoder_hidden_states` (B, L, caption_channels); learned-variance channels dropped."""

    def predict(self, model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None = None,
                context: Tensor | None = None, pooled: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        cfg = model.config
        context, _ = text_inputs(x, context, None, cfg.caption_channels or cfg.cross_attention_dim, None)
        args, kwargs = self.call.arguments(x, expand_timesteps(t, x.shape[0], x.device), None, context)
        out = model(*args, **kwargs, added_cond_kwargs=self._added_conditions(model, x)).sample
        return first_channels(out, x)

    @staticmethod
    def _added_conditions(model: nn.Module, x: Tensor) -> dict:
        """PixArt-α 1024 conditions on (height, width) in pixels and the aspect ratio; other PixArts on nothing."""
        if not model.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        b, _, h, w = x.shape
        size = torch.tensor([h * VAE_SCALE, w * VAE_SCALE], device=x.device, dtype=x.dtype).expand(b, 2)
        return {"resolution": size, "aspect_ratio": torch.full((b, 1), h / w, device=x.device, dtype=x.dtype)}


PIXART = PixArtAdapter(
    name="pixart",
    call=CallSpec(sample="hidden_states", timestep="timestep", context="encoder_hidden_states"),
    end_layers=("pos_embed.proj", "adaln_single.*", "caption_projection.*", "proj_out"),
    unrotated=("pos_embed.proj",),
    dynamic_layers=("adaln_single.emb.resolution_embedder.*", "adaln_single.emb.aspect_ratio_embedder.*"),
    block_types=(
        ("adaln_single.emb.*", "temb"),
        ("adaln_single.linear", "adaLN"),
        ("caption_projection.*", "text_embed"),
        ("*attn1.to_[qkv]", "qkv"),
        ("*attn2.to_q", "cross_q"),
        ("*attn2.to_[kv]", "cross_kv"),
        ("*attn*.to_out.0", "attn_out"),
        ("*ff.net.0.proj", "fc1"),
        ("*ff.net.2", "fc2"),
        ("pos_embed.proj", "patch_embed"),
        ("proj_out", "final"),
    ),
)
