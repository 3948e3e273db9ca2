"""Logging setup shared by every program: one format, rank-aware, quiet non-zero ranks."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(name: str = "stage2", rank: int | None = None, level: int = logging.INFO) -> logging.Logger:
    """Configure the root logger once. Non-zero ranks log warnings and errors only."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    fmt = f"%(asctime)s [%(levelname)s] [rank{rank}] %(name)s: %(message)s"
    root = logging.getLogger()
    if not getattr(root, "_stage2_configured", False):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
        root.handlers[:] = [handler]
        root._stage2_configured = True  # type: ignore[attr-defined]
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    return logging.getLogger(name)
