"""The `hqdm` command under bad input and faults: one line per error (exit code != 0, no traceback), cheap checks
before work, honest resumes, the numerics guard, exports that lose nothing, and kill -9 recovery."""

from __future__ import annotations

import builtins
import copy
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from torch.utils.data import Dataset

from hqdm import safe_io
from hqdm.data import DigitsDataModule
from hqdm.trainers import commands
from hqdm.trainers.cli import main

RUN = {
    "seed_everything": 0,
    "trainer": {"max_steps": 2, "limit_train_batches": 2, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                "accelerator": "cpu",
                "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": "runs", "name": "q"}}},
    "model": {
        "source": {"class_name": "DiTTransformer2DModel", "init_args": {
            "sample_size": 8, "patch_size": 2, "in_channels": 1, "out_channels": 1, "num_layers": 1,
            "num_attention_heads": 2, "attention_head_dim": 16, "num_embeds_ada_norm": 10}},
        "quant": {"w_bits": 4, "a_bits": 4},
        "diffusion": {"num_steps": 2},
        "calibration_batches": 1,
        "evaluation": {"num_samples": 0, "buckets": 4},
    },
    "data": {"class_path": "hqdm.data.DigitsDataModule", "init_args": {"resolution": 8, "batch_size": 8}},
}
EVERY_STEP = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
              "init_args": {"every_n_train_steps": 1, "save_last": True, "save_top_k": -1}}


def variant(name: str, quant="keep", data=None, **trainer) -> dict:
    run = copy.deepcopy(RUN)
    run["trainer"]["logger"]["init_args"]["name"] = name
    run["trainer"].update(trainer)
    if quant != "keep":
        run["model"]["quant"] = quant
    if data is not None:
        run["data"] = data
    return run


class InfiniteDigits(DigitsDataModule):
    """Digits whose training images turn infinite after three batches of 8 rows (calibration, steps 0 and 1)."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.train_set = TurnsInfinite(self.train_set, after=24)


class TurnsInfinite(Dataset):
    def __init__(self, rows, after: int) -> None:
        self.rows, self.after, self.drawn = rows, after, 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        self.drawn += 1
        row = self.rows[i]
        return {**row, "x": row["x"] * float("inf")} if self.drawn > self.after else row


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """q.yaml (W4A4 DiT) and fp.yaml (its FP model) fitted for 2 steps, plus a crafted and a truncated file."""
    root = tmp_path_factory.mktemp("hardening")
    configs = {"q": variant("q"), "fp": variant("fp", quant=None), "nan": variant(
        "nan", data={"class_path": f"{__name__}.InfiniteDigits", "init_args": {"resolution": 8, "batch_size": 8}},
        max_steps=6, limit_train_batches=6, callbacks=[EVERY_STEP])}
    for name, run in configs.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(run))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name in ("q", "fp"):
            main(["fit", "--config", f"{name}.yaml"])
    good = next((root / "runs/q/version_0/checkpoints").glob("*.ckpt"))
    ckpt = torch.load(good, weights_only=True)
    ckpt["hyper_parameters"]["source"] = Payload(root / "CODE_RAN")
    torch.save(ckpt, root / "crafted.ckpt")
    (root / "truncated.ckpt").write_bytes(good.read_bytes()[:4096])
    return root


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture
def wd(workdir, monkeypatch) -> Path:
    monkeypatch.chdir(workdir)
    yield workdir
    assert not (workdir / "CODE_RAN").exists()


def ckpt_of(name: str) -> str:
    return str(next(Path(f"runs/{name}/version_0/checkpoints").glob("epoch=*.ckpt")))


def error(args: list[str], capsys, code: int = 2) -> str:
    """Run a command that must fail with `code` and print one error (no traceback); returns the error text."""
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == code, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hqdm ")]
    assert len(lines) == 1 and ": error: " in lines[0], err[-2000:]
    return err[err.index(lines[0]):]


def versions(name: str) -> int:
    return len(list(Path(f"runs/{name}").glob("version_*")))


# ---- hqdm fit: bad values -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--model.label_dropout", "2"], "label_dropout=2.0 must be in [0, 1)"),
    (["--model.quant.w_bits", "1"], "w_bits=1 is out of range"),
    (["--model.quant.rotation", "foo"], "Expected a typing.Literal['none', 'single', 'double']. Got value: foo"),
    (["--model.lr", "-1"], "model.lr=-1.0 must be a number in (0, 1]"),
    (["--model.lr", "fast"], 'Parser key "model.lr": Expected a <class \'float\'>. Got value: fast'),
    (["--model.betas", "[0.9, 2]"], "model.betas=[0.9, 2.0]"),
    (["--trainer.max_step", "3"], "unrecognized arguments: --trainer.max_step 3"),
    (["--model.source.class_name", "os.system"], "hqdm never imports a module a file names"),
    (["--model.source.weights", "crafted.ckpt"], "asks to unpickle"),
    (["--model.source.weights", "missing.pt"], "weights='missing.pt' does not exist"),
    (["--data.init_args.resolution", "16"], "samples have shape (1, 16, 16) (C, H, W) but the model takes (1, 8, 8)"),
    (["--data.init_args.batch_size", "0"], "batch_size=0 is not allowed"),
    (["--trainer.accelerator", "gpu"], "gpu"),
], ids=lambda v: v if isinstance(v, str) else "_".join(v)[:40])
def test_bad_fit_options_give_one_line(wd, capsys, args, message):
    before = versions("q")
    if args[0] == "--trainer.accelerator" and torch.cuda.is_available():
        pytest.skip("a GPU is there")
    assert message in error(["fit", "--config", "q.yaml", *args], capsys)
    assert not list(Path("runs/q").glob(f"version_{before}/checkpoints/*.ckpt"))


def test_bad_commands_and_configs(wd, capsys):
    assert "invalid choice: 'fitt'" in error(["fitt"], capsys)
    assert "does not exist" in error(["fit", "--config", "missing.yaml"], capsys)
    Path("list.yaml").write_text("- 1\n- 2\n")
    assert "error:" in error(["fit", "--config", "list.yaml"], capsys)


def test_debug_shows_the_traceback(wd, capsys, monkeypatch):
    with pytest.raises(ValueError, match="label_dropout"):
        main(["fit", "--config", "q.yaml", "--model.label_dropout", "2", "--debug"])
    monkeypatch.setenv("HQDM_DEBUG", "1")
    with pytest.raises(ValueError, match="num_steps"):
        main(["sample", "--model", "hqdm:digits_dit", "--num_steps", "0"])


# ---- hqdm fit: resumes --------------------------------------------------------------------------------------------
def test_a_resume_that_changes_the_quantization_is_refused_with_the_diff(wd, capsys):
    before = versions("q")
    text = error(["fit", "--config", "q.yaml", "--ckpt_path", ckpt_of("q"), "--model.quant.w_bits", "8",
                  "--model.lr", "0.001", "--resume_override", "true"], capsys)
    assert "model.quant.w_bits: checkpoint 4, now 8  (cannot change on resume)" in text
    assert "model.lr: checkpoint 0.0001, now 0.001" in text and "config.yaml" in text
    assert versions("q") == before


def test_a_resume_with_a_new_learning_rate_needs_the_override_and_then_applies_it(wd, capsys):
    args = ["fit", "--config", "q.yaml", "--ckpt_path", ckpt_of("q"), "--model.lr", "0.001",
            "--trainer.max_steps", "3"]
    assert "Add --resume_override true" in error(args, capsys)
    before = versions("q")
    main([*args, "--resume_override", "true"])
    saved = torch.load(next(Path(f"runs/q/version_{before}/checkpoints").glob("*step=3.ckpt")), weights_only=True)
    assert {g["lr"] for g in saved["optimizer_states"][0]["param_groups"]} == {0.001}
    assert saved["lr_schedulers"][0]["base_lrs"] == [0.001] * len(saved["lr_schedulers"][0]["base_lrs"])


def test_resuming_an_fp_checkpoint_into_qat_says_so(wd, capsys):
    text = error(["fit", "--config", "q.yaml", "--ckpt_path", ckpt_of("fp")], capsys)
    assert "is a checkpoint of an FP run" in text and "--model.source.weights" in text


@pytest.mark.parametrize("name, message", [("crafted.ckpt", "asks to unpickle"),
                                           ("truncated.ckpt", "not a readable torch file"),
                                           ("missing.ckpt", "does not exist"), ("q.yaml", "not a readable torch")])
def test_resume_and_evaluation_from_bad_files(wd, capsys, monkeypatch, name, message):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's escape hatch does not reach hqdm
    for command in ("fit", "validate"):
        assert message in error([command, "--config", "q.yaml", "--ckpt_path", name], capsys)


def test_weights_only_cannot_be_turned_off_and_reaches_lightning(wd, capsys, monkeypatch):
    args = ["fit", "--config", "q.yaml", "--ckpt_path", ckpt_of("q")]
    assert "hqdm reads checkpoints with weights_only=True only" in error([*args, "--weights_only", "false"], capsys)
    seen = {}

    @functools.wraps(Trainer.fit)  # the CLI reads fit's signature for its options
    def spy(self, *args, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(Trainer, "fit", spy)
    main(args)
    assert seen["weights_only"] is True and seen["ckpt_path"] == ckpt_of("q")


# ---- hqdm fit: the numerics guard ---------------------------------------------------------------------------------
def test_data_that_turns_infinite_stops_the_run_and_keeps_last_ckpt_good(wd, capsys):
    text = error(["fit", "--config", "nan.yaml"], capsys, code=3)
    run = Path("runs/nan/version_0/checkpoints")
    assert "the training loss is nan at step 2 (epoch 0)" in text
    assert f"the last good checkpoint is {run / 'last.ckpt'}" in text
    last = torch.load(run / "last.ckpt", weights_only=True)
    tensors = [v for v in last["state_dict"].values() if isinstance(v, torch.Tensor)]
    assert last["global_step"] == 2 and tensors and all(torch.isfinite(v).all() for v in tensors)
    assert sorted(p.name for p in run.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]


def test_a_foreign_last_ckpt_in_the_checkpoint_folder_is_refused(wd, capsys):
    folder = Path("runs/copied/first/checkpoints")  # a string version is the folder's name as given
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(Path(ckpt_of("q")).read_bytes())
    args = ["fit", "--config", "q.yaml", "--trainer.logger.init_args.name", "copied",
            "--trainer.logger.init_args.version", "first", "--trainer.callbacks+=ModelCheckpoint",
            "--trainer.callbacks.save_last=true"]
    assert "exists and was not written by this run: ModelCheckpoint would save last-v1.ckpt" in error(args, capsys)
    assert sorted(os.listdir(folder)) == ["last.ckpt"]


# ---- hqdm export --------------------------------------------------------------------------------------------------
def no_leftovers(parent: Path = Path(".")) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_export_refuses_user_folders_files_and_unwritable_targets(wd, capsys):
    Path("photos").mkdir(exist_ok=True)
    Path("photos/cat.jpg").write_bytes(b"jpeg")
    Path("notes.txt").write_text("mine")
    q = ckpt_of("q")
    assert "not an hqdm or diffusers export" in error(
        ["export", "--ckpt_path", q, "--out_dir", "photos", "--overwrite", "true"], capsys)
    assert "is a file" in error(["export", "--ckpt_path", q, "--out_dir", "notes.txt", "--overwrite", "true"], capsys)
    assert "cannot write /proc/hqdm_out" in error(["export", "--ckpt_path", q, "--out_dir", "/proc/hqdm_out"], capsys)
    assert "--calibration_batches 0 is not allowed" in error(
        ["export", "--ckpt_path", q, "--out_dir", "x", "--calibration_batches", "0"], capsys)
    assert "arguments are required: --out_dir" in error(["export", "--ckpt_path", q], capsys)
    assert "unrecognized arguments: --ckpt_pat" in error(["export", "--ckpt_pat", q, "--out_dir", "x"], capsys)
    assert os.listdir("photos") == ["cat.jpg"] and Path("notes.txt").read_text() == "mine"
    assert not Path("x").exists() and no_leftovers()


def test_export_checks_the_target_before_loading_the_run(wd, capsys, monkeypatch):
    Path("existing").mkdir(exist_ok=True)
    (Path("existing") / "hqdm_quant.json").write_text(json.dumps({"format": "hqdm-int"}))
    monkeypatch.setattr(commands, "load_run", lambda *a, **k: pytest.fail("loaded the run before checking"))
    assert "pass overwrite=True (CLI: --overwrite true)" in error(
        ["export", "--ckpt_path", ckpt_of("q"), "--out_dir", "existing"], capsys)


@pytest.mark.parametrize("name, message", [("crafted.ckpt", "asks to unpickle"),
                                           ("truncated.ckpt", "not a readable torch file"),
                                           ("nan.ckpt", "hold non-finite values"), ("fp.yaml", "not a readable")])
def test_export_and_report_refuse_bad_checkpoints_and_write_nothing(wd, capsys, name, message):
    if name == "nan.ckpt":
        ckpt = torch.load(ckpt_of("q"), weights_only=True)
        key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
        ckpt["state_dict"][key][...] = float("nan")
        torch.save(ckpt, name)
    assert message in error(["export", "--ckpt_path", name, "--out_dir", "bad_out"], capsys)
    assert message in error(["report", "--ckpt_path", name, "--plot", "bad.png"], capsys)
    assert not Path("bad_out").exists() and not Path("bad.png").exists() and no_leftovers()


def test_an_fp_export_over_an_integer_export_leaves_no_stale_file(wd, capsys):
    main(["export", "--ckpt_path", ckpt_of("q"), "--out_dir", "model", "--calibration_batches", "1"])
    manifest_file = Path("model") / "hqdm_quant.json"
    original = manifest_file.read_text()
    edited = json.loads(original)
    next(iter(edited["layers"].values()))["config"]["w"]["bits"] = 2
    manifest_file.write_text(json.dumps(edited))
    assert "was modified after export" in error(["sample", "--model", "model", "--out", "edited.png"], capsys)
    manifest_file.write_text(original)
    main(["export", "--ckpt_path", ckpt_of("fp"), "--out_dir", "model", "--overwrite", "true"])
    assert sorted(os.listdir("model")) == ["config.json", "diffusion_pytorch_model.safetensors",
                                          "scheduler_config.json"]
    net, *_ = commands.load_sampler_model("model", None, "cpu")
    assert type(net).__name__ == "DiTTransformer2DModel" and no_leftovers()
    capsys.readouterr()


def test_kill_during_export_leaves_nothing_half_written(wd, capsys):
    """kill -9 once everything is staged: no out_dir; the next export removes the leftover and writes it."""
    ready = wd / "staged"
    script = (
        "import time, sys\nfrom hqdm import safe_io\nfrom hqdm.trainers.cli import main\n"
        f"def stall(*a, **k):\n    open({str(ready)!r}, 'w').close()\n    time.sleep(120)\n"
        "safe_io.replace_dir = stall\n"
        f"main(['export', '--ckpt_path', {ckpt_of('fp')!r}, '--out_dir', 'killed'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=wd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    assert ready.exists() and not Path("killed").exists() and not no_leftovers()
    main(["export", "--ckpt_path", ckpt_of("fp"), "--out_dir", "killed"])
    assert f"removed {Path('.') / f'.killed.{proc.pid}-'}" in capsys.readouterr().out
    assert safe_io.export_kind("killed") == "diffusers" and no_leftovers()


# ---- hqdm sample / report -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--num_steps", "0"], "--num_steps 0 is not allowed"), (["--num_samples", "0"], "--num_samples 0"),
    (["--labels", "[]"], "--labels [] names no class"), (["--labels", "[12]"], "out of range"),
    (["--guidance_scale", "-1"], "--guidance_scale -1.0 must be >= 0"),
    (["--out", "."], "is a folder"), (["--out", "/proc/hqdm_x/grid.png"], "cannot be written"),
    (["--sampler", "magic"], "magic"), (["--num_stpes", "2"], "unrecognized arguments: --num_stpes"),
], ids=lambda v: v if isinstance(v, str) else "_".join(v)[:30])
def test_bad_sample_options(wd, capsys, args, message):
    assert message in error(["sample", "--model", "hqdm:digits_dit", "--progress", "false", *args], capsys)


def test_sample_refuses_bad_model_folders(wd, capsys, tmp_path):
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "config.json").write_text(json.dumps({"_class_name": "os.system"}))
    assert "never imports a module" in error(["sample", "--model", str(trap)], capsys)
    (trap / "config.json").write_text("{")
    assert "is not a JSON object" in error(["sample", "--model", str(trap)], capsys)
    assert "neither a checkpoint" in error(["sample", "--model", str(tmp_path / "nothing")], capsys)
    folder = tmp_path / "fp_model"
    main(["export", "--ckpt_path", ckpt_of("fp"), "--out_dir", str(folder)])
    (folder / commands.SCHEDULER_FILE).write_text("[1, 2")
    assert "is not valid JSON" in error(["sample", "--model", str(folder), "--out", str(tmp_path / "g.png")], capsys)
    assert not (tmp_path / "g.png").exists()


def test_bad_report_options(wd, capsys):
    assert "--batches 0 is not allowed" in error(["report", "--ckpt_path", ckpt_of("q"), "--batches", "0"], capsys)
    assert "no quantized student" in error(["report", "--ckpt_path", ckpt_of("fp"), "--plot", "r.png"], capsys)
    assert "cannot be written" in error(["report", "--ckpt_path", ckpt_of("q"), "--plot", "/proc/x/r.png"], capsys)
    assert "Name the run" in error(["report"], capsys)


# ---- kill -9 and resume -------------------------------------------------------------------------------------------
def fit_until_killed(root: Path, args: list[str], wait_for: str) -> None:
    """Run `hqdm fit` in a child process and kill -9 it once a checkpoint matching `wait_for` exists."""
    proc = subprocess.Popen([sys.executable, "-m", "hqdm.trainers.cli", "fit", *args], cwd=root,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not list(root.glob(f"runs/k/version_*/checkpoints/{wait_for}")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert list(root.glob(f"runs/k/version_*/checkpoints/{wait_for}")), "the run never got there"


def test_kill_9_loop_of_fit_resumes_bit_exact(tmp_path, monkeypatch):
    """Killed twice and resumed mid-epoch from the checkpoint before each kill: the same weights as one run."""
    run = variant("k", max_steps=7, limit_train_batches=4, callbacks=[EVERY_STEP])
    (tmp_path / "k.yaml").write_text(yaml.safe_dump(run))
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump({**run, "trainer": {
        **run["trainer"], "logger": {**run["trainer"]["logger"], "init_args": {"save_dir": "runs", "name": "ref"}}}}))
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", "ref.yaml"])
    fit_until_killed(tmp_path, ["--config", "k.yaml"], "*-step=3.ckpt")
    step2 = next(tmp_path.glob("runs/k/version_0/checkpoints/*-step=2.ckpt"))  # epoch 0, batch 2 of 4
    fit_until_killed(tmp_path, ["--config", "k.yaml", "--ckpt_path", str(step2)], "*-step=6.ckpt")
    step5 = next(tmp_path.glob("runs/k/version_1/checkpoints/*-step=5.ckpt"))  # epoch 1, batch 1 of 4
    main(["fit", "--config", "k.yaml", "--ckpt_path", str(step5)])
    ref = torch.load(next(tmp_path.glob("runs/ref/version_0/checkpoints/*-step=7.ckpt")), weights_only=True)
    got = torch.load(next(tmp_path.glob("runs/k/version_2/checkpoints/*-step=7.ckpt")), weights_only=True)
    assert ref["state_dict"].keys() == got["state_dict"].keys()
    for key, want in ref["state_dict"].items():
        assert torch.equal(want, got["state_dict"][key]) if isinstance(want, torch.Tensor) else \
            want == got["state_dict"][key], key
