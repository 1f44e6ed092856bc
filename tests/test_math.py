"""The estimator, the loss and the masks, against the paper's formulas written out naively."""

import torch
from transformers import AutoModelForCausalLM

from credit import response_logits, token_logprobs
from iqstar import completion_mask, iqstar_loss, sample_responses, superior_logprobs, use_pure_sampling


def test_superior_logprobs_is_the_normalised_geometric_mixture():
    torch.manual_seed(0)
    logits_w, logits_l = torch.randn(2, 3, 5, 11), torch.randn(2, 3, 5, 11) * 3
    for alpha in (0.5, 1.4, 2.0):
        p_w, p_l = logits_w.softmax(-1), logits_l.softmax(-1)
        naive = p_w**alpha * p_l ** (1 - alpha)
        naive = naive / naive.sum(-1, keepdim=True)  # softmax(α log π_w + (1−α) log π_l)
        got = superior_logprobs(logits_w, logits_l, alpha)
        torch.testing.assert_close(got.exp(), naive, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.logsumexp(-1), torch.zeros(2, 3, 5))


def test_alpha_one_gives_pi_w_and_alpha_zero_gives_pi_l():
    torch.manual_seed(1)
    logits_w, logits_l = torch.randn(4, 7, 13), torch.randn(4, 7, 13)
    torch.testing.assert_close(superior_logprobs(logits_w, logits_l, 1.0), logits_w.log_softmax(-1))
    torch.testing.assert_close(superior_logprobs(logits_w, logits_l, 0.0), logits_l.log_softmax(-1))


def test_alpha_above_one_moves_past_pi_w():
    logits_w, logits_l = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p_w = logits_w.softmax(-1)[0, 0]
    assert superior_logprobs(logits_w, logits_l, 1.4).exp()[0, 0] > p_w


def test_loss_gradient_is_minus_two_credit_over_token_count():
    torch.manual_seed(2)
    policy = torch.randn(3, 6, requires_grad=True)
    target = torch.randn(3, 6, requires_grad=True)
    mask = torch.rand(3, 6) > 0.3
    loss = iqstar_loss(policy, target, mask)
    loss.backward()
    m = mask.float()
    expected = -2 * m * (target.detach() - policy.detach()) / m.sum()
    torch.testing.assert_close(policy.grad, expected)
    assert target.grad is None  # the target is a label, never trained
    torch.testing.assert_close(loss, (m * (target - policy) ** 2).sum() / m.sum())


def test_loss_reaches_the_policy_only_through_log_pi_theta():
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 9, requires_grad=True)
    ids = torch.randint(0, 9, (2, 4))
    target_logits = torch.randn(2, 4, 9, requires_grad=True)
    target = token_logprobs(target_logits, ids)
    iqstar_loss(token_logprobs(logits, ids), target, torch.ones(2, 4)).backward()
    assert logits.grad.abs().sum() > 0 and target_logits.grad is None


def test_masked_positions_never_contribute_even_when_garbage():
    torch.manual_seed(4)
    policy, target = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    clean = iqstar_loss(policy, target, mask)
    policy[0, 3:], target[0, 3:] = float("inf"), float("-inf")  # e.g. logits at padding
    torch.testing.assert_close(iqstar_loss(policy, target, mask), clean)


def test_all_masked_batch_gives_zero_not_nan():
    loss = iqstar_loss(torch.randn(2, 3, requires_grad=True), torch.randn(2, 3), torch.zeros(2, 3))
    assert loss.item() == 0.0


def test_completion_mask_keeps_up_to_and_including_the_first_eos():
    eos, pad = 2, 0
    ids = torch.tensor(
        [
            [5, 6, eos, pad, pad],  # ended: EOS counts, padding does not
            [5, eos, 7, eos, 8],  # tokens after the first EOS never count
            [5, 6, 7, 8, 9],  # hit the length limit: every token counts
            [eos, pad, pad, pad, pad],
        ]
    )  # an immediate EOS is one decision
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    assert torch.equal(completion_mask(ids, [eos]), expected)
    assert torch.equal(completion_mask(ids, [eos, 9])[2], torch.tensor([1, 1, 1, 1, 1]).bool())
    assert torch.equal(completion_mask(ids, [eos, 7])[2], torch.tensor([1, 1, 1, 0, 0]).bool())


def test_left_padded_batch_gives_each_sample_its_own_values(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompts = [[4, 9, 12, 30, 7, 8], [11, 5]]
    responses = [[20, 21], [22, 23, 24, 25, 2]]
    with torch.no_grad():
        logits, ids, mask = response_logits(model, prompts, responses, 0, "cpu")
        batched = token_logprobs(logits, ids)
        for i in range(2):
            alone_logits, alone_ids, _ = response_logits(model, prompts[i : i + 1], responses[i : i + 1], 0, "cpu")
            alone = token_logprobs(alone_logits, alone_ids)[0]
            torch.testing.assert_close(batched[i][mask[i]], alone, rtol=1e-4, atol=1e-5)  # its last tokens
            assert mask[i].sum() == len(responses[i])
            full = model(torch.tensor([prompts[i] + responses[i]])).logits[0, len(prompts[i]) - 1 : -1]
            torch.testing.assert_close(alone, token_logprobs(full, torch.tensor(responses[i])), rtol=1e-4, atol=1e-5)


def test_sampling_ignores_the_models_generation_config(tiny_model):
    """The hub's generation_config (here top_k=1) must not truncate π_θ: y is drawn from π_θ itself."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model.generation_config.top_k = 1
    prompt = [4, 9, 12]
    with torch.no_grad():
        probs = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
    original = use_pure_sampling(model, max_new_tokens=1, eos_token_ids=[2], pad_token_id=0)
    assert original.top_k == 1
    torch.manual_seed(0)
    first = [r[0] for r in sample_responses(model, [prompt] * 2000, model.generation_config, "cpu")]
    counts = torch.bincount(torch.tensor(first), minlength=probs.numel()).float() / len(first)
    assert (counts > 0).sum() > 20  # far from greedy
    assert (counts - probs).abs().sum() / 2 < 0.1  # total variation to π_θ (sampling noise ≈ 0.05)


def test_sampled_responses_stop_after_the_first_eos(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    eos = 2
    use_pure_sampling(model, max_new_tokens=40, eos_token_ids=[eos], pad_token_id=0)
    torch.manual_seed(0)
    responses = sample_responses(model, [[4, 9], [5, 6, 7]] * 50, model.generation_config, "cpu")
    assert all(eos not in r[:-1] for r in responses)
    assert all(len(r) == 40 or r[-1] == eos for r in responses)
    assert len({len(r) for r in responses}) > 3
