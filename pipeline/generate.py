"""Greedy decoding with the pipeline's own model: the reference that exported models are checked against.

Full recompute (every step runs the whole sequence again; no KV or SSM cache), so it is simple and
slow: for tests and spot checks on small models, not for serving (export to Hugging Face for that).
Works on one pipeline stage (parallel.pp=1) at any TP.

Shapes: B batch, L tokens so far, V vocabulary (Vp padded).
"""

import torch


@torch.no_grad()
def greedy_generate(model, prompt_BL: torch.Tensor, max_new_tokens: int, vocab_size: int) -> torch.Tensor:
    """The `max_new_tokens` tokens after `prompt_BL` chosen greedily by `model` (a HybridModel chunk
    that holds the whole stack). Padding rows of the vocabulary (ids >= vocab_size) are never chosen;
    generation does not stop at end-of-document."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if not (model.pre_process and model.post_process):
        raise ValueError("greedy_generate needs the whole model on this rank; use parallel.pp=1")
    was_training = model.training
    model.eval()
    tokens_BL = prompt_BL
    try:
        for _ in range(max_new_tokens):
            length = tokens_BL.shape[1]
            position_ids_BL = torch.arange(length, device=tokens_BL.device).expand(tokens_BL.shape[0], -1)
            logits_BLV = model(tokens_BL, position_ids_BL, None)
            # The output layer is vocab-parallel: gather the last position's logits over TP ranks.
            last_BVp = gather_from_tensor_model_parallel_region(logits_BLV[:, -1].contiguous())
            next_B1 = last_BVp[:, :vocab_size].argmax(dim=-1, keepdim=True)
            tokens_BL = torch.cat([tokens_BL, next_B1], dim=1)
    finally:
        model.train(was_training)
    return tokens_BL[:, prompt_BL.shape[1] :]
