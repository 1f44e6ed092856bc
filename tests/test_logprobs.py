"""The chunked log-probs (over positions) against the full-vocabulary forms of tools/reference.py: values, gradients,
what is kept for backward, and the forwards run."""

import pytest
import torch

import iqstar
from credit import token_logprobs
from tools import reference


def log_softmax(logits):
    return logits.float().log_softmax(-1)


def test_chunked_log_softmax_equals_the_full_vocabulary_formula_values_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    ids = torch.randint(0, 50, (3, 7))
    weights = torch.randn(3, 7)  # any downstream use of the log-probs
    expected = token_logprobs(head(hidden), ids)
    (expected * weights).sum().backward()
    grads = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = head.weight.grad = head.bias.grad = None
    # chunks of one position (a V-sized row each), of three (not a divisor of 7), and one chunk for all
    for chunk_elements in (1, 3 * 3 * 50, 10**9):
        got = iqstar.chunked(log_softmax, [head], [hidden], ids, chunk_elements)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        (got * weights).sum().backward()
        for g, e in zip([hidden.grad, head.weight.grad, head.bias.grad], grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        hidden.grad = head.weight.grad = head.bias.grad = None


def test_chunks_keep_one_chunk_of_logits_for_backward():
    """Without recomputation, every chunk's (B, c, V) logits would stay saved for backward: T·V in all."""
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 1000, bias=False)
    hidden = torch.randn(1, 64, 8, requires_grad=True)
    ids = torch.randint(0, 1000, (1, 64))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        iqstar.chunked(log_softmax, [head], [hidden], ids, chunk_elements=8 * 1000)  # 8 chunks of 8 positions
    assert max(saved, default=0) < 64 * 1000 / 4, saved  # the full (1, 64, 1000) logits are never saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(head(hidden), ids)
    assert max(saved) >= 64 * 1000  # the straightforward path does save them: the check above can fail


def test_backward_recomputes_the_head_only_when_there_are_several_chunks():
    """Recomputation (checkpoint) buys memory with several chunks; one chunk that holds everything is kept instead."""
    head, calls = torch.nn.Linear(8, 1000, bias=False), []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    ids = torch.randint(0, 1000, (2, 16))
    for chunk_elements, expected in ((None, [16]), (2 * 1000 * 4, [4] * 8)):  # 1 chunk; 4 chunks, each run twice
        calls.clear()
        hidden = torch.randn(2, 16, 8, requires_grad=True)
        iqstar.chunked(log_softmax, [head], [hidden], ids, chunk_elements).sum().backward()
        assert calls == expected and hidden.grad is not None


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.4, 2.5])
def test_chunked_superior_logprobs_equal_the_full_vocabulary_formula(alpha):
    torch.manual_seed(2)
    head_w, head_l = torch.nn.Linear(16, 40), torch.nn.Linear(16, 40)
    hidden_w, hidden_l = torch.randn(2, 9, 16) * 3, torch.randn(2, 9, 16)
    ids = torch.randint(0, 40, (2, 9))
    expected = iqstar.superior_logprobs(head_w(hidden_w), head_l(hidden_l), alpha)
    expected = expected.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    for chunk_elements in (1, 2 * 4 * 40, 10**9):
        got = iqstar.chunked(
            lambda z_w, z_l: iqstar.superior_logprobs(z_w, z_l, alpha),
            [head_w, head_l],
            [hidden_w, hidden_l],
            ids,
            chunk_elements,
        )
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


PROMPTS = [[4, 9, 12, 30, 7, 8], [11, 5], [6]]
PRINCIPLED = [[3, 7, 21] + p for p in PROMPTS[:2]] + [[3, 6]]
RESPONSES = [[20, 21], [22, 23, 24, 25, 2], [26, 2]]


def test_response_hidden_gives_the_logits_of_response_logits(tiny_model):
    model = iqstar.load_model(tiny_model, torch.float32).eval()
    with torch.no_grad():
        logits, ids, mask = reference.response_logits(model, PROMPTS, RESPONSES, 0, "cpu")
        hidden, head, lean_ids, lean_mask = iqstar.response_hidden(model, PROMPTS, RESPONSES, 0, "cpu")
    torch.testing.assert_close(head(hidden), logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, lean_ids) and torch.equal(mask, lean_mask)


def test_response_hidden_refuses_a_model_whose_logits_are_not_its_head(tiny_model):
    model = iqstar.load_model(tiny_model, torch.float32).eval()
    iqstar.response_hidden(model, PROMPTS, RESPONSES, 0, "cpu")

    def soft_cap(module, args, kwargs, out):  # what Gemma 2 does to its logits after the head
        out.logits = 30 * torch.tanh(out.logits / 30)
        return out

    model.register_forward_hook(soft_cap, with_kwargs=True)
    with pytest.raises(ValueError, match="not its output embeddings"):
        iqstar.response_hidden(model, PROMPTS, RESPONSES, 0, "cpu")


def test_superior_targets_equal_the_full_vocabulary_formula_for_one_model_and_an_aligned_one(tiny_model, world_model):
    """π_w and π_l from one model (the principle in π_w's prompt), and from two (an aligned π_w, §5.3): no forward
    beyond each one's own, and the values of the straightforward form."""
    model = iqstar.load_model(tiny_model, torch.float32).eval()
    aligned = iqstar.load_model(world_model, torch.float32).eval()
    calls = []
    model.base_model.register_forward_pre_hook(lambda m, args: calls.append(1))  # the shared start too
    mask = iqstar.make_batch(PROMPTS, RESPONSES, 0, "cpu")[4]
    assert mask.sum().item() == sum(map(len, RESPONSES))
    for model_w, principled, forwards in ((model, PRINCIPLED, 3), (aligned, PROMPTS, 1)):
        for alpha in (1.0, 1.4):
            expected = reference.superior_targets(model_w, model, principled, PROMPTS, RESPONSES, alpha, 0, "cpu")
            calls.clear()
            got = iqstar.superior_targets(
                model_w, model, principled, PROMPTS, RESPONSES, alpha, 0, "cpu", chunk_elements=3 * 100
            )
            assert len(calls) == forwards  # π_w's prompts share a first token: it, then the rows; π_l's rows
            torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)


def test_policy_logprobs_and_the_loss_equal_the_full_vocabulary_ones_values_and_gradients(tiny_model):
    model = iqstar.load_model(tiny_model, torch.float32).train()
    torch.manual_seed(3)
    target = -torch.rand(3, 5) * 5
    policy, mask = reference.policy_logprobs(model, PROMPTS, RESPONSES, 0, "cpu")
    loss = iqstar.iqstar_loss(policy, target, mask)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked_policy, chunked_mask = iqstar.policy_logprobs(model, PROMPTS, RESPONSES, 0, "cpu", chunk_elements=1)
    chunked_loss = iqstar.iqstar_loss(chunked_policy, target, chunked_mask)
    chunked_loss.backward()
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_policy[mask], policy[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(chunked_mask, mask)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert sum(g.abs().sum() for g in expected.values()) > 0


def test_a_shared_prompt_start_runs_once_and_changes_no_value_or_gradient(tiny_model):
    """Rows whose prompts start alike (a chat template's system prompt): that start runs once, as a KV cache for
    every row, and the log-probs and gradients are the straightforward form's. With gradient checkpointing, which
    would drop the cache, the rows run whole."""
    model = iqstar.load_model(tiny_model, torch.float32).train()
    start = [3, 7, 21, 9]
    prompts = [start + p for p in PROMPTS]
    target = -torch.rand(3, 5, generator=torch.Generator().manual_seed(4)) * 5
    policy, mask = reference.policy_logprobs(model, prompts, RESPONSES, 0, "cpu")
    iqstar.iqstar_loss(policy, target, mask).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    shapes = []
    model.base_model.register_forward_pre_hook(  # the shared start runs in the base model alone: no head
        lambda m, args, kwargs: shapes.append(tuple((args[0] if args else kwargs["input_ids"]).shape)), with_kwargs=True
    )
    for checkpointing, forwards in ((False, [(1, 4), (3, 8)]), (True, [(3, 12)])):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        shapes.clear()
        got, got_mask = iqstar.policy_logprobs(model, prompts, RESPONSES, 0, "cpu", chunk_elements=1)
        iqstar.iqstar_loss(got, target, got_mask).backward()
        assert shapes == forwards  # the start once, then 3 rows of the rest (the longest: 6 + 2 tokens)
        torch.testing.assert_close(got[mask], policy[mask], rtol=1e-5, atol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
