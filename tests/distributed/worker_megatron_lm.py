"""Write a genuine Megatron-LM checkpoint with the megatron-core wheel's own `megatron/training` (its
`parse_args`, `validate_args` and `save_checkpoint`), on CPU, as `pretrain_hybrid.py` would at the end
of a run: a tiny hybrid model, a few AdamW steps on fixed batches, then the save. Used by
tests/distributed/test_import_megatron*.py as the source to import.

    python tests/distributed/worker_megatron_lm.py OUT_DIR [megatron flags...]          # TP1/PP1
    torchrun --nproc_per_node=4 tests/distributed/worker_megatron_lm.py OUT_DIR --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --hybrid-layer-pattern "M-M*|-M-"
    python tests/distributed/worker_megatron_lm.py OUT_DIR --save-formats model_space,dp_reshardable  # one each
    python tests/distributed/worker_megatron_lm.py check IMPORTED REFERENCE RESULT [overrides...]

Writes OUT_DIR/ckpt (the Megatron-LM save dir), the same weights as NeMo 2 stores them (NEMO_DIR/weights)
and OUT_DIR/reference.pt (rank 0): the (global) batch that
follows the saved iteration and the loss megatron's forward gives on it at the saved weights, and the
loss after one more step on it (the optimizer continuing).

The model is the pipeline's portable HybridModel (same parameter names and checkpoint keys as
megatron's TE spec), built at the layout the flags name. megatron/training assumes a GPU in two
places the save passes: `torch.cuda.get_rng_state` (the RNG state it stores; a CPU stand-in here) and
the CUDA RNG tracker's states (empty on CPU); and validate_args asks the GPU's architecture when tp > 1.

With --save-formats, the same state is saved once per optimizer format named (fully_reshardable;
dp_reshardable, Megatron-LM's default; model_space, core <= 0.14's): OUT_DIR/FORMAT/ckpt, and
OUT_DIR/FORMAT/reference.pt, so that each OUT_DIR/FORMAT is what a run saving in that format alone
writes (one training run instead of several).
"""

import contextlib
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# Megatron-LM's defaults where our tiny config does not say otherwise; flags the test passes win.
TINY_FLAGS = [
    "--hybrid-layer-pattern", "M-M*-M-",
    "--hidden-size", "128", "--ffn-hidden-size", "512",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "32",
    "--mamba-num-heads", "16", "--mamba-head-dim", "16", "--mamba-num-groups", "2", "--mamba-state-dim", "16",
    "--seq-length", "64", "--max-position-embeddings", "64", "--position-embedding-type", "none",
    "--normalization", "RMSNorm", "--disable-bias-linear", "--squared-relu",
    "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "10",
    "--lr", "1e-3", "--min-lr", "1e-3", "--lr-decay-style", "constant", "--weight-decay", "0.1",
    "--clip-grad", "1.0", "--init-method-std", "0.02",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "4095",
    "--ckpt-format", "torch_dist", "--use-distributed-optimizer",
    "--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--no-masked-softmax-fusion",
    "--no-bias-dropout-fusion", "--use-cpu-initialization",
    "--transformer-impl", "local", "--seed", "1234", "--save-interval", "2",
]
STEPS = 2
NEMO_DIR = f"nemo/tiny--val_loss=7.0-step={STEPS}-consumed_samples=8"
MICRO = 2
"""Optimizer steps before the save (the Adam moments are then not trivial)."""


def batch(step: int, args, rank_of_dp: int, dp: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch for `step` (data-parallel rank `rank_of_dp`'s part of it among `dp`, default the
    run's DP): tokens, labels."""
    g = torch.Generator().manual_seed(1000 + step)
    full = torch.randint(0, args.vocab_size, (args.global_batch_size, args.seq_length + 1), generator=g)
    mine = full.chunk(dp or args.data_parallel_size)[rank_of_dp]
    return mine[:, :-1].contiguous(), mine[:, 1:].contiguous()


def main(out: Path, flags: list[str]) -> None:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.training import arguments
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.global_vars import set_global_variables

    from pipeline.distributed import ParallelConfig, distributed
    from pipeline.model.build import build_model
    from pipeline.model.config import ModelConfig, MoEConfig
    from pipeline.model.precision import PrecisionConfig

    formats = []
    if SAVE_FORMATS_FLAG in flags:
        at = flags.index(SAVE_FORMATS_FLAG)
        formats, flags = flags[at + 1].split(","), flags[:at] + flags[at + 2:]
    sys.argv = ["pretrain_hybrid.py", *TINY_FLAGS, "--save", str(out / "ckpt"), *flags]
    # validate_args asks the GPU's architecture with tp > 1 (only to choose what to warn about) and its
    # compute capability with --moe-grouped-gemm.
    arguments.get_device_arch_version = lambda: 9
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    args = parse_args()
    validate_args(args, {})
    set_global_variables(args, build_tokenizer=True)  # pads the vocabulary as Megatron-LM does (128 * TP)
    parallel = ParallelConfig(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size)
    torch.cuda.get_rng_state = lambda device="cuda": torch.zeros(16, dtype=torch.uint8)
    with distributed(parallel, None, "cpu"):
        model = ModelConfig(
            name="megatron", pattern=args.hybrid_layer_pattern, hidden_size=args.hidden_size,
            ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups, kv_channels=args.kv_channels,
            mamba_num_heads=args.mamba_num_heads, mamba_head_dim=args.mamba_head_dim,
            mamba_num_groups=args.mamba_num_groups, mamba_state_dim=args.mamba_state_dim,
            vocab_size=args.padded_vocab_size, make_vocab_size_divisible_by=args.padded_vocab_size,
            seq_length=args.seq_length, mamba_chunk_size=128,
            moe=MoEConfig(
                num_experts=args.num_experts, top_k=args.moe_router_topk, ffn_hidden_size=args.moe_ffn_hidden_size,
                shared_ffn_hidden_size=args.moe_shared_expert_intermediate_size or 0,
                score_function=args.moe_router_score_function, expert_bias=args.moe_router_enable_expert_bias,
                scaling_factor=args.moe_router_topk_scaling_factor, aux_loss=args.moe_router_load_balancing_type,
                aux_loss_coeff=args.moe_aux_loss_coeff, router_dtype=args.moe_router_dtype or "model",
                token_dispatcher=args.moe_token_dispatcher_type,
            ) if args.num_experts else MoEConfig(),
        )
        dtype = "bf16" if args.bf16 else "fp32"
        chunks = build_model(model, parallel, PrecisionConfig(name=dtype, params_dtype=dtype), args.seed,
                             torch.device("cpu"))
        ddp = [DistributedDataParallel(chunks[0].config, DistributedDataParallelConfig(
            use_distributed_optimizer=True, grad_reduce_in_fp32=True), chunks[0])]
        chunks[0].config.finalize_model_grads_func = finalize_model_grads  # as Megatron-LM's get_model does
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            use_distributed_optimizer=True, bf16=args.bf16, params_dtype=args.params_dtype), ddp)
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=args.lr, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=0,
            lr_decay_steps=args.train_iters * args.global_batch_size, lr_decay_style="constant",
            start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=1, wd_incr_style="constant")
        dp_rank = parallel_state.get_data_parallel_rank()
        for step in range(STEPS + 1):
            loss = train_step(ddp, optimizer, batch(step, args, dp_rank), update=step < STEPS)
            if step < STEPS:
                scheduler.step(args.global_batch_size)
        # One save per format from the same state: each source costs one training run less.
        for name in formats or [None]:
            if name is not None:
                assert name in ("fully_reshardable", "dp_reshardable", "model_space"), name
                args.save = str(out / name / "ckpt")
                args.dist_ckpt_optim_fully_reshardable = name == "fully_reshardable"
            with model_space_format() if name == "model_space" else contextlib.nullcontext():
                save_checkpoint(STEPS, ddp, optimizer, scheduler, 0)
        save_nemo_weights(chunks[0], out / NEMO_DIR / "weights")
        # The loss on the next batch at the saved weights, then after one more step on it.
        next_loss = loss
        train_step(ddp, optimizer, batch(STEPS, args, dp_rank), update=True)
        after = train_step(ddp, optimizer, batch(STEPS + 1, args, dp_rank), update=False)
        writer = (parallel_state.is_pipeline_last_stage(ignore_virtual=True) and dp_rank == 0
                  and parallel_state.get_tensor_model_parallel_rank() == 0)
        if writer:  # the losses are known on the last stage
            reference = {"loss": next_loss, "loss_after_step": after, "step": STEPS,
                         "batches": [batch(s, args, 0, dp=1) for s in (STEPS, STEPS + 1)]}
            for name in formats or [None]:
                torch.save(reference, out / name / "reference.pt" if name else out / "reference.pt")


SAVE_FORMATS_FLAG = "--save-formats"
"""Not a Megatron-LM flag: save once per optimizer format listed after it (comma-separated); model_space
is the format core <= 0.14 saved (`model_space_format`)."""


@contextlib.contextmanager
def model_space_format():
    """Save the distributed optimizer's state as Megatron-LM did up to megatron-core 0.14 with
    --ckpt-fully-parallel-save (`fully_sharded_model_space`, also the format of NeMo 2 recipes).

    megatron-core 0.19.2 still builds that state (DistributedOptimizer.sharded_param_state_fs_model_space:
    the keys, each rank's flattened range of each parameter, the replica ids, `fp32_param`) and
    megatron/training still saves whatever the content metadata names, but three pieces of the old
    save path are gone; the stand-ins below restore them as core 0.14 had them, everything else is
    the wheel's own code:
    - ShardedTensor accepted `flattened_range` (1-D data holding that range of the flattened chunk);
    - `narrow` (the Mamba in_proj split into z, x, B, C, dt) cut a flattened tensor to the part of
      its range inside the narrowed rows;
    - the torch strategy stored a flattened tensor of global shape [X, Y] and chunk shape [x, y] as a
      tensor of shape [X // x, Y // y, x * y], each rank's range in the row of its chunk, at the
      range's start (core 0.14's dist_checkpointing/strategies/resharding.py).
    Only the sharding type is changed in the content metadata Megatron-LM saves with."""
    from unittest import mock

    from megatron.core.dist_checkpointing import state_dict_utils
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.training import checkpointing

    build_metadata = checkpointing._build_sharded_state_dict_metadata
    validate, narrow = ShardedTensor.validate_metadata_integrity, ShardedTensor.narrow
    keep_nonempty = state_dict_utils.filter_out_empty_flatten_tensor

    def metadata(*args, **kwargs):
        return {**build_metadata(*args, **kwargs), "distrib_optim_sharding_type": "fully_sharded_model_space"}

    def validate_flat(self):
        if self.flattened_range is None:
            return validate(self)
        flat = self.flattened_range
        assert self.data is None or tuple(self.data.shape) == (flat.stop - flat.start,), self
        data, self.data, self.flattened_range = self.data, None, None
        try:
            validate(self)
        finally:
            self.data, self.flattened_range = data, flat

    def narrow_flat(self, dim, start, length):
        if self.flattened_range is None:
            return narrow(self, dim, start, length)
        assert dim == 0, "only the in_proj split (rows) is needed"
        whole = torch.empty(self.local_shape, dtype=self.dtype, device="meta")
        (rows,) = narrow(replace(self, data=whole, flattened_range=None), dim, start, length)
        row = math.prod(self.local_shape[1:])
        flat = self.flattened_range
        lo, hi = max(start * row, flat.start), min((start + length) * row, flat.stop)
        if lo >= hi:
            return []
        return [replace(rows, data=self.data[lo - flat.start:hi - flat.start],
                        flattened_range=slice(lo - start * row, hi - start * row))]

    def core_014_layout(sh):
        if not isinstance(sh, ShardedTensor) or sh.flattened_range is None:
            return sh
        flat, rows = sh.flattened_range, sh.axis_fragmentations
        return ShardedTensor(sh.key, sh.data.view((1,) * len(rows) + (-1,)), sh.dtype,
                             (1,) * len(rows) + (flat.stop - flat.start,), rows + (math.prod(sh.local_shape),),
                             sh.local_chunk_offset_in_global() + (flat.start,), None, sh.replica_id)

    def nonempty_in_core_014_layout(sharded_state_dict):
        sharded_state_dict = keep_nonempty(sharded_state_dict)
        dict_list_map_inplace(core_014_layout, sharded_state_dict)
        return sharded_state_dict

    with mock.patch.object(checkpointing, "_build_sharded_state_dict_metadata", metadata), \
            mock.patch.object(ShardedTensor, "validate_metadata_integrity", validate_flat), \
            mock.patch.object(ShardedTensor, "narrow", narrow_flat), \
            mock.patch.object(state_dict_utils, "filter_out_empty_flatten_tensor", nonempty_in_core_014_layout):
        yield


def save_nemo_weights(model, weights: Path) -> None:
    """The same weights as NeMo 2 stores them: torch_dist, every key prefixed `module.` (no optimizer:
    NeMo 2 recipes save it in the fully_sharded_model_space format)."""
    from megatron.core import dist_checkpointing

    from pipeline.migrate.import_ import source_keys

    if torch.distributed.get_rank() == 0:
        weights.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(source_keys({"model": model.sharded_state_dict()}, "module.", {}), str(weights))


def train_step(ddp, optimizer, tokens_labels, update: bool) -> float | None:
    """Megatron's forward (and, with `update`, backward and optimizer step) on one batch; the mean loss
    over the global batch on the last pipeline stage (None elsewhere), reduced as the pipeline reports
    it: per-micro-batch fp32 token sums added in fp64, over data-parallel ranks, divided by the token
    count. A mean of fp32 means differs from that in the last bit on some CPUs, which is not a
    difference between the two forwards."""
    from functools import partial

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens, labels = tokens_labels
    module = ddp[0]

    def forward_step(iterator, model):
        t, lab = next(iterator)
        position_ids = torch.arange(t.shape[1]).unsqueeze(0).expand_as(t)
        out = model(t, position_ids, None, labels=lab)

        def loss_func(per_token):
            flat = per_token.float().reshape(-1)
            return flat.mean(), {"loss": torch.stack([flat.sum(), torch.tensor(float(flat.numel()))]).detach()}

        return out, partial(loss_func)

    for m in ddp:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    micro = list(zip(tokens.split(MICRO), labels.split(MICRO), strict=True))
    results = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=ddp, num_microbatches=len(micro),
        seq_length=tokens.shape[1], micro_batch_size=MICRO, forward_only=not update)
    if update:
        optimizer.step()
    loss = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        local = torch.zeros(2, dtype=torch.float64)
        for r in results:
            local += r["loss"].double()
        torch.distributed.all_reduce(local, group=parallel_state.get_data_parallel_group())
        loss = (local[0] / local[1]).item()
    return loss if module is not None else None


def check(imported: Path, reference: Path, result: Path, overrides: list[str]) -> None:
    """Resume the import as `run_dir=` does (pipeline.training.state; a weights-only import: start from it
    as `checkpoint.init_from=` does) at the layout of `overrides`, run
    the pipeline's own train step on the reference batch and evaluate the next one; write both losses
    (rank 0) to `result` as JSON."""
    import json

    from megatron.core import parallel_state

    from pipeline.checkpoint import latest_checkpoint, read_meta
    from pipeline.config import load_run_config
    from pipeline.distributed import distributed
    from pipeline.model.build import virtual_stages
    from pipeline.training.batches import ModelInputs
    from pipeline.training.optim import build_optimizer, build_scheduler
    from pipeline.training.prepare import build_training_chunks
    from pipeline.training.state import pick_checkpoint, resume
    from pipeline.training.step import eval_step, train_step

    ref = torch.load(reference)
    name = next((imported / "model").glob("*.yaml")).stem
    # A weights-only import is started from (checkpoint.init_from), a full one resumed (run_dir).
    weights_only = read_meta(latest_checkpoint(imported / "checkpoints")).weights_only
    start = [f"run_dir={result.parent / 'run'}", f"checkpoint.init_from={imported}"] if weights_only else [
        f"run_dir={imported}"]
    precision = [] if any(o.startswith("precision=") for o in overrides) else ["precision=fp32"]
    run = load_run_config([f"hydra.searchpath=[file://{imported}]", f"model={name}", *start, *precision,
                           *RESUME_OPTIM, *overrides])

    class Log:
        def info(self, message):
            print(message, flush=True)

    with distributed(run.parallel, virtual_stages(run.model, run.parallel), "cpu") as world:
        chunks = build_training_chunks(run.model, run.parallel, run.precision, run.train, world.device)
        optimizer = build_optimizer(chunks, run.optim, chunks[0].config, run.parallel.distributed_optimizer)
        scheduler = build_scheduler(optimizer, run.optim, run.train.iters)
        state = resume(run, pick_checkpoint(run, world), chunks, optimizer, scheduler, world, Log())
        dp, dp_rank = world.dp, parallel_state.get_data_parallel_rank()

        def inputs(tokens, labels):
            mine = zip(tokens.chunk(dp)[dp_rank].split(MICRO), labels.chunk(dp)[dp_rank].split(MICRO), strict=True)
            return [ModelInputs(t, torch.arange(t.shape[1]).expand_as(t), lab, torch.ones_like(lab, dtype=torch.float),
                                None) for t, lab in mine]

        first = train_step(chunks, optimizer, scheduler, inputs(*ref["batches"][0]), world.device)
        after = eval_step(chunks, inputs(*ref["batches"][1]), world.device)["lm loss"]
        if world.rank == 0:
            result.write_text(json.dumps({"step": state.step, "loss": first.loss, "loss_after_step": after}))


RESUME_OPTIM = ["optim.lr=1e-3", "optim.min_lr=1e-3", "optim.schedule=constant", "optim.warmup_iters=0",
                "optim.weight_decay=0.1", "optim.clip_grad=1.0", "optim.beta1=0.9", "optim.beta2=0.999",
                "optim.eps=1e-8", "train.global_batch_size=4", f"train.micro_batch_size={MICRO}", "train.iters=10",
                "train.seq_length=64"]
"""The fixture's optimizer settings (TINY_FLAGS), for the step after the import."""


if __name__ == "__main__":
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # what Megatron-LM's launch scripts set for tp > 1
    if sys.argv[1] == "check":
        check(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5:])
    else:
        main(Path(sys.argv[1]), sys.argv[2:])
