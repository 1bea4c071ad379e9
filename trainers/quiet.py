"""Known-harmless notices of other libraries that every `hqdm` command would print, silenced one by one by message.

Nothing else is silenced: any other warning or log record of these libraries still shows. Each entry says why the
notice does not apply to hqdm.
"""

from __future__ import annotations

import logging
import re
import warnings

LOG_NOTICES = {
    # diffusers imports bitsandbytes whenever it is installed (its quantizers); hqdm uses it only for adamw8bit, and
    # bitsandbytes' optional CPU 4-bit kernel is never called
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
    # hqdm's models are small or loaded once; diffusers falls back to a plain load, which is what hqdm wants
    "diffusers.models.modeling_utils": r"Cannot initialize model with low cpu memory usage because `accelerate`",
    # an advertisement, printed by every Trainer that has no LitLogger
    "lightning.pytorch.utilities.rank_zero": r"💡 Tip: For seamless cloud logging",
    "lightning.fabric.utilities.rank_zero": r"💡 Tip: For seamless cloud logging",
    "lightning_utilities.core.rank_zero": r"💡 Tip: For seamless cloud logging",
}
"""Logger name -> regular expression of the one record silenced on it."""

WARNING_NOTICES = (
    # Lightning's own use of a torch API that torch deprecated; nothing a user of hqdm can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # the frozen teacher is in eval mode on purpose (DESIGN §4): always eval, never trained
    r"Found \d+ module\(s\) in eval mode at the start of training",
)
"""Regular expressions of the warnings silenced (any category)."""


class DropMessage(logging.Filter):
    """Drop the log records whose message matches `pattern`; let every other record through."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_known_notices() -> None:
    """Install the filters above (once; loggers are configured before their libraries are imported)."""
    for name, pattern in LOG_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(DropMessage(pattern))
    for pattern in WARNING_NOTICES:
        warnings.filterwarnings("ignore", message=pattern)
