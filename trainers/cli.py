"""The `hqdm` command: one entry point, one vocabulary.

    hqdm fit | validate | test | predict --config run.yaml [--ckpt_path ...]   LightningCLI over DistillModule
    hqdm export | sample | report --help                                      plain typed functions (jsonargparse)

`hqdm --help` is answered here without building a parser; the plain commands are dispatched before Lightning
is imported, and LightningCLI (`hqdm.trainers.lightning_cli`) is imported only for its own four commands.
Every command reads checkpoints with weights_only=True, refuses a --ckpt_path whose options differ from the
run's (`guards.check_resume`), stops a fit on NaN / Inf (`guards.FiniteGuard`), and turns expected errors into
one line on stderr with a nonzero exit code; `--debug` (or HQDM_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError

from hqdm.trainers.quiet import silence_known_notices

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "hqdm"}},
}
"""Metrics go to runs/<name>/version_N/metrics.csv beside the checkpoints, sample grids and the run's config.yaml."""

PLAIN_COMMANDS = ("export", "sample", "report", "evaluate")
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

DESCRIPTION = "hqdm: quantization-aware training of low-bit diffusion models (HQ-DM, HadaNorm)."
COMMANDS = {
    "fit": "PTQ-calibrate the student, then distill it from its FP teacher (--ckpt_path resumes a run)",
    "validate": "one validation pass of a checkpoint, or of the PTQ model without one (SQNR, PSNR/SSIM, grids)",
    "test": "one test pass, as validate, on the datamodule's test split",
    "predict": "the student's predictions on the datamodule's predict split",
    "export": "trained student -> integer model folder (config.json, hqdm_quant.json, weights, README.md card)",
    "sample": "PNG grid (a row per class) from an export, a checkpoint or a diffusers folder",
    "report": "per-layer SQNR of the student against its teacher: a table and a bar plot",
    "evaluate": "FID, KID, IS, precision/recall, class agreement, PSNR/SSIM of samples, the FP model beside (JSON)",
}
"""One line per subcommand for `hqdm --help`; fit / validate / test / predict are LightningCLI's, the rest plain."""


def top_help() -> str:
    """`hqdm --help`: every subcommand with one line, without building any parser (it returns at once)."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: hqdm {{{','.join(COMMANDS)}}} [options]", "", DESCRIPTION, "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "`hqdm <command> --help` lists a command's options (`hqdm fit --help`: every trainer, model, "
              "model.quant and data option).", "`hqdm fit --config run.yaml --print_config` prints a run's complete "
              "configuration. Errors print one line; --debug (or HQDM_DEBUG=1) shows the traceback."]
    return "\n".join(lines)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors of bad input, missing or unreadable files, unsupported setups and diverged runs: one line, no traceback.

    A function, not a constant: its classes come from torch and Lightning, which `hqdm --help` never imports.
    """
    import torch
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from hqdm.trainers import guards

    return (ValueError, OSError, ArgumentError, MisconfigurationException, guards.NonFiniteError,
            torch.OutOfMemoryError)


def help_requested(argv) -> bool:
    """Whether `argv` asks for help or for a printed config (the only times option docstrings are read)."""
    return any(a in ("-h", "--help") or a.startswith("--print_config") or a.endswith(".help")
               for a in map(str, argv or []))


def help_docs(argv) -> None:
    """Read dataclass field docstrings (for --help) only when help is asked for: it costs ~2 s per command."""
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=help_requested(argv))


def debug_requested(argv: list[str]) -> bool:
    """`--debug` among the arguments, or HQDM_DEBUG set to anything but '' / '0'."""
    return "--debug" in argv or os.environ.get("HQDM_DEBUG", "") not in ("", "0")


def short_message(err: BaseException) -> str:
    """The message of `err`, without jsonargparse's listing of the Union members a value did not fit."""
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    if "Does not validate against any of the Union subtypes" in text and "Errors:" in text:
        key = re.search(r'Parser key "([^"]+)"', text)
        body = text.split("Errors:", 1)[1].split("Given value type:", 1)[0]
        reasons = [" ".join(r.split()) for r in re.split(r"^\s*- ", body, flags=re.M)
                   if r.strip() and not r.strip().startswith("Expected a <class 'NoneType'>")]
        given = re.search(r"^\s*Given value: (.+)$", text, re.M)
        text = (f"{key.group(1)}: " if key else "") + "; ".join(reasons)
        if given and "Got value" not in text and "=" not in text:
            text += f"; got {given.group(1)[:100]}"
    if isinstance(err, ArgumentError) or text.startswith("Parser key"):
        text = " ".join(text.split())
        text = re.sub(r"arguments are required: (.+)",
                      lambda m: "arguments are required: " + ", ".join(
                          a.strip() if a.strip().startswith("-") else f"--{a.strip()}" for a in m[1].split(",")), text)
    if isinstance(err, ArgumentError):
        text = f"{text} (see --help)"
    return text


def fail(command: str, err: BaseException) -> None:
    """Print one line for an expected error and exit: 3 for a run stopped on NaN / Inf, 2 otherwise."""
    from hqdm.trainers.guards import NonFiniteError

    print(f"hqdm {command}: error: {short_message(err)}", file=sys.stderr)
    sys.exit(3 if isinstance(err, NonFiniteError) else 2)


def main(args: list[str] | None = None) -> None:
    """Console entry point of `hqdm`."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(top_help(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    command = argv[0] if not argv[0].startswith("-") else "hqdm"
    silence_known_notices()
    try:
        if os.environ.get("HQDM_PLUGINS"):  # modules that register the user's model classes and adapters
            from hqdm.adapters import load_plugins

            load_plugins()
        if argv[0] in PLAIN_COMMANDS:
            from hqdm.trainers.commands import run_command

            run_command(argv[0], argv[1:], debug=debug)
            return
        from hqdm.trainers.lightning_cli import HqdmCLI

        if args is None:
            sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (passing args as well makes it warn)
            HqdmCLI()
        else:
            HqdmCLI(args=argv)
    except Exception as err:
        if debug or not isinstance(err, expected_errors()):
            raise
        fail(command, err)


if __name__ == "__main__":
    main()
