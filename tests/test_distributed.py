"""Data parallelism on the CPU (gloo, two processes): calibration on the ranks' shares gives every rank the state
one process reaches on all of them, and each rank draws its rows of the global batch's noise, timesteps and label
dropout (what one process draws for the whole batch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_batches
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file, save_file

import hqdm
from hqdm.config import PRESETS
from hqdm.trainers.source import asset_path

CALIBRATION_RTOL = 1e-6
"""Shares' float64 sums, reduced in another order than one process adds them: equal to ~1e-15, then float32."""
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
