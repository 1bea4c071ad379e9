"""Any nn.Module without a family: every Linear / Conv2d / ConvTranspose2d / MultiheadAttention at the configured
bits except the first and the last layer (module order, at `end_bits`), called as its `CallSpec` declares."""

from __future__ import annotations

from hqdm.adapters.base import Adapter

GENERIC = Adapter(name="generic", end_by_position=True)
"""`model(x, t)` by default; declare anything else (labels, text, time convention) with a CallSpec."""
