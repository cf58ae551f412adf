"""The ``torch.compile`` backend: rewrite attention with the pass, then hand the graph on.

``torch.compile(model, backend="fx_flash")`` finds ``fx_flash_backend`` through the
``torch_dynamo_backends`` entry point (no import needed). The steps, in order:
    1. ``fuse_attention``: each attention chain in Dynamo's graph → one fx_flash op call;
    2. the inner compiler (Inductor by default) compiles the rest. AOTAutograd traces through
       the op to its custom forward/backward ops, which Inductor calls as opaque kernels.
Options go through ``fx_flash.backend(inner=..., ...)``, which returns a backend callable.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence, Union

from torch import fx

import fx_flash.ops  # noqa: F401  (registers torch.ops.fx_flash.* before any graph is compiled)
from fx_flash.codegen.autotune import set_autotune
from fx_flash.passes.fuse_attention import PassResult, run_pass

log = logging.getLogger(__name__)  # a child of "fx_flash"

Compiler = Callable[[fx.GraphModule, Sequence[Any]], Callable]


def _inner_compiler(inner: Union[str, Compiler], options: dict) -> Compiler:
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return lambda gm, inputs: compile_fx(gm, inputs, config_patches=options or None)
    if inner == "eager":
        return lambda gm, inputs: gm.forward
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(inner)  # "aot_eager", "cudagraphs", ...


def backend(
    inner: Union[str, Compiler] = "inductor",
    *,
    trust_buffers: bool = True,
    on_pass: Callable[[fx.GraphModule, PassResult], None] | None = None,
    autotune: Optional[bool] = None,
    cudagraphs: bool = False,
    **inner_options,
) -> Compiler:
    """A ``torch.compile`` backend that fuses attention, then runs ``inner``.

    Args:
        inner: "inductor" (default: the rest keeps Inductor's fusion), "eager" (run the
            rewritten graph as is), another registered backend name, or a compiler callable.
        trust_buffers: read a causal ``tril`` buffer's value from Dynamo's example inputs
            (buffers are assumed not to be mutated in place; pass False to keep such masks).
        on_pass: called with (graph module, PassResult) after the rewrite (explain uses it).
        autotune: True times the tile candidates of each new kernel key on its first call (and
            records the result on disk) instead of running the default tile derived from M; it
            sets the process-wide switch (``fx_flash.set_autotune``) when a graph is compiled,
            so it holds for every fx_flash kernel of the process, as FX_FLASH_AUTOTUNE=1 does.
            None (default) leaves the switch as it is (off unless FX_FLASH_AUTOTUNE=1).
        cudagraphs: run the compiled graphs under Inductor's CUDA graphs (the
            ``triton.cudagraphs`` config patch; the fused attention is captured with the rest).
            Inductor only. The op is capture-safe: no host synchronization, the same
            allocations on every replay, nothing timed inside a capture, and the dropout seed
            drawn by a CUDA RNG op of the graph, so each replay draws a fresh mask.
        inner_options: Inductor config patches, e.g. ``max_autotune=True``.

    Returns:
        A callable (gm, example_inputs) -> compiled callable, for ``torch.compile(backend=...)``.
    """
    if cudagraphs:
        if inner != "inductor":
            raise ValueError(f"cudagraphs=True needs inner='inductor' (Inductor's CUDA graphs), got {inner!r}")
        inner_options = {**inner_options, "triton.cudagraphs": True}
    compile_inner = _inner_compiler(inner, inner_options)

    def fx_flash_compile(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if autotune is not None:
            set_autotune(autotune)
        result = run_pass(gm, example_inputs, trust_buffers=trust_buffers)
        log.info("fx_flash: fused %d attention(s), %d softmax not fused", result.count, len(result.missed))
        if on_pass is not None:
            on_pass(gm, result)
        return compile_inner(gm, example_inputs)

    return fx_flash_compile


def fx_flash_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """The ``backend="fx_flash"`` entry point: default options (Inductor inside)."""
    return backend()(gm, example_inputs)


def _register_without_entry_point() -> None:
    """Make ``backend="fx_flash"`` work from a source checkout that was not pip-installed."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "fx_flash" in entry_points(group="torch_dynamo_backends").names or "fx_flash" in _COMPILER_FNS:
        return
    register_backend(fx_flash_backend, name="fx_flash")


_register_without_entry_point()
