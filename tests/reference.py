"""The straightforward, full-vocabulary forms of iqstar's scoring and loss: what its lean versions must equal.

They hold (B, T, V) float32 logits for π_w, π_l and π_θ at once; iqstar.py runs the lean ones.
"""
import torch

from credit import response_logits, token_logprobs
from iqstar import iqstar_loss, superior_logprobs


@torch.no_grad()
def superior_targets(model_w, model_l, principled, plain, responses, alpha, pad_token_id, device):
    """log π̂(y_t) at each sampled token, as iqstar.lean_superior_targets: a (T_i,) tensor per response."""
    logits_w, ids, _ = response_logits(model_w, principled, responses, pad_token_id, device)  # π_w
    logits_l, _, _ = response_logits(model_l, plain, responses, pad_token_id, device)  # π_l
    target = superior_logprobs(logits_w, logits_l, alpha).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return [t[:len(y)] for t, y in zip(target, responses)]


def policy_loss(model, prompts, responses, targets, pad_token_id, device):
    """L, the (B, T) credit and the mask, as iqstar.lean_policy_loss."""
    logits, ids, mask = response_logits(model, prompts, responses, pad_token_id, device)
    policy_logps = token_logprobs(logits, ids)
    target_logps = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True)
    return iqstar_loss(policy_logps, target_logps, mask), (target_logps - policy_logps.detach()) * mask, mask
