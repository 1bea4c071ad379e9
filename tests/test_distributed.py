"""Data parallelism on the CPU (gloo, two processes): calibration on the ranks' shares gives every rank the state
one process reaches on all of them; each rank draws its rows of the global batch's noise, timesteps and label
dropout (what one process draws for the whole batch); DDP and FSDP fits of two processes at batch B follow the
one-process fit at batch 2·B, and a checkpoint resumes on another number of processes at the same global batch."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import make_batches
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file, save_file
from test_cli import TINY_RUN

import hqdm
from hqdm.config import PRESETS
from hqdm.data.cache import load_cache
from hqdm.safe_io import safe_load
from hqdm.trainers.source import asset_path

CALIBRATION_RTOL = 1e-6
"""Shares' float64 sums, reduced in another order than one process adds them: equal to ~1e-15, then float32."""
FIT_RTOL, FIT_ATOL = 1e-3, 1e-5
"""Two processes against one after four AdamW steps: the same mean gradients, averaged in another float32 order
(~1e-7 relative), which Adam's normalized first steps can amplify on tiny entries."""
LOSS_RTOL = 1e-4
"""The same per-step loss (the ranks' means averaged vs one mean over the global batch), float32 order."""


# ------------------------------------------------------------------------------------------------- calibration
def _student(kind: str):
    teacher = DiTTransformer2DModel.from_pretrained(asset_path("digits_dit")).eval()
    method = {"hadanorm": PRESETS["hadanorm"], "static_center": dict(rotation="single", center="static")}[kind]
    config = hqdm.QuantConfig(w_bits=4, a_bits=4, timestep_buckets=4, **method)
    return hqdm.prepare(teacher, config)[0]


def _state(student) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in student.state_dict().items() if torch.is_tensor(v)}


def _calibrate_share(rank: int, world: int, init: str, out: str, kind: str, sync: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        student = _student(kind)
        batches = make_batches(n=4, batch=4, seed=1)
        hqdm.calibrate(student, batches[rank::world], progress=False, sync=sync)
        save_file(_state(student), f"{out}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def _calibrate_on_two_ranks(tmp_path: Path, kind: str, sync: bool = True) -> list[dict[str, torch.Tensor]]:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_calibrate_share, args=(2, init, str(tmp_path), kind, sync), nprocs=2, join=True)
    return [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]


@pytest.mark.parametrize("kind", ["hadanorm", "static_center"])
def test_calibration_on_the_ranks_shares_equals_one_process_on_all(tmp_path, kind):
    """μ, σ (folded into the weights), every step-size table and the weight scales: identical on both ranks, and
    equal to one process calibrating on all four batches."""
    ranks = _calibrate_on_two_ranks(tmp_path, kind)
    one = _student(kind)
    hqdm.calibrate(one, make_batches(n=4, batch=4, seed=1), progress=False)
    reference = _state(one)
    assert ranks[0].keys() == ranks[1].keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], value, rtol=CALIBRATION_RTOL, atol=0, msg=key)


def test_calibration_without_sync_differs_per_rank(tmp_path):
    """The check above is not vacuous: calibrated on their own shares alone, the ranks' tables differ."""
    ranks = _calibrate_on_two_ranks(tmp_path, "static_center", sync=False)
    tables = [k for k in ranks[0] if k.endswith("a_quant.scale")]
    assert tables and any(not torch.equal(ranks[0][k], ranks[1][k]) for k in tables)


# ------------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("stratified", [False, True])
def test_each_rank_draws_its_rows_of_the_global_batch(stratified):
    """Rank r of 2 on rows r, r + 2, ... of a batch gets exactly those rows of the one-process draw on the whole
    batch: timesteps, noise (hence x_t) and dropped labels."""
    from hqdm.trainers.inputs import DiffusionInputs
    from hqdm.trainers.options import Diffusion

    g = torch.Generator().manual_seed(3)
    batch = {"x": torch.randn(8, 1, 4, 4, generator=g), "y": torch.randint(0, 10, (8,), generator=g)}
    inputs = DiffusionInputs(Diffusion(), null_class=10, label_dropout=0.5, target=False)

    def draw(b):
        gen = torch.Generator().manual_seed(7)
        return inputs.stratified(b, 4, gen, offset=0, dropout=True) if stratified else inputs(b, gen)

    whole = draw(batch)
    for rank in range(2):
        inputs.shard = (rank, 2)
        mine = draw({k: v[rank::2] for k, v in batch.items()})
        for key in ("x_t", "t", "y"):
            assert torch.equal(mine[key], whole[key][rank::2]), (rank, key)
        inputs.shard = (0, 1)
    assert (whole["y"] == 10).any() and (whole["y"] != 10).any()


# ------------------------------------------------------------------------------------------------- fits
EVERY_2 = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
           "init_args": {"every_n_train_steps": 2, "save_top_k": -1}}
"""Mid-epoch checkpoints at steps 2 and 4 (a resume from step 2 continues inside epoch 0)."""


def _fit(cwd: Path, name: str, args: list[str], ok: bool = True, data: dict | None = None,
         trainer: dict | None = None, model: dict | None = None) -> Path | str:
    """`hqdm fit` of the tiny W4A4 DiT (4 steps, label dropout, validation at step 4) in a fresh process; returns
    its version folder (or, with ok=False, the stderr of a fit that must fail with exit code 2)."""
    run = copy.deepcopy(TINY_RUN)
    run["trainer"].update({"max_steps": 4, "limit_train_batches": 8, "limit_val_batches": 1, "val_check_interval": 4,
                           "callbacks": [EVERY_2], **(trainer or {})})
    run["trainer"]["logger"]["init_args"]["name"] = name
    run["model"].update({"label_dropout": 0.25, "calibration_batches": 2, **(model or {})})
    run["data"] = data or run["data"]
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / f"{name}.yaml").write_text(yaml.safe_dump(run))
    cmd = [sys.executable, "-m", "hqdm.trainers.cli", "fit", "--config", f"{name}.yaml", *args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if not ok:
        assert done.returncode == 2, done.stderr[-4000:]
        return done.stderr
    assert done.returncode == 0, done.stderr[-4000:]
    return sorted((cwd / "runs" / name).glob("version_*"))[-1]


def _checkpoint(run: Path, step: int) -> Path:
    return next((run / "checkpoints").glob(f"*step={step}.ckpt"))


def _student_state(run: Path, step: int = 4) -> dict[str, torch.Tensor]:
    state = safe_load(_checkpoint(run, step))["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.") and torch.is_tensor(v)}


def _losses(run: Path) -> dict[int, float]:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _assert_follows(run: Path, reference: Path, steps: range = range(4)) -> None:
    """`run`'s loss at each of `steps` and its student after them are the reference's, within the stated
    tolerances."""
    la, lb = _losses(reference), _losses(run)
    assert sorted(lb) == list(steps), lb
    for step in steps:
        assert lb[step] == pytest.approx(la[step], rel=LOSS_RTOL), (step, la[step], lb[step])
    sa, sb = _student_state(reference, steps.stop), _student_state(run, steps.stop)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=FIT_RTOL, atol=FIT_ATOL, msg=key)


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """The reference: one process at batch 8 (checkpoints at steps 2 and 4)."""
    cwd = tmp_path_factory.mktemp("one")
    return _fit(cwd, "one", ["--data.init_args.batch_size", "8"])


def test_ddp_with_two_processes_follows_the_one_process_fit(one, tmp_path):
    """Two processes at batch 4 see the global batches, noise, timesteps and dropped labels of one process at
    batch 8, so the loss at every step and the final student (weights, step sizes, tables) match."""
    two = _fit(tmp_path, "two", ["--trainer.devices", "2", "--trainer.strategy", "ddp",
                                 "--data.init_args.batch_size", "4"])
    _assert_follows(two, one)


def test_fsdp_with_two_processes_follows_the_one_process_fit_and_exports(one, tmp_path):
    """hqdm_fsdp (FSDP2: the student sharded per layer, calibrated before sharding) on two processes at batch 4
    follows the one-process fit at batch 8; its checkpoint is one full-state file that exports to an integer model,
    and validation (every rank in the sharded student's sampling, rank 0 writing the grid) runs."""
    fsdp = _fit(tmp_path, "fsdp", ["--trainer.devices", "2", "--trainer.strategy", "hqdm_fsdp",
                                   "--data.init_args.batch_size", "4"])
    _assert_follows(fsdp, one)
    assert (fsdp / "samples" / "val_step000004.png").is_file()
    saved = safe_load(_checkpoint(fsdp, 4))
    assert saved["hqdm_world_size"] == 2 and not any(k.startswith("teacher.") for k in saved["state_dict"])
    export = ["export", "--ckpt_path", str(_checkpoint(fsdp, 4)), "--out_dir", "int", "--calibration_batches", "1"]
    done = subprocess.run([sys.executable, "-m", "hqdm.trainers.cli", *export], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    model = hqdm.load_int(tmp_path / "int")
    assert sum(1 for m in model.modules() if type(m).__name__.startswith("Int")) > 0


@pytest.mark.parametrize("first, then", [
    (("hqdm_fsdp", 2, 4), (None, 1, 8)),
    ((None, 1, 8), ("ddp", 2, 4)),
], ids=["fsdp2-to-one", "one-to-ddp2"])
def test_a_resume_on_another_number_of_processes_at_the_same_global_batch_follows_the_fit(one, tmp_path, first,
                                                                                          then):
    """Stopped at step 2 (mid-epoch) and resumed on another number of processes with the batch size that keeps
    the global batch 8: steps 2 and 3 and the final student are those of the uninterrupted one-process fit."""

    def args(strategy, devices, batch):
        return (["--trainer.strategy", strategy, "--trainer.devices", str(devices)] if strategy else []) + [
            "--data.init_args.batch_size", str(batch)]

    begun = _fit(tmp_path, "begun", [*args(*first), "--trainer.max_steps", "2"])
    resumed = _fit(tmp_path, "resumed", [*args(*then), "--ckpt_path", str(_checkpoint(begun, 2))])
    _assert_follows(resumed, one, range(2, 4))


def test_a_resume_that_changes_the_global_batch_is_refused(one, tmp_path):
    """Batch 8 on two processes is a global batch of 16, not the checkpoint's 8: refused, naming the fix."""
    err = _fit(tmp_path, "bad", ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.init_args.batch_size",
                                 "8", "--ckpt_path", str(_checkpoint(one, 2))], ok=False)
    assert "global batch of 8 (1 process(es) x batch_size 8); this run has 2 x 8 = 16" in err
    assert "set --data.init_args.batch_size 4" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "bad").exists()


# ------------------------------------------------------------------------------------------------- trajectories
def test_shares_of_the_generate_batches_are_the_whole_batch_by_batch():
    """Share (r, W) samples the generate batches k % W == r, each as in the whole (a generator per batch): the
    shares, batch by batch, are bit-exactly the rows one process samples."""
    from hqdm.config import QuantConfig
    from hqdm.trainers import Diffusion, DistillModule, ModelSource

    torch.manual_seed(0)
    source = ModelSource(class_name="DiTTransformer2DModel", init_args=TINY_RUN["model"]["source"]["init_args"])
    sampler = DistillModule(source, quant=QuantConfig(), diffusion=Diffusion(num_steps=2, guidance_scale=2.0),
                            label_dropout=0.25).trajectory_sampler()
    whole = list(sampler.rows(5, 2, seed=3))  # 3 generate batches of 2, 2, 1 samples; 2 steps x 2 calls each
    per_batch = len(whole) // 3
    shares = {r: list(sampler.rows(5, 2, seed=3, share=(r, 2))) for r in range(2)}
    assert [len(shares[0]), len(shares[1])] == [2 * per_batch, per_batch]
    merged = shares[0][:per_batch] + shares[1] + shares[0][per_batch:]
    for got, want in zip(merged, whole, strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert whole[0]["x_t"].shape == whole[per_batch]["x_t"].shape
    assert not torch.equal(whole[0]["x_t"], whole[per_batch]["x_t"]), "each batch draws noise of its own"
    assert not torch.equal(whole[0]["x_t"], list(sampler.rows(5, 2, seed=4))[0]["x_t"])
    for share in [(2, 2), (0, 0), (-1, 2), [0, 1]]:
        with pytest.raises(ValueError, match="share=.* is not allowed"):
            next(sampler.rows(5, 2, seed=3, share=share))


def _cache(run: Path) -> dict[str, np.ndarray]:
    (folder,) = (run.parent / "trajectories").iterdir()
    return load_cache(str(folder))[0].with_format("numpy")[:]


@pytest.mark.parametrize("strategy", ["ddp", "hqdm_fsdp"])
def test_two_processes_sample_the_teacher_trajectories_one_process_samples(tmp_path, strategy):
    """A data-free fit on two processes splits the teacher's 3 generate batches (2 on rank 0, 1 on rank 1) and
    merges them in batch order: its cache is bit-exactly the one-process cache, and no part folder is left."""
    data = {"class_path": "hqdm.data.TeacherTrajectoryDataModule", "init_args": {
        "num_samples": 5, "generate_batch_size": 2, "batch_size": 4, "val_fraction": 0.2, "progress": False}}
    short = {"max_steps": 1, "val_check_interval": 1, "callbacks": []}
    one = _fit(tmp_path / "one", "one", [], data=data, trainer=short)
    two = _fit(tmp_path / "two", "two", ["--trainer.devices", "2", "--trainer.strategy", strategy,
                                         "--data.init_args.batch_size", "2"], data=data, trainer=short)
    want, got = _cache(one), _cache(two)
    assert want.keys() == got.keys() and len(want["t"]) == 5 * 2
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    assert [p.name for p in (two.parent / "trajectories").iterdir()] == [p.name for p in (
        one.parent / "trajectories").iterdir()], "the same recipe, the same folder"


UNET = {"class_name": "UNet2DModel", "init_args": {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 16], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8, "num_class_embeds": 11}}


def test_fsdp_of_a_unet_follows_the_one_process_fit(tmp_path):
    """A UNet (quantized 3x3 / 1x1 convolutions, attention, GroupNorm, class embedding; some parameters too small to
    leave every rank a shard) sharded per layer on two processes at batch 4 follows one process at batch 8 for
    two steps. (Later steps are not compared: W4 rounding turns a float-order difference into a whole grid step once
    a weight lies within float error of a rounding boundary; in this tiny UNet the loss at step 2 is 1.4 % apart
    while the states after two steps agree to ~1e-4, most in conv_in's step sizes.)"""
    unet, short = {"source": UNET}, {"max_steps": 2, "val_check_interval": 2}
    one = _fit(tmp_path / "one", "one", ["--data.init_args.batch_size", "8"], model=unet, trainer=short)
    two = _fit(tmp_path / "two", "two", ["--trainer.devices", "2", "--trainer.strategy", "hqdm_fsdp",
                                         "--data.init_args.batch_size", "4"], model=unet, trainer=short)
    _assert_follows(two, one, range(2))
