"""The library runs without Lightning installed, and `import hqdm` loads no optional or GPU extension."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import importlib.abc
import sys

BLOCKED = ("lightning", "lightning_fabric", "pytorch_lightning")


class Uninstalled(importlib.abc.MetaPathFinder):
    """Import hook that makes the Lightning packages look uninstalled and records every attempt to import one."""

    tried = []

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            self.tried.append(name)
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, Uninstalled())
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the import hook failed to block {name}")
Uninstalled.tried.clear()

import hqdm

loaded = sorted({m.partition(".")[0] for m in sys.modules} & {"triton", "bitsandbytes"})
if loaded or Uninstalled.tried:  # even a guarded `try: import lightning` would load it where it is installed
    raise SystemExit(f"import hqdm loaded {loaded} and tried to import {Uninstalled.tried}")
for name in ("prepare", "calibrate", "export", "load_int"):
    if not callable(getattr(hqdm, name)):
        raise SystemExit(f"hqdm.{name} is not callable")

import tempfile

import torch
from diffusers import DiTTransformer2DModel

diffusers_tried = list(Uninstalled.tried)  # what diffusers itself probes is not hqdm's doing

torch.manual_seed(0)
dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=1, out_channels=1,
                            num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                            norm_num_groups=32).eval()
batches = [{"x": torch.randn(2, 1, 8, 8), "t": torch.tensor([10, 900]), "y": torch.tensor([1, 2])}]
student, _ = hqdm.prepare(dit, hqdm.QuantConfig(w_bits=8, a_bits=8, timestep_buckets=1))
hqdm.calibrate(student, batches, progress=False)
with tempfile.TemporaryDirectory() as tmp:
    hqdm.export(student, tmp + "/m")
    model = hqdm.load_int(tmp + "/m")
    with torch.no_grad():
        out = model(batches[0]["x"], timestep=batches[0]["t"], class_labels=batches[0]["y"]).sample
if out.shape != (2, 1, 8, 8) or not torch.isfinite(out).all():
    raise SystemExit(f"load_int model returned {tuple(out.shape)}")
hqdm_tried = [n for n in Uninstalled.tried if n not in diffusers_tried]
if hqdm_tried:
    raise SystemExit(f"prepare -> calibrate -> export -> load_int tried to import {hqdm_tried}")
print("ok")
'''


def test_library_works_without_lightning():
    """prepare -> calibrate -> export -> load_int with Lightning unimportable; no triton / bitsandbytes at import."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
