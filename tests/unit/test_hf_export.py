"""Export of a TP=1 checkpoint: what transformers loads offline computes what the pipeline computes.

The model has all three layer types in an irregular order, Mamba inner width != 2*hidden, a padded
vocabulary and dt_bias values low enough that HF's default dt clamp would show (see
tests/distributed/worker_hf_checkpoint.py). TP=2 x PP=2 checkpoints: tests/distributed/test_hf_parallel.py.
"""

import json

import pytest
import torch
from safetensors import safe_open

from pipeline.checkpoint import CheckpointTensors
from pipeline.hf.export import export_checkpoint
from pipeline.hf.safetensors_io import INDEX_NAME
from tests.distributed.worker_hf_checkpoint import NEW_TOKENS, PROMPT_LENGTH, make_tokenizer, write_checkpoint

VOCAB = 1000
TOLERANCE = 1e-4


def load_hf(path, **config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **config).eval()


def hf_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of an exported directory, by name (read through its index)."""
    weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    out = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(str(path / file), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_export")
    tokenizer = make_tokenizer(root / "tokenizer", VOCAB)
    write_checkpoint(root / "run", tokenizer, [])
    export_checkpoint(root / "run", root / "hf")
    return {"root": root, "hf": root / "hf", "reference": torch.load(root / "run" / "reference.pt")}


def test_logits_match_pipeline_forward(run):
    ref = run["reference"]
    with torch.no_grad():
        logits = load_hf(run["hf"])(ref["tokens"]).logits
    assert logits.shape == (*ref["tokens"].shape, VOCAB), "HF logits should cover the unpadded vocabulary"
    diff = (logits - ref["logits"][..., :VOCAB]).abs().max().item()
    assert diff <= TOLERANCE, f"HF and pipeline logits differ by {diff:.3g} (> {TOLERANCE})"


def test_parity_depends_on_disabling_hf_dt_clamp(run):
    # With transformers' default time_step_min (1e-3) the same weights give other logits: the check
    # above would catch an export that leaves HF's clamp on.
    ref = run["reference"]
    with torch.no_grad():
        logits = load_hf(run["hf"], time_step_min=1e-3)(ref["tokens"]).logits
    diff = (logits - ref["logits"][..., :VOCAB]).abs().max().item()
    assert diff > 10 * TOLERANCE, (
        f"the default dt clamp changed logits by only {diff:.3g}; the test model no longer exercises it"
    )


def test_hf_load_keeps_every_tensor_including_dt_bias(run):
    # Known trap: some transformers versions re-initialise dt_bias (A_log, D) in _init_weights on load.
    model = load_hf(run["hf"])
    loaded = {k.replace("model.", "backbone.", 1): v for k, v in model.state_dict().items()}
    for name, tensor in hf_tensors(run["hf"]).items():
        assert torch.equal(loaded[name], tensor), f"{name} changed when transformers loaded it"
    ckpt = CheckpointTensors(run["root"] / "run" / "checkpoints" / "step_0000000")
    for i, layer in enumerate(model.model.layers):
        if layer.block_type == "linear_attention":
            saved = ckpt.get(f"decoder.layers.{i}.mixer.dt_bias")
            assert torch.equal(layer.mixer.dt_bias.detach(), saved), f"layer {i} dt_bias differs from the checkpoint"


def test_mamba_inner_width_comes_from_heads_not_expand(run):
    # hidden 96, 8 heads x 16: inner width 128, not expand * hidden = 192.
    model = load_hf(run["hf"])
    mixer = model.model.layers[0].mixer
    assert mixer.out_proj.in_features == 8 * 16
    assert mixer.in_proj.out_features == 2 * 128 + 2 * 2 * 16 + 8


def test_vocabulary_padding_is_trimmed(run):
    tensors = hf_tensors(run["hf"])
    ckpt = CheckpointTensors(run["root"] / "run" / "checkpoints" / "step_0000000")
    for hf_name, key in (
        ("backbone.embeddings.weight", "embedding.word_embeddings.weight"),
        ("lm_head.weight", "output_layer.weight"),
    ):
        padded = ckpt.get(key)
        assert padded.shape[0] == 1024, "the test model should have vocabulary padding"
        assert torch.equal(tensors[hf_name], padded[:VOCAB]), f"{hf_name} is not the first {VOCAB} rows of {key}"
    assert json.loads((run["hf"] / "config.json").read_text())["vocab_size"] == VOCAB


def test_greedy_generation_matches_pipeline(run):
    ref = run["reference"]
    out = load_hf(run["hf"]).generate(ref["prompt"], max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert out.shape[1] == PROMPT_LENGTH + NEW_TOKENS, f"generate stopped early: {out.shape[1] - PROMPT_LENGTH} tokens"
    assert torch.equal(out[:, PROMPT_LENGTH:], ref["generated"]), (
        f"HF greedy tokens {out[:, PROMPT_LENGTH:].tolist()} != pipeline {ref['generated'].tolist()}"
    )


def test_tokenizer_and_generation_config_carry_the_special_ids(run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run["hf"])
    config = json.loads((run["hf"] / "config.json").read_text())
    generation = json.loads((run["hf"] / "generation_config.json").read_text())
    assert len(tok) == VOCAB
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (2, 1, 0)
    for key, value in (("eos_token_id", 2), ("bos_token_id", 1), ("pad_token_id", 0)):
        assert config[key] == value and generation[key] == value, f"{key} not {value} in config/generation_config"


def test_bf16_export_rounds_every_tensor(run, tmp_path):
    export_checkpoint(run["root"] / "run", tmp_path / "bf16", dtype="bf16")
    fp32, bf16 = hf_tensors(run["hf"]), hf_tensors(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, tensor in fp32.items():
        assert bf16[name].dtype == torch.bfloat16, f"{name} stored as {bf16[name].dtype}"
        assert torch.equal(bf16[name], tensor.to(torch.bfloat16)), f"{name} is not the bf16 rounding of the fp32 export"


def test_small_shards_give_the_same_model(run, tmp_path):
    export_checkpoint(run["root"] / "run", tmp_path / "sharded", max_shard_bytes=400_000)
    index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3, f"expected several shards, got {files}"
    assert files == sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in hf_tensors(run["hf"]).values())
    one, many = hf_tensors(run["hf"]), hf_tensors(tmp_path / "sharded")
    assert one.keys() == many.keys()
    assert all(torch.equal(one[k], many[k]) for k in one), "sharded export differs from the single-shard one"
    ref = run["reference"]
    with torch.no_grad():
        logits = load_hf(tmp_path / "sharded")(ref["tokens"]).logits
    assert (logits - ref["logits"][..., :VOCAB]).abs().max().item() <= TOLERANCE


def test_byte_copies_write_what_computing_writes(run, tmp_path):
    computed = export_checkpoint(run["root"] / "run", tmp_path / "computed", copy=False)
    copied = json.loads((run["hf"] / INDEX_NAME).read_text())
    assert computed.copied_tensors == 0
    assert len(copied["weight_map"]) == computed.tensors
    for file in sorted(set(copied["weight_map"].values())):
        assert (run["hf"] / file).read_bytes() == (tmp_path / "computed" / file).read_bytes(), f"{file} differs"


def test_same_dtype_export_copies_every_tensor(run, tmp_path):
    result = export_checkpoint(run["root"] / "run", tmp_path / "again", dtype="fp32")
    assert result.copied_tensors == result.tensors, f"only {result.copied_tensors}/{result.tensors} copied"


def test_fast_reader_reads_what_dcp_load_reads(run):
    step = run["root"] / "run" / "checkpoints" / "step_0000000"
    fast, reference = CheckpointTensors(step), CheckpointTensors(step, raw=False)
    for key in fast.shapes:
        assert torch.equal(fast.get(key), reference.get(key)), f"{key} differs between the raw reader and dcp.load"
    assert fast.raw_reads == sum(len(c) for c in fast.chunks.values()), "the raw reader fell back to dcp.load"
    assert reference.raw_reads == 0
