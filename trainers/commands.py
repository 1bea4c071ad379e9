"""The plain `hqdm` subcommands: export, sample, report. Typed functions; jsonargparse turns them into CLIs.

A run is named by its checkpoint (`--ckpt_path`, the module is rebuilt from the hyperparameters inside) and/or its
YAML (`--config`: a config you wrote, or the config.yaml LightningCLI saved beside the checkpoints, which is found
automatically). The YAML supplies the datamodule; a config without a checkpoint gives the PTQ model (calibrated
here).

Every command checks its cheap inputs (counts, output paths, the target folder) before loading a model or
sampling data, reads checkpoints with weights_only=True, refuses non-finite weights, and writes its outputs
beside their final path before renaming them into place (`hqdm.safe_io`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from hqdm.export_format import SCHEDULER_FILE  # noqa: F401  (the file `export` writes beside the model)
from hqdm.trainers.evaluation import evaluate
from hqdm.trainers.options import Diffusion, Sampler

if TYPE_CHECKING:  # Lightning and the module are imported when a command runs, not for its --help
    from lightning.pytorch import LightningDataModule

    from hqdm.trainers.module import DistillModule


# ---- cheap checks -------------------------------------------------------------------------------------------------
def check_count(name: str, value: int, low: int = 1) -> None:
    """Raise unless `value` is an integer >= `low`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"--{name} {value!r} is not allowed; it must be an integer >= {low}.")


def check_output_file(name: str, path: str) -> Path:
    """Raise unless a file can be written at `path` (not a folder; its folder can be made and written)."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise ValueError(f"--{name} {path!r} is a folder; give a file path such as {Path(path) / 'out.png'}.")
    probe = out.with_name(f".{out.name}.{os.getpid()}.probe")
    try:  # the folder is made now (as the write would) and a file is created in it: a real check, even as root
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"--{name} {path!r} cannot be written ({err.strerror or err} in {out.parent}); choose a writable path."
        ) from err
    return out


def write_atomically(out: Path, write) -> None:
    """Call `write(tmp)` for a hidden sibling of `out`, then rename it to `out` (no half-written file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# ---- loading a run ------------------------------------------------------------------------------------------------
def parse_config(config: str, with_model: bool) -> tuple[DistillModule | None, LightningDataModule | None]:
    """Instantiate the `model` (optional) and `data` sections of a run YAML; other sections are ignored."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    from hqdm.trainers.module import DistillModule

    if not Path(config).is_file():
        raise FileNotFoundError(f"--config {config!r} does not exist.")
    try:
        raw = yaml.safe_load(Path(config).read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {config!r} is not valid YAML ({err}).") from err
    if not isinstance(raw, dict):
        raise ValueError(f"--config {config!r} holds a YAML {type(raw).__name__}, not a run config (model:, data:).")
    parser = ArgumentParser(exit_on_error=False)
    keys = ["data"]
    if with_model:
        parser.add_class_arguments(DistillModule, "model", fail_untyped=False)
        keys.append("model")
    parser.add_subclass_arguments(LightningDataModule, "data", required=False, fail_untyped=False)
    cfg = parser.parse_object({k: raw[k] for k in keys if raw.get(k) is not None})
    init = parser.instantiate_classes(cfg)
    return (init.get("model") if with_model else None), init.get("data")


def load_run(config: str | None, ckpt_path: str | None,
             device: str = "cpu") -> tuple[DistillModule, LightningDataModule | None]:
    """(module on `device`, datamodule or None) from a checkpoint and/or a run YAML."""
    from hqdm import safe_io
    from hqdm.trainers.guards import CHECKPOINT_GLOBALS, load_checkpoint, saved_config
    from hqdm.trainers.module import DistillModule

    if config is None and ckpt_path is None:
        raise ValueError("Name the run: --ckpt_path (a checkpoint of `hqdm fit`) and/or --config (a run YAML).")
    if ckpt_path is not None:
        load_checkpoint(ckpt_path)  # weights_only, memory-mapped: refuses a crafted or foreign file cheaply
        config = config or saved_config(ckpt_path)
    module, data = parse_config(config, with_model=ckpt_path is None) if config else (None, None)
    if ckpt_path is not None:
        with safe_io.allowed_globals(CHECKPOINT_GLOBALS):
            module = DistillModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
        safe_io.check_finite(module.student.state_dict(), f"--ckpt_path {ckpt_path}")
    return module.to(device).eval(), data


def _scheduler_from(folder: Path, sampler: Sampler | None):
    """The scheduler saved beside a model folder (or Diffusion()'s default), optionally as another sampler."""
    from hqdm.pipelines import saved_scheduler
    from hqdm.sampling import SCHEDULERS

    saved = saved_scheduler(folder)
    if saved is None:
        return Diffusion().sampling_scheduler(sampler)
    return saved if sampler is None else SCHEDULERS[sampler].from_config(saved.config)


# ---- export -------------------------------------------------------------------------------------------------------
def export(out_dir: str, ckpt_path: str | None = None, config: str | None = None, calibration_batches: int = 4,
           overwrite: bool = False, device: str = "cpu") -> str:
    """Write a trained student for integer inference (`hqdm.load_int`); an FP run (quant: null) via save_pretrained.

    Args:
        out_dir: the folder to create: config.json, hqdm_quant.json, model.safetensors (+ scheduler_config.json).
        ckpt_path: checkpoint of `hqdm fit`.
        config: run YAML; without a checkpoint the student is PTQ-calibrated here and exported as is.
        calibration_batches: batches the integer model is checked on against the fake-quant model (parity).
        overwrite: replace an existing out_dir; only a folder hqdm export or save_pretrained wrote is replaced.
        device: torch device.
    """
    from hqdm import safe_io
    from hqdm.trainers.run_data import command_data, val_loader

    check_count("calibration_batches", calibration_batches)
    out = Path(out_dir).expanduser()
    for note in safe_io.clean_leftovers(out):
        print(f"hqdm export: {note}")
    safe_io.check_target(out, overwrite)  # before minutes of loading, calibration or teacher sampling
    stage = safe_io.staging_dir(out)  # everything is written in here, then renamed into place
    try:
        module, datamodule = load_run(config, ckpt_path, device)
        folder = stage / "model"
        if module.mode == "fp":  # an FP run: a plain diffusers folder, e.g. a teacher for hqdm/assets
            module.student.save_pretrained(folder, safe_serialization=True)
        else:
            from hqdm.export import export as export_int

            data = command_data(module, datamodule, ckpt_path, config)  # the run's cache: never re-sampled
            module.ensure_calibrated(data)
            batches = module.calibration_batches(val_loader(data), calibration_batches)
            card = export_card(module, out.name, ckpt_path, {"out_dir": out_dir, "ckpt_path": ckpt_path,
                                                             "config": config})
            summary = export_int(module.student, folder, calibration_batches=batches, family=module.quant.family,
                                 card=card)
        module.diffusion.sampling_scheduler().save_config(folder)
        for note in safe_io.replace_dir(folder, out, overwrite):
            print(f"hqdm export: {note}")
        if module.mode != "fp":
            print(dataclasses.replace(summary, path=out) if dataclasses.is_dataclass(summary) else summary)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"hqdm export: wrote {out}")
    return str(out)


CARD_METRICS = ("val/sqnr_db", "val/sample_psnr_db", "val/sample_ssim")
"""The run's last values of these go into the export's model card."""


def export_card(module: DistillModule, name: str, ckpt_path: str | None, options: dict) -> dict:
    """What the export's README.md says about its run: source, recipe, last metrics, the command."""
    import shlex

    src = module.source
    source = src.pretrained or src.class_name
    source += f" ({src.subfolder})" if src.subfolder else ""
    source += f" + weights {src.weights}" if src.weights else ""
    recipe = {k: v for k, v in dataclasses.asdict(module.quant).items() if not isinstance(v, (list, dict))}
    recipe["rules"] = len(module.quant.rules) or None
    recipe["lora_rank"] = module.hparams.get("lora_rank") or None
    command = ["hqdm", "export"] + [part for k, v in options.items() if v is not None for part in (f"--{k}", str(v))]
    metrics = last_metrics(Path(ckpt_path).parent.parent / "metrics.csv") if ckpt_path else {}
    return {"name": name, "source": source, "recipe": recipe, "metrics": metrics, "command": shlex.join(command)}


def last_metrics(csv_path: Path) -> dict[str, float]:
    """The last logged value of each CARD_METRICS column of a run's metrics.csv (empty where there is none)."""
    import csv

    if not csv_path.is_file():
        return {}
    found: dict[str, float] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            found.update({k: float(row[k]) for k in CARD_METRICS if row.get(k) not in (None, "")})
            if any(row.get(k) not in (None, "") for k in CARD_METRICS) and row.get("step") not in (None, ""):
                found["step"] = int(float(row["step"]))
    return found


# ---- sample -------------------------------------------------------------------------------------------------------
def default_labels(num_samples: int, num_classes: int, device):
    """round(num_samples / C) images of each of the first min(C, num_samples) classes (all 0 without classes)."""
    import torch

    if not num_classes:
        return torch.zeros(num_samples, dtype=torch.long, device=device)
    shown = min(num_classes, num_samples)
    return torch.arange(shown, device=device).repeat_interleave(max(1, round(num_samples / shown)))


def load_sampler_model(model: str, config: str | None, device: str, sampler: Sampler | None = None):
    """(model, adapter, scheduler, diffusion or None) from an export folder, a checkpoint or a diffusers folder."""
    from hqdm.adapters import get_adapter
    from hqdm.runtime import MANIFEST_FILE, load_int
    from hqdm.trainers.source import load_pretrained, resolve_path

    if model.endswith(".ckpt"):
        module, _ = load_run(config, model, device)
        return module.student, module.adapter, module.diffusion.sampling_scheduler(sampler), module.diffusion
    folder = Path(resolve_path(model))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--model {model!r} is neither a checkpoint (.ckpt), an export folder (hqdm export) nor a diffusers "
            "folder (save_pretrained, or hqdm:NAME for a shipped model)."
        )
    net = load_int(folder, device) if (folder / MANIFEST_FILE).is_file() else load_pretrained(str(folder)).to(device)
    return net.eval(), get_adapter(net), _scheduler_from(folder, sampler), None


def sample(model: str, out: str = "samples.png", labels: list[int] | None = None, num_samples: int = 16,
           num_steps: int | None = None, guidance_scale: float | None = None, sampler: Sampler | None = None,
           seed: int = 0, config: str | None = None, device: str = "cpu", progress: bool = True) -> str:
    """Draw class-conditional samples and save them as a PNG grid.

    Args:
        model: an export folder (integer model, hqdm.load_int), a checkpoint of `hqdm fit` (.ckpt), or a diffusers
            folder (hqdm:digits_dit for the shipped teacher).
        out: PNG path of the grid.
        labels: class of each sample; default: about num_samples images, as many of each class.
        num_samples: images when labels are not given (a class-conditional model draws round(num_samples / C)
            of each of its first min(C, num_samples) classes, at least one).
        num_steps: sampling steps (default: the run's diffusion.num_steps, else 25).
        guidance_scale: classifier-free guidance (default: the run's, else 1 = none).
        sampler: ddim | ddpm | dpm | euler (default: the run's / the saved scheduler's).
        seed: seed of the initial noise.
        config: run YAML, only needed for a checkpoint whose config.yaml is not beside it.
        device: torch device.
        progress: show a progress bar over the steps.
    """
    import torch

    from hqdm.grids import class_rows, save_grid
    from hqdm.trainers.evaluation import draw
    from hqdm.trainers.module import class_info

    if labels is not None and not labels:
        raise ValueError("--labels [] names no class; give class ids (e.g. [1, 2]) or leave it out.")
    check_count("num_samples", num_samples)
    if num_steps is not None:
        check_count("num_steps", num_steps)
    if guidance_scale is not None and not guidance_scale >= 0:
        raise ValueError(f"--guidance_scale {guidance_scale} must be >= 0 (1 = no guidance).")
    target = check_output_file("out", out)
    net, adapter, scheduler, diffusion = load_sampler_model(model, config, device, sampler)
    num_classes, null_class = class_info(net, adapter)
    ys = torch.tensor(labels, device=device) if labels else default_labels(num_samples, num_classes, device)
    allowed = num_classes + (null_class is not None)
    if ys.numel() == 0 or int(ys.min()) < 0 or int(ys.max()) >= max(allowed, 1):
        raise ValueError(f"--labels {labels} out of range: this model takes classes 0..{max(allowed, 1) - 1}"
                         + (f" ({null_class} = unconditional)." if null_class is not None else "."))
    defaults = diffusion or Diffusion()
    images = draw(net, adapter, scheduler, ys, adapter.input_shape(net), num_steps or defaults.num_steps,
                  defaults.guidance_scale if guidance_scale is None else guidance_scale, null_class, seed, progress)
    if not torch.isfinite(images).all():
        raise ValueError(f"--model {model!r} drew non-finite images (NaN/Inf): its weights or scales are broken; "
                         "re-export it from a good checkpoint.")
    if num_classes:  # one row per class, labeled
        cells, per_row, rows = class_rows(images.cpu(), ys.tolist())
        write_atomically(target, lambda tmp: save_grid(cells, tmp, nrow=per_row, row_labels=rows))
    else:
        write_atomically(target, lambda tmp: save_grid(images.cpu(), tmp))
    print(f"hqdm sample: {len(ys)} images -> {out}")
    return out


# ---- report -------------------------------------------------------------------------------------------------------
def report(ckpt_path: str | None = None, config: str | None = None, batches: int = 4,
           plot: str = "quant_report.png", per_layer: bool = True, device: str = "cpu") -> str:
    """Per-layer SQNR of the quantized student against its FP teacher: a table on stdout and a PNG bar plot.

    Args:
        ckpt_path: checkpoint of `hqdm fit` (the trained student).
        config: run YAML; without a checkpoint the student is PTQ-calibrated here (the PTQ starting point).
        batches: validation batches the layers are compared on (timesteps stratified over the scale buckets).
        plot: PNG path of the per-layer plot.
        per_layer: print every layer, not only the per-block-type summary.
        device: torch device.
    """
    from hqdm.report import quant_report
    from hqdm.trainers.run_data import command_data, val_loader

    check_count("batches", batches)
    check_output_file("plot", plot)
    module, datamodule = load_run(config, ckpt_path, device)
    if module.mode == "fp":
        raise ValueError("This run trains an FP model (quant: null): there is no quantized student to report on.")
    data = command_data(module, datamodule, ckpt_path, config)
    state = "PTQ, calibrated now" if module.ensure_calibrated(data) else f"checkpoint {ckpt_path}"
    eval_batches = module.calibration_batches(val_loader(data), batches)
    result = quant_report(module.student, module.teacher, eval_batches, family=module.quant.family, plot=plot)
    print(f"hqdm report ({state}; {len(eval_batches)} batches):")
    print(result.table(per_layer=per_layer))
    print(f"plot: {plot}")
    return plot


COMMANDS = {"export": export, "sample": sample, "report": report, "evaluate": evaluate}


def run_command(name: str, args: list[str], debug: bool = False) -> None:
    """Parse `args` for command `name`, run it, and turn expected errors into one clear line (exit code 2).

    Expected errors are bad values, missing, unreadable or crafted files, unwritable targets
    (`cli.expected_errors()` and argument errors); `debug` re-raises them with their traceback.
    """
    from jsonargparse import CLI, ArgumentError

    from hqdm.trainers.cli import expected_errors, fail, help_docs

    help_docs(args)
    try:
        CLI(COMMANDS[name], args=args, as_positional=False, prog=f"hqdm {name}", allow_abbrev=False,
            exit_on_error=False)
    except Exception as err:
        if debug or not isinstance(err, (*expected_errors(), ArgumentError)):  # anything else is a bug: traceback
            raise
        fail(name, err)
