"""A parent model for pruning tests: built in a world of one, its norms and gated-norm inputs spread so
that every unit matters, and its logits."""

import torch


def logits(chunk, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits of `tokens` ([batch, seq]) in eval mode."""
    chunk.eval()
    with torch.no_grad():
        return chunk(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None).float()


def spread_norms(chunk, gen: torch.Generator) -> None:
    """Norm weights and Mamba's D around 1 +- 0.3 and in_proj x6: the gated-norm inputs far above its
    fixed epsilon (1e-5), so a pruned unit changes the logits measurably."""
    with torch.no_grad():
        for name, p in chunk.named_parameters():
            if name.endswith(("norm.weight", "layer_norm_weight", "mixer.D")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("mixer.in_proj.weight"):
                p.mul_(6)
