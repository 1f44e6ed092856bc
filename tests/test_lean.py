"""The lean log-prob path (chunked over positions, one forward for π_w and π_l) against the straightforward one."""
import pytest
import torch

import iqstar
import reference


def test_chunked_token_logprobs_equal_the_full_vocabulary_formula_values_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    ids = torch.randint(0, 50, (3, 7))
    weights = torch.randn(3, 7)  # any downstream use of the log-probs
    expected = reference.token_logprobs(head(hidden), ids)
    (expected * weights).sum().backward()
    grads = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = head.weight.grad = head.bias.grad = None
    # chunks of one position (a V-sized row each), of three (not a divisor of 7), and one chunk for all
    for chunk_elements in (1, 3 * 3 * 50, 10 ** 9):
        got = iqstar.chunked_token_logprobs(head, hidden, ids, chunk_elements=chunk_elements)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        (got * weights).sum().backward()
        for g, e in zip([hidden.grad, head.weight.grad, head.bias.grad], grads):
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
        iqstar.chunked_token_logprobs(head, hidden, ids, chunk_elements=8 * 1000)  # 8 chunks of 8 positions
    assert max(saved) < 64 * 1000 / 4, saved  # the full (1, 64, 1000) logits are never saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference.token_logprobs(head(hidden), ids)
    assert max(saved) >= 64 * 1000  # the straightforward path does save them: the check above can fail


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.4, 2.5])
def test_chunked_superior_logprobs_equal_the_full_vocabulary_formula(alpha):
    torch.manual_seed(2)
    head_w, head_l = torch.nn.Linear(16, 40), torch.nn.Linear(16, 40)
    hidden_w, hidden_l = torch.randn(2, 9, 16) * 3, torch.randn(2, 9, 16)
    ids = torch.randint(0, 40, (2, 9))
    expected = iqstar.superior_logprobs(head_w(hidden_w), head_l(hidden_l), alpha)
    expected = expected.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    for chunk_elements in (1, 2 * 4 * 40, 10 ** 9):
        got = iqstar.chunked_superior_logprobs(head_w, hidden_w, head_l, hidden_l, ids, alpha, chunk_elements)
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


def test_lean_targets_in_one_forward_equal_two_separate_forwards(tiny_model, world_model):
    """π_w and π_l from one model: one forward over principled + plain (2B rows) = the two forwards of
    superior_targets; and the separate-model path (an aligned π_w, §5.3) too."""
    model = iqstar.load_model(tiny_model, torch.float32).eval()
    aligned = iqstar.load_model(world_model, torch.float32).eval()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    for model_w, principled, forwards in ((model, PRINCIPLED, 1), (aligned, PROMPTS, 1)):
        for alpha in (1.0, 1.4):
            expected = reference.superior_targets(model_w, model, principled, PROMPTS, RESPONSES, alpha, 0, "cpu")
            calls.clear()
            got = iqstar.lean_superior_targets(model_w, model, principled, PROMPTS, RESPONSES, alpha, 0, "cpu",
                                               chunk_elements=3 * 100)
            assert len(calls) == forwards
            assert [len(t) for t in got] == [len(y) for y in RESPONSES]
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_lean_policy_loss_equals_policy_loss_values_and_gradients(tiny_model):
    model = iqstar.load_model(tiny_model, torch.float32).train()
    torch.manual_seed(3)
    targets = [-torch.rand(len(y)) * 5 for y in RESPONSES]
    loss, credit, mask = reference.policy_loss(model, PROMPTS, RESPONSES, targets, 0, "cpu")
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lean_loss, lean_credit, lean_mask = iqstar.lean_policy_loss(model, PROMPTS, RESPONSES, targets, 0, "cpu",
                                                                chunk_elements=1)
    lean_loss.backward()
    torch.testing.assert_close(lean_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean_credit, credit, rtol=1e-5, atol=1e-5)
    assert torch.equal(lean_mask, mask)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert sum(g.abs().sum() for g in expected.values()) > 0
