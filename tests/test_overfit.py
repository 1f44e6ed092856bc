"""A tiny GPT-2 trained with iqstar's own functions, in plain PyTorch, converges to π̂ on a few fixed prompts."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import world
from iqstar import (
    format_prompt,
    iqstar_loss,
    policy_logprobs,
    sample_responses,
    superior_logprobs,
    superior_targets,
    use_pure_sampling,
)


def next_token_distributions(policy, reference, plain, principled, alpha):
    """π_θ and π̂ over the first response token, per prompt: (N, V) each."""
    with torch.no_grad():
        policy_p = torch.stack([policy(torch.tensor([x])).logits[0, -1].softmax(-1) for x in plain])
        target_p = torch.stack(
            [
                superior_logprobs(
                    reference(torch.tensor([w])).logits[0, -1], reference(torch.tensor([x])).logits[0, -1], alpha
                ).exp()
                for x, w in zip(plain, principled, strict=True)
            ]
        )
    return policy_p, target_p


def test_tiny_gpt2_overfits_to_the_superior_policy(world_model):
    """The world's SFT GPT-2 (π_w and π_l differ on unsafe prompts) as μ and as the frozen model."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(world_model)
    policy = AutoModelForCausalLM.from_pretrained(world_model)
    reference = AutoModelForCausalLM.from_pretrained(world_model).eval().requires_grad_(False)
    alpha, pad, eos = 1.4, tokenizer.pad_token_id, [tokenizer.eos_token_id]
    conversations = [
        [{"role": "user", "content": p}]
        for p in ("how do i make a bomb", "how do i bake a cake", "tell me how to steal a car")
    ]
    plain = [format_prompt(tokenizer, c) for c in conversations]
    principled = [format_prompt(tokenizer, c, world.PRINCIPLE) for c in conversations]
    use_pure_sampling(policy, max_new_tokens=3, eos_token_ids=eos, pad_token_id=pad)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)

    policy_p, target_p = next_token_distributions(policy.eval(), reference, plain, principled, alpha)
    tv_before = (policy_p - target_p).abs().sum(-1).mean() / 2
    losses = []
    for _ in range(60):  # Algorithm 1 with the loop's own building blocks
        xs, ws = plain * 8, principled * 8
        ys = sample_responses(policy.eval(), xs, policy.generation_config, "cpu")
        targets = superior_targets(reference, reference, ws, xs, ys, alpha, pad, "cpu")
        policy_logps, mask = policy_logprobs(policy.train(), xs, ys, pad, "cpu")
        loss = iqstar_loss(policy_logps, targets, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    policy_p, target_p = next_token_distributions(policy.eval(), reference, plain, principled, alpha)
    tv_after = (policy_p - target_p).abs().sum(-1).mean() / 2
    # The loss is measured on fresh samples, so a rare token makes a spike now and then: use the median.
    assert sorted(losses[-10:])[5] < min(0.05, 0.05 * losses[0]), losses  # ~3.3 -> ~0.02
    assert tv_after < 0.1 < tv_before, (tv_before, tv_after)
