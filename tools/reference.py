"""The straightforward, full-vocabulary forms of iqstar's scoring: what its chunked ones must equal.

They hold (B, T, V) float32 logits for π_w, π_l and π_θ at once; iqstar.py runs the chunked ones. The tests check
the chunked forms against these (tests/test_logprobs.py, tests/test_zero3.py), and make bench measures both.
"""

import torch

from credit import response_logits, token_logprobs
from iqstar import superior_logprobs


@torch.no_grad()
def superior_targets(model_w, model_l, principled, plain, responses, alpha, pad_token_id, device):
    """log π̂(y_t), (B, T), as iqstar.superior_targets."""
    logits_w, ids, _ = response_logits(model_w, principled, responses, pad_token_id, device)  # π_w
    logits_l, _, _ = response_logits(model_l, plain, responses, pad_token_id, device)  # π_l
    return superior_logprobs(logits_w, logits_l, alpha).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def policy_logprobs(model, prompts, responses, pad_token_id, device):
    """log π_θ(y_t) and the response mask, (B, T) each, as iqstar.policy_logprobs."""
    logits, ids, mask = response_logits(model, prompts, responses, pad_token_id, device)
    return token_logprobs(logits, ids), mask
