"""The `hqdm` command: LightningCLI runs (fit, resume, validate) and the plain export / sample / report commands."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hqdm.trainers.cli import main

TINY_RUN = {
    "seed_everything": 0,
    "trainer": {"max_steps": 2, "limit_train_batches": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0,
                "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                "accelerator": "cpu",
                "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": "runs", "name": "tiny"}}},
    "model": {
        "source": {"class_name": "DiTTransformer2DModel", "init_args": {
            "sample_size": 8, "patch_size": 2, "in_channels": 1, "out_channels": 1, "num_layers": 1,
            "num_attention_heads": 2, "attention_head_dim": 16, "num_embeds_ada_norm": 10}},
        "quant": {"w_bits": 4, "a_bits": 4},
        "diffusion": {"num_steps": 2},
        "calibration_batches": 1,
        "evaluation": {"num_samples": 4, "buckets": 4},
    },
    "data": {"class_path": "hqdm.data.DigitsDataModule", "init_args": {"resolution": 8, "batch_size": 8}},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding tiny.yaml and one tiny W4A4 DiT run fitted for 2 steps (runs/tiny/version_0)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY_RUN))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        main(["fit", "--config", "tiny.yaml"])
    return root


@pytest.fixture
def run_dir(workdir, monkeypatch) -> Path:
    """The fitted run's version folder, with the working directory at `workdir`."""
    monkeypatch.chdir(workdir)
    return workdir / "runs" / "tiny" / "version_0"


def fails(args: list[str], capsys) -> str:
    """Run a command that must fail with exit code 2; returns its stderr."""
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_fit_leaves_checkpoints_grids_metrics_and_config(run_dir):
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() or list((run_dir / "checkpoints").glob("*.ckpt"))
    assert list((run_dir / "samples").glob("val_step*.png"))
    assert (run_dir / "config.yaml").is_file()
    columns = next(csv.reader((run_dir / "metrics.csv").open()))
    assert {"train/loss", "val/sqnr_db", "val/sample_psnr_db", "val/sample_ssim"} <= set(columns)


def test_resume_with_ckpt_path_and_validate(run_dir, capsys):
    ckpt = next((run_dir / "checkpoints").glob("*.ckpt"))
    main(["fit", "--config", "tiny.yaml", "--trainer.max_steps", "3", "--ckpt_path", str(ckpt)])
    assert list(Path("runs/tiny/version_1/checkpoints").glob("*step=3.ckpt"))
    main(["validate", "--config", "tiny.yaml", "--ckpt_path", str(ckpt)])
    assert "val/sqnr_db" in capsys.readouterr().out


def test_report_export_and_sample_round_trip(run_dir, capsys):
    ckpt = str(next((run_dir / "checkpoints").glob("*.ckpt")))
    main(["report", "--ckpt_path", ckpt, "--batches", "1", "--plot", "report.png"])
    out = capsys.readouterr().out
    assert "model output" in out and Path("report.png").is_file()
    main(["export", "--ckpt_path", ckpt, "--out_dir", "int_model", "--calibration_batches", "1"])
    assert {"config.json", "hqdm_quant.json", "model.safetensors", "scheduler_config.json"} <= {
        p.name for p in Path("int_model").iterdir()}
    main(["sample", "--model", "int_model", "--num_samples", "4", "--num_steps", "2", "--out", "int.png",
          "--progress", "false"])
    main(["sample", "--model", ckpt, "--labels", "[1, 2]", "--num_steps", "2", "--out", "fq.png",
          "--progress", "false"])
    assert Path("int.png").is_file() and Path("fq.png").is_file()


def test_sample_from_the_shipped_teacher(tmp_path):
    out = tmp_path / "teacher.png"
    main(["sample", "--model", "hqdm:digits_dit", "--num_samples", "4", "--num_steps", "2", "--out", str(out),
          "--progress", "false"])
    assert out.is_file()


def test_plain_commands_explain_bad_input(tmp_path, capsys):
    assert "--out_dir" in fails(["export"], capsys)
    assert "Name the run" in fails(["export", "--out_dir", str(tmp_path / "x")], capsys)
    assert "does not exist" in fails(["report", "--ckpt_path", str(tmp_path / "missing.ckpt")], capsys)
    assert "neither a checkpoint" in fails(["sample", "--model", str(tmp_path / "nothing")], capsys)
    assert "out of range" in fails(["sample", "--model", "hqdm:digits_dit", "--labels", "[12]"], capsys)
    assert "hqdm:nope" in fails(["sample", "--model", "hqdm:nope"], capsys)
    assert "--no_such_flag" in fails(["report", "--no_such_flag", "1"], capsys)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "validate", "test", "predict", "export", "sample", "report"))


def test_fit_under_ddp_with_two_cpu_processes(tmp_path):
    """DDP (gloo, two processes): rank 0 alone draws the sample grids, so nothing collective may run there only."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_RUN))
    args = ["fit", "--config", "tiny.yaml", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.max_steps", "4"]
    done = subprocess.run([sys.executable, "-m", "hqdm.trainers.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "tiny" / "version_0"
    assert list((run / "checkpoints").glob("*step=4.ckpt")) and len(list((run / "samples").glob("*.png"))) == 2
