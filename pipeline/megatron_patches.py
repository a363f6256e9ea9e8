"""The only place where megatron-core is patched: running its CUDA-only code paths on CPU.

megatron-core 0.19 hard-codes CUDA in code the CPU backend needs (DDP grad buffers, the optimizers'
found-inf flags and dtype checks, grad clipping, the pipeline schedules' token counters, p2p
shapes, checkpoint saving). Rather than copying those modules, `cpu_mode()` runs them unchanged
with three narrow redirections, active only inside the context and only on CPU runs:

1. A TorchFunctionMode that turns `device="cuda"` / `device=<int>` arguments into the CPU, and
   `tensor.cuda()` into a no-op (e.g. `torch.zeros(1, device="cuda")` in clip_grads.py,
   `device=torch.cuda.current_device()` in param_and_grad_buffer.py).
2. `torch.cuda.current_device()` returns 0, `torch.cuda.synchronize()` does nothing and
   `torch.cuda.current_stream()` is a stream that never waits, instead of failing to find a
   driver (schedules, p2p_communication.py, filesystem_async.py, param_and_grad_buffer.py).
3. `tensor.type()` (no arguments) reports `torch.cuda.*Tensor` names, because the optimizers sort
   parameters into fp32/bf16 groups by comparing against those strings (optimizer.py,
   distrib_optimizer.py) and reject anything else.

Without Apex or Transformer Engine (so: on CPU) the distributed optimizer wraps torch's Adam,
which keeps a `step` tensor per parameter where the fused Adam it expects keeps none.
Checkpoint loading trips over it three times (state_dict() of a fresh optimizer,
`_set_main_param_and_optimizer_states`, and one `step` tensor shared by every parameter after
loading); `prime_optimizer_for_loading`, the patch in `cpu_mode()` and `untie_adam_steps` handle them.

Reading a checkpoint unpickles bytes from disk in two places (torch 2.11, megatron-core 0.19.2):
`FileSystemReader.read_metadata` is a plain `pickle.load` of `.metadata`, and every stored object
(megatron's common state, our RNG and train state) goes through `DefaultLoadPlanner.load_bytes`, a
`torch.load(weights_only=False)`. A crafted checkpoint would run code in both. `safe_checkpoint_loading()`
reads them with an allow-list instead (see docs/checkpoints.md).

Saving the distributed optimizer's state in the "fully_reshardable" format, megatron-core copies
every tensor through host memory four times (`optimizer_staging` says where); inside
`fast_optimizer_state_saving()` its builder is replaced by `optimizer_staging.fully_reshardable_state`,
which returns the same tensors with at most one copy. Loading is megatron's own.

Checkpoint writers report their results through a multiprocessing Manager queue whose server process
megatron-core starts on first use and never stops (`filesystem_async.get_write_results_queue`): a
trainer killed with SIGKILL left it running (~0.5 GB each). `write_results_queue_dies_with_trainer()`
starts that server itself, set to die with the trainer.
"""

import io
import multiprocessing
import os
import pickle
import re
from contextlib import contextmanager, nullcontext
from multiprocessing.managers import SyncManager

import torch

from pipeline.errors import UnsafeCheckpointError
from pipeline.processes import die_with_parent

# Every global that torch's `.metadata` pickle of a megatron-core checkpoint references (found by
# recording `find_class` over real checkpoints): torch's checkpoint metadata records, torch.Size, the
# layout and memory-format decoders, dtypes, and megatron's empty placeholder class from 0.15; torch's
# own FileSystemWriter also records the checkpoint path as a PosixPath (built from strings only).
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
} | {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
}
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
    """Run the backward of megatron's communication autograd Functions (tensor_parallel/mappings.py)
    under the CUDA-to-CPU mode too; return the original backwards to restore.

    The mode does not reach into autograd's backward pass, and the MoE all-to-all's backward
    allocates its output with `device=torch.cuda.current_device()` (megatron-core 0.19.2 _AllToAll;
    seen as "Found no NVIDIA driver" in the first backward with parallel.ep=2).
    """
    from megatron.core.tensor_parallel import mappings

    originals = {}
    for function in vars(mappings).values():
        if isinstance(function, type) and issubclass(function, torch.autograd.Function) and "backward" in vars(function):
            originals[function] = vars(function)["backward"]

            def backward(ctx, *grads, _original=function.backward):
                with _CudaToCpu():
                    return _original(ctx, *grads)

            function.backward = staticmethod(backward)
    return originals


def prime_optimizer_for_loading(optimizer) -> None:
    """Give a fresh distributed optimizer its state tensors before a checkpoint is loaded into them.

    DistributedOptimizer.state_dict() reads torch Adam's per-parameter `step`, which exists only
    after a first step; the dummy step changes nothing that the load does not overwrite.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, DistributedOptimizer) and not sub.optimizer.state:
            sub._init_optimizer_states_with_dummy_values()


def untie_adam_steps(optimizer) -> None:
    """After loading, give every parameter its own Adam `step` tensor.

    megatron-core restores torch Adam's step as one tensor shared by all parameters; Adam then
    increments it once per parameter per step, the bias correction runs ahead and a resumed run
    drifts from an uninterrupted one (seen as a 1e-4 parameter difference after one step).
    """
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _skip_adam_step_state(original):
    # The checkpoint's per-parameter tensors never include torch Adam's `step` (it is restored
    # separately from param_groups); a None entry makes the copy loop skip it instead of KeyError.
    def set_states(self, model_param, tensors):
        return original(self, model_param, {"step": None, **tensors})

    return set_states


@contextmanager
def cpu_mode():
    """Run megatron-core's CUDA-assuming code on CPU (see the module docstring)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    set_states = DistributedOptimizer._set_main_param_and_optimizer_states
    DistributedOptimizer._set_main_param_and_optimizer_states = _skip_adam_step_state(set_states)
    saved = torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.current_stream
    # megatron-core 0.19.2's MoE all-to-all dispatcher makes a side stream for its device-to-host
    # copies and enters it (moe/token_dispatcher.py, MoEAlltoAllTokenDispatcher); on CPU both are
    # no-ops. Remove when megatron-core creates that stream only on CUDA.
    saved_streams = torch.cuda.Stream, torch.cuda.stream
    torch.cuda.Stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.stream = lambda stream=None: nullcontext()
    from megatron.core.transformer.moe import token_dispatcher

    to_host = token_dispatcher.maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = _split_sizes_to_host
    backwards = _backwards_on_cpu()
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
        DistributedOptimizer._set_main_param_and_optimizer_states = set_states
        torch._dynamo.config.disable = compile_disabled


class _AllowListUnpickler(pickle.Unpickler):
    """Unpickles only the globals in _METADATA_GLOBALS and torch dtypes."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self._source} references {module}.{name}, which is not on the checkpoint allow-list; refusing to "
            f"open it (a checkpoint is code, like a pickle file: open only checkpoints you trust)"
        )


def _safe_read_metadata(self, *args, **kwargs):
    # The body of FileSystemReader.read_metadata (torch 2.11) with the allow-list unpickler.
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as f:
        try:
            metadata = _AllowListUnpickler(f, str(path)).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:
            raise UnsafeCheckpointError(f"{path} is not a torch checkpoint metadata file ({type(e).__name__}: {e})") from None
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _safe_load_bytes(self, read_item, value: io.BytesIO) -> None:
    # DefaultLoadPlanner.load_bytes (torch 2.11) with weights_only=True: tensors, containers and
    # plain values only; what we and megatron store needs nothing more.
    try:
        obj = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"references {found.group(1)}" if found else "is not plain data"
        raise UnsafeCheckpointError(
            f"stored object {read_item.dest_index.fqn} {what}, which weights_only loading does not allow; refusing "
            f"to open it (a checkpoint is code, like a pickle file: open only checkpoints you trust)"
        ) from None
    if self.flatten_state_dict:
        from torch.distributed.checkpoint._traverse import set_element

        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


@contextmanager
def safe_checkpoint_loading():
    """Read checkpoints with the allow-listed unpickler for `.metadata` and `weights_only=True` for
    stored objects (see the module docstring); an UnsafeCheckpointError names what was refused."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    read_metadata, load_bytes = FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes
    FileSystemReader.read_metadata = _safe_read_metadata
    DefaultLoadPlanner.load_bytes = _safe_load_bytes
    try:
        yield
    finally:
        FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes = read_metadata, load_bytes


def write_results_queue_dies_with_trainer() -> None:
    """Give megatron-core's checkpoint writers a results queue whose server dies with this process
    (module docstring); a no-op once megatron has a queue."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    # "spawn", as megatron's own: the server must not inherit this process's threads and CUDA state.
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()
    # The queue is a proxy: the manager object must live as long as the queue does (both module-level).
    filesystem_async._results_queue_manager = manager


@contextmanager
def fast_optimizer_state_saving():
    """Build the distributed optimizer's "fully_reshardable" state for saving with
    `optimizer_staging.fully_reshardable_state` (module docstring); loading and megatron's
    memory-efficient variant keep megatron's code."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from pipeline.optimizer_staging import fully_reshardable_state

    original = DistributedOptimizer.sharded_param_state_fully_reshardable

    def sharded_param_state(self, model_sharded_state_dict, is_loading=False, metadata=None):
        if is_loading or (metadata or {}).get("distrib_optim_fully_reshardable_mem_efficient", False):
            return original(self, model_sharded_state_dict, is_loading, metadata)
        return fully_reshardable_state(self, model_sharded_state_dict)

    DistributedOptimizer.sharded_param_state_fully_reshardable = sharded_param_state
    try:
        yield
    finally:
        DistributedOptimizer.sharded_param_state_fully_reshardable = original
