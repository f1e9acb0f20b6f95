"""Triton kernels (GEMV, skinny GEMM, paged attention and K/V writes, RMSNorm, RoPE, RoPE fused with the K/V
write, greedy argmax) and a switch to run them in the interpreter without a GPU."""

import importlib
import os
import sys

import torch

# Reloaded in this order: rope_kv_write uses rope's jit helper, paged_decode paged_attention's.
KERNEL_MODULES = (
    "argmax", "gemv", "paged_attention", "paged_decode", "paged_kv_write", "rmsnorm", "rope", "rope_kv_write",
    "skinny_gemm",
)


def use_interpreter_without_gpu() -> bool:
    """Without CUDA, switch Triton to its CPU interpreter and return True; with CUDA do nothing, return False.

    Triton chooses compiled or interpreted when a `@triton.jit` function is defined, so our kernel modules
    imported before the switch are reloaded (callers reach kernels through module attributes). Triton's own
    jit helpers (tl.zeros, tl.max, ...) cannot be redefined: if triton.language was imported without
    TRITON_INTERPRET=1 this raises RuntimeError; set the variable before importing triton.
    """
    if torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        raise RuntimeError(
            "triton was imported without TRITON_INTERPRET=1 and has no GPU to run on; "
            "set TRITON_INTERPRET=1 before importing triton (tests/conftest.py does it for pytest)"
        )
    _fix_interpreter_scalar_index()
    for name in KERNEL_MODULES:
        mod = sys.modules.get(f"{__name__}.{name}")
        if mod is not None and not any(isinstance(v, InterpretedFunction) for v in vars(mod).values()):
            importlib.reload(mod)
    return True


def _fix_interpreter_scalar_index() -> None:
    """Let interpreted kernels loop over `range(tensor, tensor)` with numpy >= 2.4 (triton-lang/triton#9171).

    The interpreter holds scalars as 1-element arrays and turns them into ints with int(array), which numpy
    2.4 refuses for arrays that are not 0-d; fixed upstream after triton 3.6.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_ad_fixed", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._ad_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_scalar_index()
