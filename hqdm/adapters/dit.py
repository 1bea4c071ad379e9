"""diffusers DiTTransformer2DModel: class-conditional DiT with adaLN-Zero blocks."""

from __future__ import annotations

from torch import Tensor, nn

from hqdm.adapters.base import Adapter, first_channels
from hqdm.call import CallSpec


def zero_label_dropout(model: nn.Module) -> list[str]:
    """diffusers drops labels inside every block in train mode; the trainer drops them once per step instead."""
    notes = []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "LabelEmbedding" and getattr(mod, "dropout_prob", 0) > 0:
            notes.append(f"{name}: label dropout {mod.dropout_prob} -> 0 (CFG dropout happens in the step)")
            mod.dropout_prob = 0.0
    return notes


class DiTAdapter(Adapter):
    """DiT: patch-embed conv and final projections at 8 bits; adaLN, qkv, attention-out and MLP at body bits."""

    def setup_student(self, model: nn.Module) -> list[str]:
        return zero_label_dropout(model)

    def null_class(self, model: nn.Module) -> int | None:
        for mod in model.modules():
            if type(mod).__name__ == "LabelEmbedding":
                return mod.num_classes if mod.embedding_table.num_embeddings > mod.num_classes else None
        return None

    def predict(self, model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None = None,
                context: Tensor | None = None, pooled: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        return first_channels(super().predict(model, x, t, y), x)


DIT = DiTAdapter(
    name="dit",
    call=CallSpec(sample=0, timestep="timestep", class_labels="class_labels"),
    end_layers=("pos_embed.proj", "proj_out_1", "proj_out_2", "*timestep_embedder.linear_*"),
    unrotated=("pos_embed.proj",),
    block_types=(
        ("*timestep_embedder.*", "temb"),
        ("*norm1.linear", "adaLN"),
        ("*attn*.to_q", "qkv"),
        ("*attn*.to_k", "qkv"),
        ("*attn*.to_v", "qkv"),
        ("*attn*.to_out.0", "attn_out"),
        ("*ff.net.0.proj", "fc1"),
        ("*ff.net.2", "fc2"),
        ("pos_embed.proj", "patch_embed"),
        ("proj_out_*", "final"),
    ),
)
