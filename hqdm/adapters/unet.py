"""diffusers UNet2DModel and UNet2DConditionModel (latent-diffusion / Stable-Diffusion-style UNets)."""

from __future__ import annotations

from torch import Tensor, nn

from hqdm.adapters.base import Adapter, first_channels
from hqdm.call import CallSpec

_UNET_BLOCKS = (
    ("time_embedding.*", "temb"),
    ("*time_emb_proj", "temb_proj"),
    ("*.to_q", "qkv"),
    ("*.to_k", "qkv"),
    ("*.to_v", "qkv"),
    ("*.to_out.0", "attn_out"),
    ("*ff.net.0.proj", "fc1"),
    ("*ff.net.2", "fc2"),
    ("*proj_in", "proj_in"),
    ("*proj_out", "proj_out"),
    ("*conv_shortcut", "shortcut"),
    ("*downsamplers.*", "downsample"),
    ("*upsamplers.*", "upsample"),
    ("conv_in", "conv_in"),
    ("conv_out", "conv_out"),
)


class UNetAdapter(Adapter):
    """UNet2DModel: class labels through `class_embedding` (num_class_embeds = classes + 1, the last one null)."""

    def null_class(self, model: nn.Module) -> int | None:
        n = getattr(model.config, "num_class_embeds", None)
        return None if not n else n - 1

    def predict(self, model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None = None,
                context: Tensor | None = None, pooled: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        labels = y if getattr(model.config, "num_class_embeds", None) else None
        return first_channels(super().predict(model, x, t, labels, context), x)


class UNetConditionAdapter(UNetAdapter):
    """UNet2DConditionModel: cross-attention on `context` (text embeddings); one zero token when none is given."""

    def predict(self, model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None = None,
                context: Tensor | None = None, pooled: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        if context is None:
            context = x.new_zeros(x.shape[0], 1, model.config.cross_attention_dim)
        return super().predict(model, x, t, y, context)


_ENDS = ("conv_in", "conv_out", "time_embedding.*", "add_embedding.*", "class_embedding.*")
UNET = UNetAdapter(name="unet", call=CallSpec(sample=0, timestep=1, class_labels="class_labels"), end_layers=_ENDS,
                   unrotated=("conv_in",), block_types=_UNET_BLOCKS)
UNET_COND = UNetConditionAdapter(
    name="unet_cond", call=CallSpec(sample=0, timestep=1, class_labels="class_labels",
                                    context="encoder_hidden_states"),
    end_layers=_ENDS, unrotated=("conv_in",), block_types=_UNET_BLOCKS)
