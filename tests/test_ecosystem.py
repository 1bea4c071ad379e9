"""First use: quiet start-up, help, the end-of-fit summary, EMA, model cards, diffusers pipelines, labeled grids."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from hqdm.grids import PAD_PX, class_rows, save_grid
from hqdm.trainers.cli import main
from hqdm.trainers.quiet import silence_known_notices

ROOT = Path(__file__).resolve().parents[1]

RUN = {
    "seed_everything": 0,
    "trainer": {"max_steps": 4, "val_check_interval": 2, "check_val_every_n_epoch": None, "limit_val_batches": 1,
                "num_sanity_val_steps": -1, "log_every_n_steps": 1, "enable_progress_bar": False,
                "enable_model_summary": False, "accelerator": "cpu",
                "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": "runs", "name": "eco"}},
                "callbacks": [
                    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
                    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                     "init_args": {"monitor": "val/sqnr_db", "mode": "max", "save_top_k": 1,
                                   "filename": "best-{step}"}},
                    {"class_path": "hqdm.trainers.callbacks.StudentEMA", "init_args": {"decay": 0.5}}]},
    "model": {
        "source": {"class_name": "DiTTransformer2DModel", "init_args": {
            "sample_size": 8, "patch_size": 2, "in_channels": 1, "out_channels": 1, "num_layers": 1,
            "num_attention_heads": 2, "attention_head_dim": 16, "num_embeds_ada_norm": 10}},
        "quant": {"w_bits": 4, "a_bits": 4, "timestep_buckets": 2},
        "diffusion": {"num_steps": 2},
        "calibration_batches": 1,
        "evaluation": {"num_samples": 4, "buckets": 2},
    },
    "data": {"class_path": "hqdm.data.DigitsDataModule", "init_args": {"resolution": 8, "batch_size": 8}},
}
PIPELINE_SQNR_FLOOR_DB = 60.0
"""DiTPipeline samples of the integer model against those of the fake-quant model it was exported from, same noise:
per layer the two hold the same integers (export parity), so only float summation order separates them (137 dB
measured on this model; the FP teacher in its place gives 28 dB)."""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step W4A4 run with EMA and a best-by-val/sqnr_db checkpoint, resumed to 6 steps; then exported."""
    root = tmp_path_factory.mktemp("eco")
    (root / "eco.yaml").write_text(yaml.safe_dump(RUN))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        import lightning.pytorch  # noqa: F401  (its log handler binds the real stdout, before the capture below)

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            main(["fit", "--config", "eco.yaml"])
        (root / "fit.txt").write_text(printed.getvalue())
        last = root / "runs/eco/version_0/checkpoints/last.ckpt"
        main(["fit", "--config", "eco.yaml", "--trainer.max_steps", "6", "--ckpt_path", str(last)])
        main(["export", "--ckpt_path", "runs/eco/version_1/checkpoints/last.ckpt", "--out_dir", "exports/eco"])
    return root


def test_top_level_help_is_instant_and_complete():
    """`hqdm --help` lists every subcommand with one line, prints nothing else, and imports neither torch nor
    Lightning (so it returns at once)."""
    code = ("import sys\nfrom hqdm.trainers.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in ('torch', 'lightning', 'diffusers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    for name in ("fit", "validate", "test", "predict", "export", "sample", "report"):
        assert any(line.strip().startswith(name + " ") for line in done.stdout.splitlines()), name
    assert "LOADED []" in done.stdout


def test_fit_help_lists_the_quantization_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for option in ("--model.quant.w_bits", "--model.quant.rotation", "--model.quant.block", "--model.quant.rules"):
        assert option in out, option


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_known_notices_are_silenced_by_message_only():
    silence_known_notices()
    logger, seen_logs = logging.getLogger("diffusers.models.modeling_utils"), Records()
    logger.addHandler(seen_logs)  # diffusers' loggers do not propagate to the root logger
    try:
        logger.warning("Cannot initialize model with low cpu memory usage because `accelerate` was not found.")
        logger.warning("some other diffusers warning")
    finally:
        logger.removeHandler(seen_logs)
    assert seen_logs.messages == ["some other diffusers warning"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # over pytest's own filters; the silenced ones go in front of it
        silence_known_notices()
        warnings.warn("Found 115 module(s) in eval mode at the start of training. This may lead to ...", stacklevel=1)
        warnings.warn("an unrelated warning", stacklevel=1)
    assert [str(w.message) for w in seen] == ["an unrelated warning"]


def test_fit_prints_a_summary_and_keeps_last_and_best(run):
    text = (run / "fit.txt").read_text()
    assert "hqdm fit: stopped at step 4" in text
    assert "val/sqnr_db" in text and "(PTQ start) ->" in text
    ckpts = run / "runs/eco/version_0/checkpoints"
    assert "last               runs/eco/version_0/checkpoints/last.ckpt" in text
    assert text.count("checkpoints          runs/eco/version_0/checkpoints\n") == 1
    assert list(ckpts.glob("best-step=*.ckpt")) and "best val/sqnr_db" in text
    assert "runs/eco/version_0/metrics.csv" in text and "runs/eco/version_0/samples" in text


def test_ema_checkpoints_hold_the_average_without_the_teacher(run):
    ckpt = torch.load(run / "runs/eco/version_0/checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    averaged, current = ckpt["state_dict"], ckpt["current_model_state"]
    assert int(ckpt["averaging_state"]["n_averaged"]) == 4
    assert not any(k.startswith("teacher.") for k in (*averaged, *current))
    assert averaged.keys() == current.keys()
    moved = [k for k, v in averaged.items() if torch.is_tensor(v) and v.is_floating_point()
             and not torch.equal(v, current[k])]
    assert moved, "the EMA state equals the raw weights: nothing was averaged"
    resumed = torch.load(run / "runs/eco/version_1/checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    assert resumed["global_step"] == 6 and int(resumed["averaging_state"]["n_averaged"]) == 6


def test_the_export_carries_a_model_card(run):
    card = (run / "exports/eco/README.md").read_text()
    assert "# eco: integer DiTTransformer2DModel (hqdm)" in card
    assert "hqdm export --out_dir exports/eco --ckpt_path runs/eco/version_1/checkpoints/last.ckpt" in card
    assert "source model: `DiTTransformer2DModel`" in card and "w_bits 4, a_bits 4" in card
    assert "## Parity" in card and "worst layer" in card and "| val/sqnr_db |" in card
    import json

    layers = json.loads((run / "exports/eco/hqdm_quant.json").read_text())["layers"]
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert len(rows) == len(layers) and str(run) not in card  # one row per layer; no local path


def test_the_integer_export_runs_inside_diffusers_dit_pipeline(run):
    from diffusers import DiTPipeline

    from hqdm.pipelines import PixelSpace, load_dit_pipeline
    from hqdm.trainers.commands import load_run

    pipe = load_dit_pipeline(run / "exports/eco")
    assert isinstance(pipe, DiTPipeline)
    student = load_run(None, str(run / "runs/eco/version_1/checkpoints/last.ckpt"))[0].student
    fake = DiTPipeline(transformer=student, vae=PixelSpace(), scheduler=pipe.scheduler)

    def draw(p):
        return torch.from_numpy(p(class_labels=[0, 3, 7], guidance_scale=1.0, num_inference_steps=3,
                                  generator=torch.Generator().manual_seed(0), output_type="np").images)

    images, reference = draw(pipe), draw(fake)
    assert images.shape == (3, 8, 8, 1) and torch.isfinite(images).all()
    sqnr = 10 * math.log10(reference.pow(2).sum() / (images - reference).pow(2).sum().clamp_min(1e-20))
    assert sqnr > PIPELINE_SQNR_FLOOR_DB


def test_sample_writes_one_labeled_row_per_class(run, monkeypatch):
    monkeypatch.chdir(run)
    main(["sample", "--model", "exports/eco", "--num_samples", "20", "--num_steps", "2", "--out", "grid.png",
          "--progress", "false"])
    plain = Image.open(save_grid(torch.zeros(2, 1, 8, 8), str(run / "one_row.png"), nrow=2))
    grid = Image.open(run / "grid.png")
    assert grid.height - PAD_PX == 10 * (plain.height - PAD_PX)  # 10 classes, one row each
    assert grid.width > plain.width  # 2 per row, plus the band of row labels


def test_class_rows_fill_short_rows_with_blank_cells():
    images = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, -0.5, 0.0)])
    cells, per_row, labels = class_rows(images, [3, 7, 3])
    assert per_row == 2 and labels == ["class 3", "class 7"]
    assert torch.equal(cells[0], images[0]) and torch.equal(cells[1], images[2]) and torch.equal(cells[2], images[1])
    assert torch.equal(cells[3], torch.ones(1, 2, 2))  # blank


def test_layers_plot_legend_has_one_swatch_per_block_type_in_its_colour(tmp_path, monkeypatch):
    import matplotlib.figure

    from hqdm.report import LayerSQNR, QuantReport

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    report = QuantReport(layers=[LayerSQNR("a", "qkv", 1.0, 0.01), LayerSQNR("b", "fc1", 1.0, 0.1),
                                 LayerSQNR("c", "qkv", 1.0, 0.02)], output_signal=1.0, output_noise=0.01)
    report.plot(str(tmp_path / "layers.png"))
    ax = figures[0].axes[0]
    bars = {e.block_type: tuple(p.get_facecolor()) for e, p in zip(report.layers, ax.patches)}
    legend = {t.get_text(): tuple(h.get_facecolor()) for t, h in zip(ax.get_legend().get_texts(),
                                                                     ax.get_legend().legend_handles)}
    assert legend == bars and len(set(legend.values())) == 2
