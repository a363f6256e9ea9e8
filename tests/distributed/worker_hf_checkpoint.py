"""Worker (and helpers) for the Hugging Face conversion tests: build a small model at a given layout
from a seed, save it with the pipeline's `save_checkpoint` (pipeline/checkpoint/writer.py) under
RUN_DIR/checkpoints, and save the pipeline's own logits on fixed tokens, computed at that same
layout, to RUN_DIR/reference.pt.

    torchrun --nproc_per_node=4 tests/distributed/worker_hf_checkpoint.py RUN_DIR TOKENIZER parallel.tp=2 parallel.pp=2

With tp*pp=1 the unit tests call `write_checkpoint` in their own process. To test a trained checkpoint
instead, replace `build_model` in `write_checkpoint` with a few steps of the training loop; the
reference logits and everything downstream stay as they are.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # megatron-core wraps squared_relu in torch.compile; compiling it costs each CPU worker ~20 s.
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch
import torch.distributed as dist

# A model small enough for CI with every conversion case in it: all three layer types in an irregular
# order, Mamba inner width 8*16=128 != 2*hidden (Nano-2/pruned shape), a vocabulary that is not a
# multiple of 128 (padding to trim), GQA with 2 KV groups, TP=2-divisible everything.
MODEL_OVERRIDES = [
    "precision=fp32",
    "model.pattern=M*-M-*MM-",
    "model.hidden_size=96",
    "model.ffn_hidden_size=192",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.kv_channels=24",
    "model.mamba_num_heads=8",
    "model.mamba_head_dim=16",
    "model.mamba_num_groups=2",
    "model.mamba_state_dim=16",
    "model.mamba_chunk_size=16",
    "model.vocab_size=1000",
    "train.seed=1234",
]
BATCH, LENGTH = 2, 48
PROMPT_LENGTH, NEW_TOKENS = 8, 20
SMALL_DT_BIAS = -8.0
"""Every other Mamba head gets this dt_bias: softplus(dt + dt_bias) then falls below HF's default
time_step_min (1e-3), so the parity checks see whether the HF side clamps dt or not."""
# The MoE case: tiny_moe (sigmoid router with expert bias, top-2 of 8, scaling 2.5, shared expert)
# with a vocabulary to trim; the expert bias is set large enough to change which experts are chosen.
MOE_MODEL_OVERRIDES = ["model=tiny_moe", "precision=fp32", "model.vocab_size=1000", "train.seed=1234"]
EXPERT_BIAS_STD = 0.05


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors shards in an exported Hugging Face directory."""
    from safetensors import safe_open

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def reference_tokens(vocab_size: int) -> torch.Tensor:
    """The fixed [BATCH, LENGTH] token ids every parity check runs on."""
    return torch.randint(0, vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(11))


def make_tokenizer(directory: Path, vocab_size: int) -> Path:
    """A word-level HF tokenizer with `vocab_size` tokens (<pad>=0, <s>=1, </s>=2) in `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "bos_token": "<s>",
        "eos_token": "</s>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


HF_CONFIG = dict(
    vocab_size=1000,
    hidden_size=96,
    hybrid_override_pattern="M*-M-*MM-",
    intermediate_size=192,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    mamba_num_heads=8,
    mamba_head_dim=16,
    n_groups=2,
    ssm_state_size=16,
    chunk_size=16,
    max_position_embeddings=512,
)
"""The same shapes as MODEL_OVERRIDES, as a transformers NemotronHConfig."""
MOE_HF_CONFIG = dict(
    hybrid_override_pattern="ME*EM-E",
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48,
    routed_scaling_factor=2.5,
)
"""HF_CONFIG with MoE layers (and one of each other type) for the MoE import tests."""


@torch.no_grad()
def make_hf_model(directory: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0, **config) -> Path:
    """A Hugging Face NemotronH directory made by transformers itself (save_pretrained), every
    parameter random (norms, A_log, D and dt_bias too) and so the MoE routers' expert bias, which
    stays fp32 as transformers keeps it, with a tokenizer."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(NemotronHConfig(**{**HF_CONFIG, **config}))
    for param in model.parameters():
        param.normal_(0.0, 0.05)
    model.to(dtype)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.data = torch.randn(buffer.shape) * EXPERT_BIAS_STD
    model.save_pretrained(directory)
    make_tokenizer(directory, model.config.vocab_size)
    return directory


@torch.no_grad()
def pipeline_logits(chunk, tokens_BL: torch.Tensor) -> torch.Tensor | None:
    """Logits [B, L, Vp] of the pipeline's forward at the current TP/PP layout (one chunk per rank),
    on the last stage (gathered over TP); None on the other stages."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    chunk.eval()
    batch, length = tokens_BL.shape
    position_ids_BL = torch.arange(length).expand(batch, -1)
    if not chunk.pre_process:
        hidden_LBH = torch.empty(length, batch, chunk.config.hidden_size)
        dist.recv(hidden_LBH, src=ps.get_pipeline_model_parallel_prev_rank())
        chunk.set_input_tensor(hidden_LBH)
    out = chunk(tokens_BL, position_ids_BL, None)
    if not chunk.post_process:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return gather_from_tensor_model_parallel_region(out)


@torch.no_grad()
def lower_dt_bias(chunk) -> None:
    """Set dt_bias of every other Mamba head (even global heads at any TP: local sizes are even)."""
    for name, param in chunk.named_parameters():
        if name.endswith("mixer.dt_bias"):
            param[::2] = SMALL_DT_BIAS


@torch.no_grad()
def randomize_expert_bias(chunk) -> None:
    """Give every MoE router a random expert bias (the same for a layer at any layout), as training
    would; zero, it would not show whether the HF side uses it."""
    for layer in chunk.decoder.layers:
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if router is not None and router.expert_bias is not None:
            gen = torch.Generator().manual_seed(layer.layer_number)
            router.expert_bias.copy_(torch.randn(router.expert_bias.shape, generator=gen) * EXPERT_BIAS_STD)


def write_checkpoint(
    run_dir: Path, tokenizer: Path, overrides: list[str], reference: bool = True, base: list[str] = MODEL_OVERRIDES
) -> None:
    """All ranks: build the model (`base` overrides) from the seed, save it at step 0 and, with
    `reference`, write the reference logits (and, with pp=1, the pipeline's greedy continuation of the
    first tokens) to run_dir/reference.pt."""
    from omegaconf import OmegaConf

    from pipeline.checkpoint import CheckpointMeta, model_sharded_state, save_checkpoint
    from pipeline.config import load_run_config
    from pipeline.distributed import distributed
    from pipeline.model.build import build_model, virtual_stages

    run = load_run_config([*base, *overrides, f"run_dir={run_dir}"])
    with distributed(run.parallel, virtual_stages(run.model, run.parallel), "cpu") as world:
        (chunk,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        lower_dt_bias(chunk)
        randomize_expert_bias(chunk)
        meta = CheckpointMeta(
            step=0,
            model=dataclasses.asdict(run.model),
            parallel={"tp": world.tp, "pp": world.pp, "dp": world.dp, "world_size": world.world_size},
            tokenizer=str(tokenizer),
        )
        save_checkpoint(
            run_dir / "checkpoints", 0, model_sharded_state([chunk]), meta, OmegaConf.to_yaml(OmegaConf.structured(run))
        )
        if not reference:
            return
        tokens_BL = reference_tokens(run.model.vocab_size)
        ref = {"tokens": tokens_BL, "logits": pipeline_logits(chunk, tokens_BL)}
        if world.pp == 1:
            from pipeline.generate import greedy_generate

            prompt_BL = tokens_BL[:, :PROMPT_LENGTH]
            ref["prompt"] = prompt_BL
            ref["generated"] = greedy_generate(chunk, prompt_BL, NEW_TOKENS, run.model.vocab_size)
        from megatron.core import parallel_state as ps

        # Every data-parallel rank (EP layouts have several) computed the same logits: one writes them.
        if ref["logits"] is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            torch.save(ref, run_dir / "reference.pt")


if __name__ == "__main__":
    # `moe` as the third argument selects MOE_MODEL_OVERRIDES.
    moe = sys.argv[3:4] == ["moe"]
    write_checkpoint(
        Path(sys.argv[1]),
        Path(sys.argv[2]),
        sys.argv[4 if moe else 3 :],
        base=MOE_MODEL_OVERRIDES if moe else MODEL_OVERRIDES,
    )
