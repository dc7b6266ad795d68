"""Rollouts with the KV cache give the tokens of generation without it (greedy), whatever the
padding: prompts of different lengths (left padding) and responses that stop at different
times (right padding); and the rollout's scores are each row's scores alone."""

import pytest
import torch

from attune import models, rl

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
PROMPTS = [[5, 9, 11, 3, 7, 20], [8, 4], [30, 31, 32, 33]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = models.from_hf_config(CONFIG).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


@torch.no_grad()
def greedy_without_cache(model, prompt, max_new_tokens, stops):
    """Each token from a full forward pass over the unpadded sequence so far."""
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([tokens]))[0, -1]
        tokens.append(int(logits.argmax()))
        if tokens[-1] in stops:
            break
    return tokens[len(prompt) :]


def stop_tokens_that_end_rows_early(model):
    """Tokens the greedy responses produce first, so that rows stop at different steps."""
    firsts = [greedy_without_cache(model, prompt, 8, ())[2] for prompt in PROMPTS]
    return [firsts[0]]


def test_cached_rollout_equals_uncached_greedy_generation(model):
    stops = stop_tokens_that_end_rows_early(model)
    rollout = rl.generate_rollout(model, PROMPTS, 8, temperature=0.0, stop_tokens=stops, pad_id=0)
    lengths = rollout.response_lengths.tolist()
    assert len(set(lengths)) > 1  # right padding: responses end at different steps
    prompt_len = rollout.prompt_len
    for row, prompt in enumerate(PROMPTS):
        expected = greedy_without_cache(model, prompt, 8, stops)
        assert rollout.responses[row, : lengths[row]].tolist() == expected
        assert rollout.stopped[row].item() == (expected[-1] in stops)
        # the layout: prompt right-aligned, padding masked out on both sides
        assert rollout.tokens[row, prompt_len - len(prompt) : prompt_len].tolist() == prompt
        assert rollout.padding_mask[row].sum().item() == len(prompt) + lengths[row]


def test_rollout_scores_equal_each_row_scored_alone(model):
    stops = stop_tokens_that_end_rows_early(model)
    rollout = rl.generate_rollout(model, PROMPTS, 8, temperature=0.0, stop_tokens=stops, pad_id=0)
    logprobs = rl.response_logprobs(model, rollout)
    torch.manual_seed(1)
    reference = models.from_hf_config(CONFIG).eval()
    with torch.no_grad():
        hidden = rl.response_hidden(model, rollout)
        ref_hidden = rl.response_hidden(reference, rollout)
    scored = rl.score_rollout(
        hidden, ref_hidden, rollout, model.output, reference.output, chunk_size=3
    )
    # the update phase's own figure (projected in other chunks: rounding only)
    assert torch.allclose(scored.logprobs, logprobs.detach(), atol=1e-6)
    for row, prompt in enumerate(PROMPTS):
        n = int(rollout.response_lengths[row])
        sequence = torch.tensor([prompt + rollout.responses[row, :n].tolist()])
        targets = sequence[0, len(prompt) :, None]
        with torch.no_grad():
            log_p = model(sequence)[0, len(prompt) - 1 : -1].log_softmax(-1)
            log_q = reference(sequence)[0, len(prompt) - 1 : -1].log_softmax(-1)
        alone = log_p.gather(-1, targets).squeeze(-1)
        assert torch.allclose(logprobs[row, :n], alone, atol=1e-5)
        assert torch.allclose(
            scored.reference_logprobs[row, :n], log_q.gather(-1, targets).squeeze(-1), atol=1e-5
        )
        assert torch.allclose(scored.entropy[row, :n], -(log_p.exp() * log_p).sum(-1), atol=1e-5)
        kl = torch.distributions.kl_divergence(
            torch.distributions.Categorical(logits=log_p),
            torch.distributions.Categorical(logits=log_q),
        )
        assert torch.allclose(scored.kl_vocab[row, :n], kl, atol=1e-5)
        for column in (logprobs, *vars(scored).values()):
            assert column[row, n:].abs().sum() == 0


def test_response_kl_is_torch_distributions_kl_at_each_position(model):
    """The exact KL over the vocabulary against torch.distributions' own, position by
    position, for a reference that differs from the policy; its gradient reaches the policy."""
    stops = stop_tokens_that_end_rows_early(model)
    rollout = rl.generate_rollout(model, PROMPTS, 8, temperature=0.0, stop_tokens=stops, pad_id=0)
    torch.manual_seed(1)
    reference = models.from_hf_config(CONFIG).eval()
    with torch.no_grad():
        ref_hidden = rl.response_hidden(reference, rollout)
    hidden = rl.response_hidden(model, rollout)
    kl = rl.response_kl(hidden, ref_hidden, rollout, model.output, reference.output, chunk_size=3)
    policy_dist = torch.distributions.Categorical(logits=model.output(hidden).float())
    reference_dist = torch.distributions.Categorical(logits=reference.output(ref_hidden).float())
    expected = torch.distributions.kl_divergence(policy_dist, reference_dist)
    mask = rollout.response_mask
    assert torch.allclose(kl[mask], expected[mask], atol=1e-5)
    assert kl[~mask].abs().sum() == 0 and kl[mask].min() > 0
    kl.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_sampled_rollouts_repeat_with_the_same_generator(model):
    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return rl.generate_rollout(
            model, PROMPTS, 6, temperature=1.0, top_k=20, generator=generator
        )

    assert torch.equal(sample(3).tokens, sample(3).tokens)
    assert not torch.equal(sample(3).tokens, sample(4).tokens)


def test_value_and_reward_heads_read_the_right_positions(tmp_path):
    torch.manual_seed(0)
    critic = models.from_hf_config(
        {**CONFIG, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1}
    ).eval()
    rollout = rl.Rollout.from_tokens([[5, 6, 7], [8]], [[9, 2], [10, 11, 12]], [2], pad_id=0)
    values = rl.response_values(critic, rollout)
    scores = rl.sequence_end_scores(critic, rollout)
    for row, (prompt, response) in enumerate([([5, 6, 7], [9, 2]), ([8], [10, 11, 12])]):
        with torch.no_grad():
            alone = critic(torch.tensor([prompt + response]))[0, :, 0]
        n = len(response)
        assert torch.allclose(values[row, :n], alone[len(prompt) - 1 : -1], atol=1e-5)
        assert values[row, n:].abs().sum() == 0
        assert scores[row].item() == pytest.approx(alone[-1].item(), abs=1e-5)
    assert rollout.stopped.tolist() == [True, False]
