"""Build time per stage of the compile pipeline for the bundled SmolLM2 on this machine (prints a table)."""

import argparse
import platform
import time
from collections import defaultdict

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--until", default="post_load_fusion", help="last stage to run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default: all 30)")
    opts = parser.parse_args()

    from ad_compiler.export.pipeline import compile_until, factory_from_args
    from ad_compiler.models.bundled import bundled_model_dir
    from ad_compiler.transform.interface import SharedConfig
    from ad_config import load_llm_args

    t0 = time.perf_counter()
    bundled_model_dir()  # the one-time GGUF conversion is not part of a build
    prepare = time.perf_counter() - t0
    kwargs = {"model_kwargs": {"num_hidden_layers": opts.layers}} if opts.layers else {}
    args = load_llm_args(device=opts.device, **kwargs)
    start = time.perf_counter()
    result = compile_until(factory_from_args(args), args.transforms, until=opts.until,
                           shared_config=SharedConfig(device=opts.device), allow_unregistered=True)
    total = time.perf_counter() - start

    per_stage: dict[str, float] = defaultdict(float)
    for info in result.history.values():
        per_stage[info.stage] += info.seconds
    print(f"machine: {platform.node()} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, device {opts.device}")
    print(f"bundled model cache check/convert: {prepare:.2f}s")
    print(f"{'stage':<18}{'seconds':>10}")
    for stage, secs in per_stage.items():
        print(f"{stage:<18}{secs:>10.2f}")
    print(f"{'total':<18}{total:>10.2f}")


if __name__ == "__main__":
    main()
