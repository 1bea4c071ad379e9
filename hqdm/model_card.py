"""README.md model card of an export: what the folder holds, how it was made, how to run it, how faithful it is.

Written by `hqdm.export` from the manifest it has just written (bits per layer, sizes, parity) and the optional
`card` it was given (`hqdm export` passes the source model, the recipe, the run's last metrics and its command).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

CARD_FILE = "README.md"


def _bits(spec: dict | None) -> str:
    return "float" if spec is None else str(spec.get("bits"))


def layer_rows(manifest: dict) -> list[str]:
    """One markdown row per integer layer: weight / activation bits, storage, rotation, centering."""
    rows = ["| layer | kind | W bits | A bits | storage | rotation | center |", "|---|---|---|---|---|---|---|"]
    for name, r in manifest["layers"].items():
        cfg = r["config"]
        h = r.get("hadamard") or {}
        block = h.get('block', cfg['block'])
        rot = cfg['rotation'] if cfg['rotation'] == 'none' else f"{cfg['rotation']}, block {block}"
        center = cfg["center"] + (" + σ" if cfg["normalize"] else "")
        rows.append(f"| `{name}` | {r['kind']} | {_bits(cfg['w'])} | {_bits(cfg['a'])} | {r['weight']['storage']} "
                    f"| {rot} | {center} |")
    return rows


def bits_summary(manifest: dict) -> str:
    """'12 layers: W4A4 ×8, W8A8 ×4' over the integer layers."""
    counts = Counter(f"W{_bits(r['config']['w'])}A{_bits(r['config']['a'])}" for r in manifest["layers"].values())
    return f"{len(manifest['layers'])} integer layers: " + ", ".join(f"{k} ×{n}" for k, n in counts.most_common())


def render(name: str, manifest: dict, sizes: Mapping[str, int], card: Mapping | None = None) -> str:
    """The card's markdown text.

    Args:
        name: the export folder's name (only the name: a card carries no local path).
        manifest: the written hqdm_quant.json.
        sizes: {"file": bytes of model.safetensors, "bf16": bytes of the same model in bf16}.
        card: optional {"source", "recipe" (dict), "metrics" (dict), "command", "name"}.
    """
    card = dict(card or {})
    cls = manifest["model_class"]
    lines = ["---", "library_name: diffusers", "tags: [hqdm, quantization, integer, diffusion]", "---", "",
             f"# {name}: integer {cls} (hqdm)", "",
             f"A {cls} quantized by hqdm, stored as real integers and run with integer matmuls. "
             f"{bits_summary(manifest)}.", ""]
    lines += ["## Made by", "", f"- command: `{card.get('command', 'hqdm.export(...) from Python')}`",
              f"- source model: `{card.get('source', 'not recorded')}`",
              f"- hqdm {manifest.get('hqdm_version', '?')}, format {manifest['format']} v{manifest['format_version']}",
              f"- family: {manifest['family']}, {manifest['num_train_timesteps']} training timesteps"]
    if card.get("recipe"):
        recipe = ", ".join(f"{k} {v}" for k, v in card["recipe"].items() if v not in (None, [], {}))
        lines.append(f"- recipe: {recipe}")
    lines += ["", "## Run it", "", "```python", "import hqdm", "",
              f'model = hqdm.load_int("{name}")  # a diffusers {cls} with IntLinear / IntConv2d layers',
              "```", ""]
    if cls == "DiTTransformer2DModel":
        lines += ["Inside diffusers' own `DiTPipeline` (the timesteps reach the integer layers from the model's own "
                  "call):", "", "```python", "from hqdm.pipelines import load_dit_pipeline", "",
                  f'pipe = load_dit_pipeline("{name}")  # DiTPipeline(transformer=load_int(...), vae, scheduler)',
                  "images = pipe(class_labels=[0, 1, 2], guidance_scale=1.0, num_inference_steps=25).images",
                  "```", ""]
    lines += ["Or from the command line: `hqdm sample --model " + name + " --out grid.png`.", ""]
    lines += ["## Size", "", f"- `model.safetensors`: {sizes['file'] / 2**20:.2f} MiB, "
              f"{sizes['file'] / sizes['bf16']:.3f}× the same model in bf16 ({sizes['bf16'] / 2**20:.2f} MiB)", ""]
    parity = manifest.get("parity")
    lines += ["## Parity (integer model against the fake-quant model it was exported from)", ""]
    if parity:
        lines += [f"- {parity['batches']} batches: output SQNR against float {parity['int_vs_float_db']} dB integer, "
                  f"{parity['fake_quant_vs_float_db']} dB fake quant; integer vs fake quant "
                  f"{parity['int_vs_fake_quant_db']} dB", f"- worst layer `{parity['worst_layer']}`: "
                  f"{parity['worst_layer_sqnr_db']} dB (bound {parity['layer_bound_db']:g} dB)"]
    else:
        lines.append("- not checked (exported without calibration batches)")
    if card.get("metrics"):
        lines += ["", "## Metrics of the run (last validation, against the FP teacher)", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in card["metrics"].items()]
    lines += ["", "## Bits per layer", "", *layer_rows(manifest), ""]
    return "\n".join(lines)


def write_card(folder: Path, name: str, manifest: dict, sizes: Mapping[str, int], card: Mapping | None = None) -> Path:
    """Write README.md into `folder` (the staging folder of the export named `name`) and return its path."""
    path = Path(folder) / CARD_FILE
    path.write_text(render(name, manifest, sizes, card), encoding="utf-8")
    return path
