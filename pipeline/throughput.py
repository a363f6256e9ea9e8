"""How fast a run goes: tokens/s, TFLOP/s per GPU and MFU of a step, and the start-up timing records.

FLOPs come from `pipeline/model/sizes.py` (Megatron's convention, docs/performance.md); the records go
to the metrics logger (`pipeline/metrics.py`). MFU is always against the GPU's dense BF16 peak, whatever
the precision, so FP8 and BF16 runs compare on one scale (README, Metrics).
"""

import time

import numpy as np
import psutil
import torch

from pipeline.model.config import ModelConfig
from pipeline.model.sizes import flops_per_step

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "B200": 2250.0, "GB200": 2500.0}
"""Dense BF16 tensor-core peak per GPU (the longest name found in the device name wins), from NVIDIA's
data sheets."""
STEADY_AFTER = 10
"""Steps timed before the steady step time is reported (the first pays for autotuning and graphs)."""


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense BF16 peak of a GPU by its name, or None when unknown (MFU is then not reported)."""
    for name in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if name in device_name:
            return BF16_PEAK_TFLOPS[name]
    return None


def step_throughput(model: ModelConfig, seq_length: int, global_batch: int, world_size: int,
                    device: torch.device, seconds: float) -> dict:
    """The throughput record of one optimizer step that took `seconds`: tokens/s, TFLOP/s per GPU (per
    process on CPU), MFU and peak memory on a GPU, resident memory on CPU."""
    record = {"tokens_per_s": global_batch * seq_length / seconds}
    tflops = flops_per_step(model, seq_length, global_batch) / seconds / world_size / 1e12
    record["tflops_per_gpu" if device.type == "cuda" else "tflops_per_process"] = tflops
    if device.type == "cuda":
        peak = bf16_peak_tflops(torch.cuda.get_device_name())
        if peak:
            record["mfu"] = tflops / peak
        record["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        record["rss_gib"] = psutil.Process().memory_info().rss / 2**30
    return record


_origin: float | None = None
"""When the work now starting began (`start_clock`); None = when the process started."""


def start_clock() -> None:
    """Count the next run's start-up from now: a later step of a multi-step command (`compress all`)."""
    global _origin
    _origin = time.time()


class StartupTiming:
    """Start-up (the start of the run to its first step) and first step time, then the steady step time
    (median of steps 2..STEADY_AFTER), logged as `timing` records: the first step pays for kernel
    autotuning (kernel_cache) and CUDA graph capture.

    The start of a run is the process start for the first run of a process (imports included), the
    last `start_clock()` when one came later (`compress all` marks each step), and `entered` (when
    `train` was called) for any later run of the same process (`rank`'s candidates, `distill`)."""

    _runs = 0
    """Runs timed in this process so far."""

    def __init__(self, log, entered: float):
        self._log = log
        if StartupTiming._runs:
            origin = entered
        else:
            origin = _origin if _origin is not None else psutil.Process().create_time()
        StartupTiming._runs += 1
        self._startup = time.time() - origin
        self._steps: list[float] = []

    def step_done(self, seconds: float, step: int) -> int:
        """Record one step's wall time; returns how many this invocation has run."""
        self._steps.append(seconds)
        n = len(self._steps)
        if n == 1:
            self._log.log(step, {"startup_s": self._startup, "first_step_s": seconds}, kind="timing")
        elif n == STEADY_AFTER:
            steady = float(np.median(self._steps[1:]))
            self._log.log(step, {"steady_step_s": steady, "first_step_vs_steady": self._steps[0] / steady},
                          kind="timing")
        return n
