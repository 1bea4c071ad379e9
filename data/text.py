"""Text conditioning from cached prompt embeddings: the text encoders run once, elsewhere; hqdm reads tensors.

A prompt-embedding file is a ``.safetensors`` file of float tensors:

    context       (N, L, D)  per-prompt token embeddings (encoder_hidden_states)          required
    pooled        (N, D')    pooled embeddings (SD3 / FLUX pooled_projections)            optional
    null_context  (1, L, D)  the empty prompt's embeddings: the unconditional half of CFG  optional
    null_pooled   (1, D')    its pooled embeddings                                         optional (with pooled)

``PromptEmbeddingDataModule`` adds images or latents (``x`` (N, C, H, W), and ``y`` (N,) if any) for real-data runs:
batches ``{"x", "y", "context"[, "pooled"]}``. Data-free runs give the file to
``TeacherTrajectoryDataModule(prompt_embeds=...)``: the teacher samples each trajectory with a drawn prompt.
Nothing is unpickled: safetensors holds tensors only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from hqdm.data.base import SplitDataModule, TensorRows, split_indices

KEYS = ("context", "pooled", "null_context", "null_pooled")


@dataclass(frozen=True, eq=False)
class PromptEmbeds:
    """Cached prompt embeddings (see the module docstring) and the SHA-256 of the file they came from."""

    context: Tensor
    pooled: Tensor | None = None
    null_context: Tensor | None = None
    null_pooled: Tensor | None = None
    digest: str = ""

    def __len__(self) -> int:
        return len(self.context)

    def cond(self, index: Tensor) -> dict[str, Tensor]:
        """{"context": (B, L, D)[, "pooled": (B, D')]} of the prompts at `index` (B,)."""
        out = {"context": self.context[index]}
        if self.pooled is not None:
            out["pooled"] = self.pooled[index]
        return out

    def null_cond(self, batch: int) -> dict[str, Tensor] | None:
        """The empty prompt's embeddings repeated `batch` times, or None when the file has none."""
        if self.null_context is None:
            return None
        out = {"context": self.null_context.expand(batch, -1, -1)}
        if self.pooled is not None:
            out["pooled"] = self.null_pooled.expand(batch, -1)
        return out


def load_prompt_embeds(path: str, extra: tuple[str, ...] = ()) -> tuple[PromptEmbeds, dict[str, Tensor]]:
    """Read and check a prompt-embedding file; returns the embeddings and the `extra` tensors it also holds.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable safetensors file, unknown or missing keys, wrong ranks or lengths, non-finite.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from hqdm import safe_io

    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt_embeds={path!r} does not exist; write one with safetensors.torch.save_file"
                                "({'context': (N, L, D), ...}).")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"prompt_embeds={path!r} is not a readable safetensors file ({err}).") from err
    unknown = sorted(set(tensors) - set(KEYS) - set(extra))
    if unknown or "context" not in tensors:
        raise ValueError(f"prompt_embeds={path!r} holds {sorted(tensors)}; it needs 'context' (N, L, D) and may hold "
                         f"{[k for k in KEYS + extra if k != 'context']}, nothing else.")
    safe_io.check_finite(tensors, f"prompt_embeds={path!r}")
    e = {k: tensors[k].float() if k in KEYS else tensors[k] for k in tensors}
    n = len(e["context"])
    _rank(path, "context", e["context"], 3, n)
    if "pooled" in e:
        _rank(path, "pooled", e["pooled"], 2, n)
    if "null_context" in e:
        _rank(path, "null_context", e["null_context"], 3, 1)
        if e["null_context"].shape[1:] != e["context"].shape[1:]:
            raise ValueError(f"prompt_embeds={path!r}: null_context {tuple(e['null_context'].shape)} must be "
                             f"(1, L, D) like context {tuple(e['context'].shape)}.")
    if ("null_pooled" in e) != ("pooled" in e and "null_context" in e):
        raise ValueError(f"prompt_embeds={path!r}: with pooled and null_context, give null_pooled (1, D') too; "
                         "without them, none.")
    if "null_pooled" in e:
        _rank(path, "null_pooled", e["null_pooled"], 2, 1)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    embeds = PromptEmbeds(e["context"], e.get("pooled"), e.get("null_context"), e.get("null_pooled"), digest)
    return embeds, {k: e[k] for k in extra if k in e}


def _rank(path: str, key: str, t: Tensor, rank: int, n: int) -> None:
    if t.ndim != rank or len(t) != n:
        raise ValueError(f"prompt_embeds={path!r}: {key} has shape {tuple(t.shape)}; expected {rank} axes and "
                         f"{n} rows.")


class PromptEmbeddingDataModule(SplitDataModule):
    """Real data with cached prompt embeddings: one safetensors file with ``x`` (N, C, H, W) images or latents,
    ``context`` (N, L, D), and optionally ``pooled`` (N, D') and ``y`` (N,) class ids (default 0).

    Batches ``{"x", "y", "context"[, "pooled"]}``; DistillModule noises ``x`` and passes the embeddings to both
    models through their call (`CallSpec.context` / `pooled`).

    Args:
        path: the safetensors file.
        batch_size: rows per batch.
        val_fraction: share of rows held out for validation, in [0, 1).
        seed: seed of the split and of the train shuffle.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, path: str, batch_size: int = 16, val_fraction: float = 0.1, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.path = path
        self.num_classes: int | None = None

    def prepare_data(self) -> None:
        if not os.path.isfile(os.path.expanduser(self.path)):
            raise FileNotFoundError(f"path={self.path!r} does not exist; give a safetensors file with x and context.")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        embeds, extra = load_prompt_embeds(self.path, extra=("x", "y"))
        if "x" not in extra:
            raise ValueError(f"path={self.path!r} holds no 'x' (N, C, H, W): the images or latents of the prompts.")
        x = extra["x"].float()
        n = len(embeds)
        if x.ndim != 4 or len(x) != n:
            raise ValueError(f"path={self.path!r}: x has shape {tuple(x.shape)}; expected (N, C, H, W) with N={n}.")
        y = extra.get("y", torch.zeros(n, dtype=torch.long))
        if y.shape != (n,) or y.is_floating_point() or (y < 0).any():
            raise ValueError(f"path={self.path!r}: y must be (N,) = ({n},) class ids >= 0; got {tuple(y.shape)} "
                             f"{y.dtype}.")
        columns = {"x": x, "y": y.long(), **embeds.cond(torch.arange(n))}
        train, val = (torch.tensor(i, dtype=torch.long) for i in split_indices(n, self.val_fraction, self.seed))
        self.train_set, self.val_set = (TensorRows(**{k: v[i] for k, v in columns.items()}) for i in (train, val))
        self.num_classes = int(y.max()) + 1
