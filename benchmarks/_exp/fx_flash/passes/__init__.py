"""Finding and rewriting attention chains in FX graphs (see README.md in this folder)."""

from fx_flash.passes.fuse_attention import counters, fuse_attention, run_pass

__all__ = ["counters", "fuse_attention", "run_pass"]
