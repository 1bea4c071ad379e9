"""diffusers FluxTransformer2DModel: double- and single-stream MMDiT on 2×2-packed latents, time σ ∈ [0, 1].

    x (B, C, H, W) ──pack 2×2──▶ (B, H/2·W/2, 4C) + img_ids ──model(..., txt_ids, guidance)──▶ unpack ──▶ (B, C, H, W)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hqdm.adapters.base import Adapter, expand_timesteps, model_output, text_inputs
from hqdm.adapters.sd3 import MMDIT_BLOCKS
from hqdm.call import CallSpec

DEFAULT_GUIDANCE = 3.5
"""Guidance-embedding value of guidance-distilled FLUX (FluxPipeline's default) when a call passes none."""


def pack(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C) tokens of 2×2 patches, as FluxPipeline packs latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of `pack`: (B, H/2·W/2, 4C) -> (B, C, H, W)."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """(H/2·W/2, 3) rotary position ids (0, row, column) of the packed tokens."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] += torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class FluxAdapter(Adapter):
    """FLUX.1: the call packs latents, adds rotary ids, text (T5 tokens + pooled CLIP) and the guidance embedding."""

    def predict(self, model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None = None,
                context: Tensor | None = None, pooled: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        cfg, (b, _, h, w) = model.config, x.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX packs 2×2 latent patches; height and width must be even, got {(h, w)}.")
        context, pooled = text_inputs(x, context, pooled, cfg.joint_attention_dim, cfg.pooled_projection_dim)
        if cfg.guidance_embeds:
            guidance = torch.full((b,), DEFAULT_GUIDANCE, device=x.device) if guidance is None else guidance
            guidance = expand_timesteps(guidance, b, x.device).to(x.dtype)
        else:
            guidance = None
        out = model(hidden_states=pack(x), timestep=expand_timesteps(t, b, x.device).to(x.dtype),
                    encoder_hidden_states=context, pooled_projections=pooled, guidance=guidance,
                    img_ids=image_ids(h, w, x.device, x.dtype),
                    txt_ids=x.new_zeros(context.shape[1], 3))
        return unpack(model_output(out), h, w)

    def input_shape(self, model: nn.Module) -> tuple[int, ...]:
        if self.call.input_shape is None:
            raise ValueError("FLUX configs carry no sample size; declare the latent shape, e.g. "
                             "CallSpec(..., input_shape=(16, 128, 128)) (YAML `call: {input_shape: [16, 128, 128]}`).")
        return self.call.input_shape


FLUX = FluxAdapter(
    name="flux",
    call=CallSpec(sample="hidden_states", timestep="timestep", context="encoder_hidden_states",
                  pooled="pooled_projections", guidance="guidance", timesteps="continuous", time_max=1.0,
                  prediction="flow", path="flow"),
    end_layers=("x_embedder", "time_text_embed.*", "context_embedder", "norm_out.linear", "proj_out"),
    block_types=(("single_transformer_blocks.*.proj_mlp", "fc1"), ("single_transformer_blocks.*.proj_out", "fc2"),
                 *MMDIT_BLOCKS),
)
