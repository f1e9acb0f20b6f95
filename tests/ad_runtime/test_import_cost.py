"""Importing ad_runtime (every CLI, every spawned rank) does not import torch's compiler stack (~5 s here)."""

import subprocess
import sys


def test_import_ad_runtime_leaves_inductor_and_dynamo_unimported() -> None:
    code = ("import sys, ad_runtime; "
            "print(sorted(m for m in ('torch._inductor.lowering', 'torch._dynamo.convert_frame') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
