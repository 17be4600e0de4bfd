"""The CUT loss (Contrastive Unlikelihood Training, Xu et al. 2023) as a pure function.

For a judged response y, the same tokens are scored under two prompts: A, the judgment
prompt (instruction + judgment), and B, the plain prompt the model is served with. A token
the judgment explains (p_A / p_B > threshold) is an error: its probability under B is pushed
down (unlikelihood, −w·log(1 − p_B)); every other token keeps plain likelihood (−log p_B).
The result is averaged with the likelihood of y under A. A response judged fine is plain
likelihood under B. See docs/alignment/training-methods.md and the CUT paper ("Reasons to
Reject? Aligning Language Models with Judgments", arXiv:2312.14591).

Owns: the arithmetic on per-token log-probabilities. Does not know: models, tokenizers, data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# 1 − p_B is clamped here before the log, as unlikelihood training does (Welleck et al.),
# so a token the model is certain of gives a large but finite loss.
MIN_UNLIKELY = 1e-5


@dataclass(frozen=True, slots=True)
class CutLoss:
    loss: torch.Tensor  # scalar, differentiable
    flagged: torch.Tensor  # bool per response token: judged an error (unlikelihood applied)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | ·) for each position; logits [T, V] already aligned with targets [T]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def cut_loss(
    logp_judge: torch.Tensor,
    logp_plain: torch.Tensor,
    *,
    threshold: float,
    weight_unlike: float,
) -> CutLoss:
    """The loss of one judged response from its tokens' log-probabilities under the judgment
    prompt (A) and the plain prompt (B), both shaped [T] over the response tokens only."""
    if logp_judge.shape != logp_plain.shape or logp_judge.ndim != 1 or logp_judge.numel() == 0:
        raise ValueError("expected two equal, non-empty 1-D tensors of response log-probs")
    ratio = torch.exp(logp_judge - logp_plain).detach()
    flagged = ratio > threshold
    p_plain = torch.exp(logp_plain)
    unlikely = -weight_unlike * torch.log(torch.clamp(1.0 - p_plain, min=MIN_UNLIKELY))
    per_token = torch.where(flagged, unlikely, -logp_plain)
    loss = (-logp_judge.mean() + per_token.mean()) / 2
    return CutLoss(loss=loss, flagged=flagged)


def likelihood_loss(logp_plain: torch.Tensor) -> CutLoss:
    """A response judged fine: mean negative log-likelihood under the plain prompt."""
    if logp_plain.ndim != 1 or logp_plain.numel() == 0:
        raise ValueError("expected a non-empty 1-D tensor of response log-probs")
    return CutLoss(loss=-logp_plain.mean(), flagged=torch.zeros_like(logp_plain, dtype=torch.bool))
