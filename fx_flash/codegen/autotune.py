"""Tuning: the fastest of tiling's candidates for one kernel and tuning key, kept in memory and on disk.

The stage between tiling (which derives the candidates from M) and launch (which runs the
choice). Off unless asked for (``set_autotune(True)`` or FX_FLASH_AUTOTUNE=1): launches then run
tiling's default tile without timing. When on, each key is benchmarked once and its record written as a small JSON file under
``$FX_FLASH_CACHE_DIR/autotune`` (default ``~/.cache/fx_flash/autotune``), so a new process
launches the tuned tile at once instead of re-timing every candidate. FX_FLASH_AUTOTUNE_CACHE=0
keeps choices in memory only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from fx_flash.codegen import loader
from fx_flash.codegen.tiling import TileConfig

log = logging.getLogger("fx_flash")

# Bumped when the record's layout changes: older records then miss instead of misreading.
# 2: launch keys gained waves_bucket; a format-1 record was tuned on whatever batch came first.
FORMAT = 2


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Triton's errors for a configuration that cannot be built or loaded on this device (too
    much shared memory, too many threads, ptxas failures), looked up by name so that Triton
    versions lacking one of them still import this module."""
    found = []
    for module, name in (("triton.runtime.errors", "OutOfResources"), ("triton.runtime.errors", "PTXASError"),
                         ("triton.compiler.errors", "CompilationError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


# A candidate that raises one of these scores inf; any other exception is a bug and propagates.
COMPILE_ERRORS = _compile_errors()


class TuningError(RuntimeError):
    """No candidate configuration of a kernel could run."""


_memory: dict[str, TileConfig] = {}  # canonical key text → chosen configuration
_lock = threading.Lock()


_requested: Optional[bool] = None  # set_autotune's setting; None follows FX_FLASH_AUTOTUNE


def set_autotune(enabled: Optional[bool]) -> Optional[bool]:
    """Turn tuning on (True) or off (False) in this process, or back to FX_FLASH_AUTOTUNE (None).

    Off (the default) every launch runs the tile ``tiling.default_config`` derives from M and
    occupancy; on, the first call of each tuning key times the candidates (or reads their record
    from disk). Returns the previous setting. Public as ``fx_flash.set_autotune``.
    """
    global _requested
    previous, _requested = _requested, None if enabled is None else bool(enabled)
    return previous


def setting() -> Optional[bool]:
    """set_autotune's setting (None: FX_FLASH_AUTOTUNE decides), for keys that must change with it."""
    return _requested


def requested() -> bool:
    """Whether tuning is on: set_autotune's setting, else FX_FLASH_AUTOTUNE=1 (off by default)."""
    if _requested is not None:
        return _requested
    return os.environ.get("FX_FLASH_AUTOTUNE", "0") == "1"


def disk_cache_enabled() -> bool:
    """Records are read from and written to disk unless FX_FLASH_AUTOTUNE_CACHE=0."""
    return os.environ.get("FX_FLASH_AUTOTUNE_CACHE", "1") != "0"


def cache_dir() -> Path:
    """Where tuning records are written: ``autotune/`` under fx_flash's cache root."""
    return loader.cache_root() / "autotune"


def full_key(kernel_id: str, key: Mapping[str, object], candidates: Sequence[TileConfig]) -> dict:
    """The whole key a record is stored under: the caller's fields, the kernel and the
    candidate list (a change in tiling's candidates must miss, not reuse an old winner)."""
    return {**key, "format": FORMAT, "kernel": kernel_id,
            "candidates": [dataclasses.asdict(c) for c in candidates]}


def waves_bucket(grid: Sequence[int], multiprocessors: int) -> int:
    """The occupancy field of a launch's key: the power of two at or above the number of waves,
    ceil(programs / multiprocessors), in which the device runs the programs of ``grid``.

    Programs per SM decide whether a bigger tile starves the GPU: with few batch·heads a large
    tile leaves SMs idle, with many its data reuse wins (the tile tuned on a (1, 4, 1024, 64)
    forward ran (16, 32, 1024, 64) at 166 TFLOP/s against 377 for its own, on an H200). The
    caller passes the grid at MIN_BLOCK tiles, not at a candidate's, so that one launch has one
    key; a candidate whose resident tile is k times MIN_BLOCK starts about 1/k of its programs.
    Powers of two, as for the sequence lengths: batches within a factor of two share a result.
    """
    waves = -(-max(math.prod(grid), 1) // max(multiprocessors, 1))
    return 1 << (waves - 1).bit_length()


def _canonical(key: Mapping[str, object]) -> str:
    # Tuples and lists print alike, so a key read back from JSON compares equal to the original.
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def record_path(kernel_id: str, key: Mapping[str, object], candidates: Sequence[TileConfig]) -> Path:
    """The JSON file holding the record of ``key``: named by the kernel and the key's hash."""
    return _path(kernel_id, _canonical(full_key(kernel_id, key, candidates)))


def _path(kernel_id: str, text: str) -> Path:
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    return cache_dir() / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', kernel_id)}-{digest}.json"


def clear_memory() -> None:
    """Forget this process's choices (the disk records stay)."""
    with _lock:
        _memory.clear()


def lookup(kernel_id: str, key: Mapping[str, object], candidates: Sequence[TileConfig]) -> Optional[TileConfig]:
    """The choice for ``key`` from memory or from its disk record, or None: never benchmarks
    (a launch inside a CUDA graph capture asks this, where nothing may be timed)."""
    candidates = list(candidates)
    text = _canonical(full_key(kernel_id, key, candidates))
    with _lock:
        chosen = _memory.get(text)
        if chosen is None and disk_cache_enabled():
            chosen = _read(_path(kernel_id, text), text, candidates)
            if chosen is not None:
                _memory[text] = chosen
        return chosen


def choose(kernel_id: str, key: Mapping[str, object], candidates: Sequence[TileConfig],
           bench: Callable[[TileConfig], float]) -> TileConfig:
    """The fastest of ``candidates`` for ``key``: from memory, else from disk, else benchmarked.

    Args:
        kernel_id: the kernel's name; part of the key and of the record's file name.
        key: JSON-serializable fields that change the answer (source hash, device, versions,
            dtype, head dim, sequence-length buckets, waves_bucket, ...). Everything not in it
            is assumed not to matter: two calls with equal keys share one result.
        candidates: configurations to try, in preference order (ties go to the earlier one).
        bench: runs one configuration and returns its time in ms. A configuration that raises
            one of COMPILE_ERRORS, or returns inf or nan, is skipped.

    Raises:
        TuningError: every candidate failed (the message lists each one's reason).
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError(f"no candidate configurations to tune {kernel_id} over")
    full = full_key(kernel_id, key, candidates)
    text = _canonical(full)
    with _lock:
        chosen = _memory.get(text)
        if chosen is not None:
            return chosen
        path = _path(kernel_id, text)
        use_disk = disk_cache_enabled()
        chosen = _read(path, text, candidates) if use_disk else None
        if chosen is None:
            chosen, timings = _benchmark(kernel_id, candidates, bench)
            if use_disk:
                _write(path, full, chosen, timings)
        _memory[text] = chosen
        return chosen


def _benchmark(kernel_id: str, candidates: list[TileConfig], bench) -> tuple[TileConfig, list[dict]]:
    timings, errors = [], []
    for config in candidates:
        entry = {"config": dataclasses.asdict(config), "ms": None}
        try:
            ms = float(bench(config))
        except COMPILE_ERRORS as e:
            entry["error"] = f"{type(e).__name__}: {e}"
            errors.append(e)
        else:
            if math.isfinite(ms):
                entry["ms"] = ms
            else:
                entry["error"] = f"bench returned {ms}"
        timings.append(entry)
    ran = [(t["ms"], i) for i, t in enumerate(timings) if t["ms"] is not None]
    if not ran:
        reasons = "; ".join(f"{c}: {t['error']}" for c, t in zip(candidates, timings))
        cause = errors[-1] if errors else None
        raise TuningError(f"no configuration of {kernel_id} could run ({reasons})") from cause
    best = candidates[min(ran)[1]]
    log.debug("autotuned %s: %s of %d candidates (%s)", kernel_id, best, len(candidates),
              ", ".join(f"{c}: {t['ms']}" for c, t in zip(candidates, timings)))
    return best, timings


def _read(path: Path, text: str, candidates: list[TileConfig]) -> Optional[TileConfig]:
    """The record's choice, or None when the file is absent, unreadable, half-written, or
    belongs to another key (a hash collision, or an edited file): those are misses."""
    try:
        record = json.loads(path.read_text())
        if _canonical(record["key"]) != text:
            return None
        best = TileConfig(**record["best"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable autotune record %s (%s: %s)", path, type(e).__name__, e)
        return None
    return best if best in candidates else None


def _write(path: Path, key: dict, best: TileConfig, timings: list[dict]) -> None:
    record = {"key": key, "best": dataclasses.asdict(best), "timings": timings,
              "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        loader.write_atomically(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    except OSError as e:  # a read-only cache costs a re-tune in the next process, not this call
        log.warning("could not write autotune record %s: %s", path, e)
