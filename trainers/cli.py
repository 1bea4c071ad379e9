"""The `hqdm` command: one entry point, one vocabulary.

    hqdm fit | validate | test | predict --config run.yaml [--ckpt_path ...]   LightningCLI over DistillModule
    hqdm export | sample | report --help                                      plain typed functions (jsonargparse)

The plain commands are dispatched before LightningCLI sees the arguments.
"""

from __future__ import annotations

import sys

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from hqdm.trainers.module import DistillModule

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "hqdm"}},
}
"""Metrics go to runs/<name>/version_N/metrics.csv beside the checkpoints, sample grids and the run's config.yaml."""

PLAIN_COMMANDS = ("export", "sample", "report")

DESCRIPTION = "hqdm: quantization-aware training of low-bit diffusion models (HQ-DM, HadaNorm)."
EPILOG = (
    "more commands: hqdm export (trained student -> integer model folder), hqdm sample (PNG grid from an export, "
    "a checkpoint or a diffusers folder), hqdm report (per-layer SQNR table and plot). See hqdm <command> --help."
)


class HqdmCLI(LightningCLI):
    """LightningCLI over DistillModule; any LightningDataModule (hqdm.data.*) is picked by class_path in `data:`."""

    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        set_parsing_settings(docstring_parse_attribute_docstrings=True)  # dataclass field docstrings -> --help
        super().__init__(
            DistillModule,
            None,  # any datamodule, by class_path (hqdm.data.TeacherTrajectoryDataModule for data-free runs)
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # DistillModule builds its parameter groups itself
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION, "epilog": EPILOG},
            args=args,
            run=run,
            **kwargs,
        )


def main(args: list[str] | None = None) -> None:
    """Console entry point of `hqdm`."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in PLAIN_COMMANDS:
        from hqdm.trainers.commands import run_command

        run_command(argv[0], argv[1:])
        return
    HqdmCLI(args=args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
