"""Data parallelism on CUDA (NCCL): hqdm_fsdp on one GPU follows the one-device fit, and on two GPUs DDP and FSDP
at batch 4 follow one GPU at batch 8 (the gloo tests in test_distributed.py, on GPUs). The fits run eager in
float32 (FSDP steps are never compiled), so the tolerances are those of the CPU tests, widened for cuBLAS's other
summation orders."""

from __future__ import annotations

import pytest
import torch
from test_distributed import _fit, _losses, _student_state

pytestmark = pytest.mark.gpu
GPU_RTOL, GPU_ATOL = 1e-2, 1e-4
"""Four AdamW steps on GPUs in float32 without TF32: the mean gradients of other reduction orders (~1e-6), which
Adam's normalized first steps amplify on tiny entries."""
GPU = {"accelerator": "gpu"}
EAGER = ["--model.compile", "false", "--trainer.precision", "32-true"]


def _close(run, reference) -> None:
    la, lb = _losses(reference), _losses(run)
    assert sorted(la) == sorted(lb) == list(range(4))
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-3), (step, la[step], lb[step])
    sa, sb = _student_state(reference), _student_state(run)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=GPU_RTOL, atol=GPU_ATOL, msg=key)


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("gpu1"), "one", [*EAGER, "--data.init_args.batch_size", "8"], trainer=GPU)


def test_fsdp_on_one_gpu_follows_the_one_device_fit(one_gpu, tmp_path):
    run = _fit(tmp_path, "fsdp1", [*EAGER, "--trainer.strategy", "hqdm_fsdp", "--trainer.devices", "1",
                                   "--data.init_args.batch_size", "8"], trainer=GPU)
    _close(run, one_gpu)
    assert (run / "samples" / "val_step000004.png").is_file()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "hqdm_fsdp"])
def test_two_gpus_follow_one_gpu_at_the_same_global_batch(one_gpu, tmp_path, strategy):
    run = _fit(tmp_path, strategy, [*EAGER, "--trainer.strategy", strategy, "--trainer.devices", "2",
                                    "--data.init_args.batch_size", "4"], trainer=GPU)
    _close(run, one_gpu)
