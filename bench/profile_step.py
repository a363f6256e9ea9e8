"""Where a training step's GPU time goes: the bare megatron-core step of bench/train.py under
torch.profiler, top CUDA kernels and time per kernel family, and how busy the GPU is.

    python bench/profile_step.py --preset bench_1p5b --run bf16+graphs [--steps 2] [--kernel-cache DIR]

A GPU busy fraction near 100% means the step is bound by the kernels (make them faster); well below,
the CPU does not launch work fast enough (launch-bound: CUDA graphs help).
"""

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path[0] = str(REPO)

from bench.train import GLOBAL, SEQ, bare_setup, bare_step, overrides  # noqa: E402

FAMILIES = (  # first match wins; names as the CUDA kernels are called on Hopper
    ("attention", r"fmha|flash|cudnn|attn"),
    ("GEMM", r"gemm|cutlass|xmma|nvjet|cublas|wgmma"),
    ("Mamba SSD (Triton)", r"chunk|state_passing|bmm"),
    ("conv1d", r"conv1d"),
    ("norms", r"norm"),
    ("cross entropy", r"cross_entropy|softmax"),
    ("optimizer", r"multi_tensor|adam"),
    ("FP8 casts", r"cast|quantize|amax|transpose"),
)


def family(name: str) -> str:
    for label, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other (elementwise, copies)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench_1p5b")
    parser.add_argument("--run", default="bf16+graphs", help="as in bench/train.py, e.g. fp8_delayed+graphs")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (after 2 unprofiled ones)")
    parser.add_argument("--kernel-cache", type=Path, default=Path("/tmp/bench_profile/kernel_cache"))
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.config import load_run_config
    from pipeline.distributed import distributed
    from pipeline.model.build import release_cuda_graphs
    from pipeline.training.kernel_cache import KernelCache

    run = load_run_config(overrides(args.preset, args.run, REPO / "data" / "build", 1, Path("/tmp/bench_profile/run"),
                                    args.kernel_cache))
    with distributed(run.parallel, None, "cuda") as world:
        chunks, optimizer, micro_batches = bare_setup(run, world)
        KernelCache.open(args.kernel_cache)
        for _ in range(2):
            bare_step(chunks, optimizer, micro_batches)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            started = time.perf_counter()
            for _ in range(args.steps):
                bare_step(chunks, optimizer, micro_batches)
            wall = (time.perf_counter() - started) / args.steps
        if run.train.cuda_graphs:
            release_cuda_graphs()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_step = {e.key: e.self_device_time_total / 1e6 / args.steps for e in kernels}
    busy = sum(per_step.values())
    by_family = defaultdict(float)
    for name, seconds in per_step.items():
        by_family[family(name)] += seconds
    print(f"\n{args.preset} {args.run}: step {wall * 1000:.0f} ms wall, kernels {busy * 1000:.0f} ms "
          f"(GPU busy {busy / wall:.0%}), {GLOBAL} x {SEQ} tokens")
    print(f"{'kernel family':<32}{'ms/step':>9}{'share':>8}")
    for label, seconds in sorted(by_family.items(), key=lambda kv: -kv[1]):
        print(f"{label:<32}{seconds * 1000:>9.1f}{seconds / busy:>8.1%}")
    print(f"\n{'top kernels':<72}{'ms/step':>9}{'share':>8}")
    for name, seconds in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{name[:70]:<72}{seconds * 1000:>9.1f}{seconds / busy:>8.1%}")


if __name__ == "__main__":
    main()
