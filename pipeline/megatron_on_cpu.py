"""Running megatron-core 0.19.2's CUDA-only code paths on CPU: the portable backend's one patch.

megatron-core 0.19 hard-codes CUDA in code the CPU backend needs (DDP grad buffers, the optimizers'
found-inf flags and dtype checks, grad clipping, the pipeline schedules' token counters, p2p
shapes, checkpoint saving). Rather than copying those modules, `cpu_mode()` runs them unchanged
with narrow redirections, active only inside the context and only on CPU runs
(`pipeline.distributed` enters it):

1. A TorchFunctionMode that turns `device="cuda"` / `device=<int>` arguments into the CPU, and
   `tensor.cuda()` into a no-op (e.g. `torch.zeros(1, device="cuda")` in clip_grads.py,
   `device=torch.cuda.current_device()` in param_and_grad_buffer.py).
2. `torch.cuda.current_device()` returns 0, `torch.cuda.synchronize()` does nothing and
   `torch.cuda.current_stream()` is a stream that never waits, instead of failing to find a
   driver (schedules, p2p_communication.py, filesystem_async.py, param_and_grad_buffer.py).
3. `tensor.type()` (no arguments) reports `torch.cuda.*Tensor` names, because the optimizers sort
   parameters into fp32/bf16 groups by comparing against those strings (optimizer.py,
   distrib_optimizer.py) and reject anything else.
4. For MoE layers with expert parallelism: the all-to-all dispatcher's side stream and its
   split sizes (moe/token_dispatcher.py), and the backward of the communication functions
   (tensor_parallel/mappings.py), which the TorchFunctionMode does not reach.
5. Activation recompute (`train.recompute`, tensor_parallel/random.py): the CUDA RNG state the
   checkpoints save and restore, the recomputation that runs inside the backward (outside the
   mode), and `CheckpointWithoutOutput`'s FP8 flag (`_recompute_on_cpu`).

Remove each redirection when megatron-core takes the device from its tensors instead of assuming
CUDA at the places named (checked against 0.19.2); tests/distributed run every one of those paths.
Other patches live beside the code that needs them: the checkpoint's in `pipeline/checkpoint/`.
"""

from contextlib import contextmanager, nullcontext

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for the CUDA stream on CPU, where every operation is already synchronous."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None) -> "_NullStream":
        # The event of a stream that never waits: its synchronize() returns at once.
        return self


def _split_sizes_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    # megatron-core 0.19.2 moe_utils.maybe_move_tensor_to_cpu converts only CUDA tensors, so on CPU
    # the all-to-all dispatcher's split sizes stay tensors and all_to_all_single rejects them; give
    # them the numpy form the GPU path produces. Remove when megatron converts CPU tensors too.
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _backwards_on_cpu() -> dict:
    """Run the backward of megatron's communication autograd Functions (tensor_parallel/mappings.py,
    and the linear layers' tensor_parallel/layers.py) under the CUDA-to-CPU mode too; return the
    original backwards to restore.

    The mode does not reach into autograd's backward pass, and the MoE all-to-all's backward
    allocates its output with `device=torch.cuda.current_device()` (megatron-core 0.19.2 _AllToAll;
    seen as "Found no NVIDIA driver" in the first backward with parallel.ep=2), as does the linear
    layers' backward under sequence parallel (the reduce-scattered input gradient).
    """
    from megatron.core.tensor_parallel import layers, mappings

    originals = {}
    for function in [*vars(mappings).values(), *vars(layers).values()]:
        if (isinstance(function, type) and issubclass(function, torch.autograd.Function)
                and "backward" in vars(function)):
            originals[function] = vars(function)["backward"]

            def backward(ctx, *grads, _original=function.backward):
                with _CudaToCpu():
                    return _original(ctx, *grads)

            function.backward = staticmethod(backward)
    return originals


def _no_cuda_rng_state(*args, **kwargs) -> None:
    return None


def _recompute_on_cpu() -> list[tuple[object, str, object]]:
    """Make megatron-core's activation checkpoints (tensor_parallel/random.py) run on CPU; return
    (owner, attribute, original) to restore.

    - `_get_cuda_rng_state` / `_set_cuda_rng_state`: the checkpoints save the CUDA generator beside
      the CPU one to replay dropout; there is none on CPU ("Found no NVIDIA driver").
    - `CudaRNGStatesTracker.add` reads that generator too; on CPU it records the name and seed only
      (these models have no dropout, so no state is ever drawn from).
    - `CheckpointFunction.backward` and `CheckpointWithoutOutput._recompute` run the forward again
      inside the backward, where the CUDA-to-CPU mode does not reach (the MoE router moves its
      weight to `torch.cuda.current_device()` there).
    - `CheckpointWithoutOutput.__init__`: 0.19.2 sets `self.fp8 = fp8 is not None`, true for its
      default `fp8=False`, and its FP8 branch names Transformer Engine's FP8GlobalStateManager
      (NameError without TE). CPU runs have no FP8.
    Remove each when megatron-core takes the device from its tensors and fixes the flag.
    """
    from megatron.core.tensor_parallel import random as tp_random

    saved = []

    def patch(owner, name, value):
        saved.append((owner, name, vars(owner)[name]))
        setattr(owner, name, value)

    patch(tp_random, "_get_cuda_rng_state", _no_cuda_rng_state)
    patch(tp_random, "_set_cuda_rng_state", _no_cuda_rng_state)

    def add(self, name, seed):
        # `model_parallel_cuda_manual_seed` registers the named states that `fork()` needs (the
        # embedding forks under sequence parallel) by reading the CUDA generator directly.
        if seed in self.seeds_ or name in self.states_:
            raise Exception(f"cuda rng state {name} or seed {seed} already exists")
        self.seeds_.add(seed)
        self.states_[name] = None

    patch(tp_random.CudaRNGStatesTracker, "add", add)
    original_backward = tp_random.CheckpointFunction.backward

    def backward(ctx, *grads):
        with _CudaToCpu():
            return original_backward(ctx, *grads)

    patch(tp_random.CheckpointFunction, "backward", staticmethod(backward))
    original_recompute = tp_random.CheckpointWithoutOutput._recompute

    def recompute(self, grad):
        with _CudaToCpu():
            return original_recompute(self, grad)

    patch(tp_random.CheckpointWithoutOutput, "_recompute", recompute)
    original_init = tp_random.CheckpointWithoutOutput.__init__

    def init(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = False

    patch(tp_random.CheckpointWithoutOutput, "__init__", init)
    return saved


@contextmanager
def cpu_mode():
    """Run megatron-core's CUDA-assuming code on CPU (see the module docstring)."""
    from megatron.core.transformer.moe import token_dispatcher

    saved = torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.current_stream
    # megatron-core 0.19.2's MoE all-to-all dispatcher makes a side stream for its device-to-host
    # copies and enters it (moe/token_dispatcher.py, MoEAlltoAllTokenDispatcher); on CPU both are
    # no-ops. Remove when megatron-core creates that stream only on CUDA.
    saved_streams = torch.cuda.Stream, torch.cuda.stream
    torch.cuda.Stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.stream = lambda stream=None: nullcontext()
    to_host = token_dispatcher.maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = _split_sizes_to_host
    backwards = _backwards_on_cpu()
    recompute = _recompute_on_cpu()
    # megatron-core wraps small activations (squared ReLU) in torch.compile; on CPU each process
    # would spend ~20 s building C++ kernels for a negligible gain.
    compile_disabled = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _NullStream()
    try:
        with _CudaToCpu():
            yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.current_stream = saved
        torch.cuda.Stream, torch.cuda.stream = saved_streams
        token_dispatcher.maybe_move_tensor_to_cpu = to_host
        for function, backward in backwards.items():
            function.backward = backward
        for owner, name, original in reversed(recompute):
            setattr(owner, name, original)
        torch._dynamo.config.disable = compile_disabled
