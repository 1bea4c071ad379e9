"""diffusers SanaTransformer2DModel: linear-attention DiT with a GLU-MBConv feed-forward, flow time σ·1000."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hqdm.adapters.base import Adapter, expand_timesteps, text_inputs
from hqdm.call import CallSpec

SANA_TIME_MAX = 1000.0
"""Upper end of Sana's time with timestep_scale = 1 (flow-sigma timesteps σ·1000)."""
DEFAULT_GUIDANCE = 4.5
"""Guidance-embedding value of guidance-distilled Sana (SanaSprintPipeline's default) when a call passes none."""


class SanaAdapter(Adapter):
    """Sana: text through `encoder_hidden_states` (B, L, caption_channels); the depthwise conv stays in float.

    The model's time is what SanaPipeline passes: the scheduler's σ·1000 times `timestep_scale`; hqdm calls the
    model with the time it is given, so a model with timestep_scale ≠ 1 declares time_max = 1000·timestep_scale.
    """

    def setup_student(self, model: nn.Module) -> list[str]:
        scale = model.config.timestep_scale
        if scale != 1 and self.call.time_max == SANA_TIME_MAX:
            raise ValueError(
                f"This Sana has timestep_scale={scale}: its pipeline passes σ·1000·{scale}. Declare that range, "
                f"prepare(model, config, call=dataclasses.replace(SANA.call, time_max={SANA_TIME_MAX * scale})), "
                "and give it timesteps already scaled."
            )
        return []

    def predict(self, model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None = None,
                context: Tensor | None = None, pooled: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        cfg = model.config
        context, _ = text_inputs(x, context, None, cfg.caption_channels, None)
        if cfg.guidance_embeds:
            guidance = torch.full((x.shape[0],), DEFAULT_GUIDANCE, device=x.device) if guidance is None else guidance
            guidance = expand_timesteps(guidance, x.shape[0], x.device).to(x.dtype)
        else:
            guidance = None
        return super().predict(model, x, t, None, context, None, guidance)


SANA = SanaAdapter(
    name="sana",
    call=CallSpec(sample="hidden_states", timestep="timestep", context="encoder_hidden_states",
                  guidance="guidance", timesteps="continuous", time_max=SANA_TIME_MAX, prediction="flow", path="flow"),
    end_layers=("patch_embed.proj", "time_embed.*", "caption_projection.*", "proj_out"),
    unrotated=("patch_embed.proj",),
    float_layers=("*.ff.conv_depth",),
    block_types=(
        ("time_embed.emb.*", "temb"),
        ("time_embed.linear", "adaLN"),
        ("caption_projection.*", "text_embed"),
        ("*attn1.to_[qkv]", "qkv"),
        ("*attn2.to_q", "cross_q"),
        ("*attn2.to_[kv]", "cross_kv"),
        ("*attn*.to_out.0", "attn_out"),
        ("*ff.conv_inverted", "fc1"),
        ("*ff.conv_point", "fc2"),
        ("patch_embed.proj", "patch_embed"),
        ("proj_out", "final"),
    ),
)
