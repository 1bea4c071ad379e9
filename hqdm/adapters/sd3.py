"""diffusers SD3Transformer2DModel: MMDiT (joint image/text attention), flow matching with time σ·1000."""

from __future__ import annotations

from torch import Tensor, nn

from hqdm.adapters.base import Adapter, text_inputs
from hqdm.call import CallSpec

MMDIT_BLOCKS = (
    ("*timestep_embedder.*", "temb"),
    ("*guidance_embedder.*", "temb"),
    ("*text_embedder.*", "text_embed"),
    ("context_embedder", "text_embed"),
    ("*norm1.linear", "adaLN"),
    ("*norm1_context.linear", "adaLN"),
    ("*.norm.linear", "adaLN"),
    ("*attn.to_[qkv]", "qkv"),
    ("*attn.add_[qkv]_proj", "qkv_text"),
    ("*attn.to_out.0", "attn_out"),
    ("*attn.to_add_out", "attn_out_text"),
    ("*ff.net.0.proj", "fc1"),
    ("*ff.net.2", "fc2"),
    ("*ff_context.net.0.proj", "fc1_text"),
    ("*ff_context.net.2", "fc2_text"),
    ("pos_embed.proj", "patch_embed"),
    ("x_embedder", "patch_embed"),
    ("norm_out.linear", "final"),
    ("proj_out", "final"),
)
"""Block types shared by the MMDiT families (SD3, FLUX)."""


class SD3Adapter(Adapter):
    """SD3 / SD3.5: text through `encoder_hidden_states` (B, L, joint_attention_dim) and `pooled_projections`."""

    def predict(self, model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None = None,
                context: Tensor | None = None, pooled: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        cfg = model.config
        context, pooled = text_inputs(x, context, pooled, cfg.joint_attention_dim, cfg.pooled_projection_dim)
        return super().predict(model, x, t, None, context, pooled)


SD3 = SD3Adapter(
    name="sd3",
    call=CallSpec(sample="hidden_states", timestep="timestep", context="encoder_hidden_states",
                  pooled="pooled_projections", timesteps="continuous", time_max=1000.0, prediction="flow",
                  path="flow"),
    end_layers=("pos_embed.proj", "time_text_embed.*", "context_embedder", "norm_out.linear", "proj_out"),
    unrotated=("pos_embed.proj",),
    block_types=MMDIT_BLOCKS,
)
