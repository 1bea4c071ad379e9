"""hqdm.trainers.parallel and the global-batch guard, in one process: what FSDP refuses (FSDP1, compile, 8-bit
AdamW, folder checkpoints, bad options), which modules it shards, and the messages of a resume that would change
the global batch. The multi-process fits are in test_distributed.py."""

from __future__ import annotations

import re

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from test_distributed import _fit

from hqdm.trainers import FSDP
from hqdm.trainers.guards import GlobalBatch, ResumeError, load_checkpoint, split_batch_change
from hqdm.trainers.module import WORLD_SIZE
from hqdm.trainers.parallel import refuse_fsdp1, shard_units


def test_lightnings_fsdp1_is_refused_naming_hqdm_fsdp():
    with pytest.raises(ValueError, match=r"FSDP1.*--trainer.strategy hqdm_fsdp"):
        refuse_fsdp1(FSDPStrategy())
    refuse_fsdp1(FSDP())  # FSDP2 through ModelParallelStrategy: allowed
    assert StrategyRegistry["hqdm_fsdp"]["strategy"] is FSDP


@pytest.mark.parametrize("option", ["shard_teacher", "reshard_after_forward"])
def test_fsdp_options_must_be_booleans(option):
    with pytest.raises(ValueError, match=rf"FSDP {option}='yes' must be true or false"):
        FSDP(**{option: "yes"})


def test_every_linear_and_conv_is_a_shard_unit_then_the_model():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=1,
                                  num_attention_heads=2, attention_head_dim=16, num_embeds_ada_norm=10)
    units = shard_units(model)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert units[-1] is model and units[:-1] == layers and len(layers) > 5


def test_a_folder_is_refused_as_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a checkpoint file"):
        load_checkpoint(str(tmp_path))
    (tmp_path / ".metadata").write_bytes(b"\x80\x04.")  # torch.distributed.checkpoint's (pickled) metadata
    with pytest.raises(ValueError, match=r"sharded state \(torch.distributed.checkpoint\); its metadata is a pickle"):
        load_checkpoint(str(tmp_path))


def test_the_global_batch_check_names_the_batch_size_that_keeps_it():
    GlobalBatch("a.ckpt", 8, 2, 8).check(2)  # the same global batch: allowed
    GlobalBatch("a.ckpt", 8, 2, 16).check(1)
    with pytest.raises(ResumeError, match=r"global batch of 16 \(2 process\(es\) x batch_size 8\); this run has "
                                          r"4 x 8 = 32.*set --data.init_args.batch_size 4\."):
        GlobalBatch("a.ckpt", 8, 2, 8).check(4)
    with pytest.raises(ResumeError, match="run on a number of processes that divides 16"):
        GlobalBatch("a.ckpt", 8, 2, 5).check(3)


def test_a_batch_size_change_is_a_global_batch_check_only_where_the_checkpoint_records_its_processes():
    from hqdm.trainers.guards import Change

    change = Change("data.init_args.batch_size", 8, 4)
    data = {"datamodule_hyper_parameters": {"batch_size": 8}}
    rest, check = split_batch_change({**data, WORLD_SIZE: 1}, [change], "a.ckpt")
    assert rest == [] and check == GlobalBatch("a.ckpt", 8, 1, 4)
    rest, check = split_batch_change(data, [change], "a.ckpt")  # an older checkpoint: the batch size stays fixed
    assert rest == [change] and check is None


@pytest.mark.parametrize("args, message", [
    (["--model.compile", "true"], "compile=True compiles the training step as one graph"),
    (["--model.optimizer", "adamw8bit"], "optimizer='adamw8bit' \\(bitsandbytes\\) does not take sharded"),
], ids=["compile", "adamw8bit"])
def test_fsdp_refuses_what_it_cannot_run(tmp_path, args, message):
    if "adamw8bit" in args:
        pytest.importorskip("bitsandbytes")
    err = _fit(tmp_path, "bad", ["--trainer.strategy", "hqdm_fsdp", "--trainer.devices", "1", *args], ok=False)
    assert re.search(message, err) and "Traceback" not in err, err[-2000:]
