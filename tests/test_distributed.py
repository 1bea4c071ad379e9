"""Data parallelism on the CPU (gloo, two processes): calibration on the ranks' shares gives every rank the state
one process reaches on all of them, and each rank draws its rows of the global batch's noise, timesteps and label
dropout (what one process draws for the whole batch), and a DDP fit of two processes at batch B follows the
one-process fit at batch 2·B."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

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
def _fit(cwd: Path, name: str, args: list[str]) -> Path:
    """`hqdm fit` of the tiny W4A4 DiT (4 steps, label dropout) in a fresh process; returns its version folder."""
    run = copy.deepcopy(TINY_RUN)
    run["trainer"].update({"max_steps": 4, "limit_train_batches": 8, "limit_val_batches": 1})
    run["trainer"]["logger"]["init_args"]["name"] = name
    run["model"].update({"label_dropout": 0.25, "calibration_batches": 2})
    (cwd / f"{name}.yaml").write_text(yaml.safe_dump(run))
    cmd = [sys.executable, "-m", "hqdm.trainers.cli", "fit", "--config", f"{name}.yaml", *args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return cwd / "runs" / name / "version_0"


def _student_state(run: Path) -> dict[str, torch.Tensor]:
    state = safe_load(next((run / "checkpoints").glob("*step=4.ckpt")))["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.") and torch.is_tensor(v)}


def _losses(run: Path) -> dict[int, float]:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_ddp_with_two_processes_follows_the_one_process_fit(tmp_path):
    """Two processes at batch 4 see the global batches, noise, timesteps and dropped labels of one process at
    batch 8, so the loss at every step and the final student (weights, step sizes, tables) match."""
    one = _fit(tmp_path, "one", ["--data.init_args.batch_size", "8"])
    two = _fit(tmp_path, "two", ["--trainer.devices", "2", "--trainer.strategy", "ddp",
                                 "--data.init_args.batch_size", "4"])
    la, lb = _losses(one), _losses(two)
    assert la.keys() == lb.keys() and len(la) == 4
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=LOSS_RTOL), (step, la[step], lb[step])
    sa, sb = _student_state(one), _student_state(two)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=FIT_RTOL, atol=FIT_ATOL, msg=key)
