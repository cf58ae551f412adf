"""Generated source → importable module, cached on disk by the spec's key.

``@triton.jit`` reads its function's source file, so rendered kernels must live in real files:
each spec's module is written to ``$FX_FLASH_CACHE_DIR`` (default ``~/.cache/fx_flash``) under
its key and its source's hash with an atomic rename, as Inductor does, then imported once per
process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from fx_flash.codegen.generate import render
from fx_flash.codegen.spec import AttentionSpec

log = logging.getLogger("fx_flash")
_modules: dict[str, ModuleType] = {}
_lock = threading.Lock()


def cache_root() -> Path:
    """fx_flash's on-disk cache: ``$FX_FLASH_CACHE_DIR``, default ``~/.cache/fx_flash``."""
    return Path(os.environ.get("FX_FLASH_CACHE_DIR") or os.path.join(Path.home(), ".cache", "fx_flash"))


def cache_dir() -> Path:
    """Where generated kernel sources are written."""
    return cache_root() / "kernels"


def source_path(spec: AttentionSpec, source: str) -> Path:
    """The file holding ``spec``'s generated ``source``: named by the spec's key and the source's
    own hash, so two fx_flash versions sharing a cache never overwrite each other's kernels."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    return cache_dir() / f"fx_flash_{spec.key}_{digest}.py"


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that concurrent readers see the old file or the whole new
    one, never half: a temporary file in the same directory, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a failed write leaves no stray temporary file
        raise


def load(spec: AttentionSpec) -> ModuleType:
    """The imported module of ``spec``'s kernels, generating its source if needed."""
    with _lock:
        module = _modules.get(spec.key)
        if module is not None:
            return module
        source = render(spec)
        path = source_path(spec, source)
        if not path.exists():
            write_atomically(path, source)
            log.debug("generated %s for %s", path, spec.describe())
        import_spec = importlib.util.spec_from_file_location(f"fx_flash_generated_{spec.key}", path)
        module = importlib.util.module_from_spec(import_spec)
        import_spec.loader.exec_module(module)
        _modules[spec.key] = module
        return module
