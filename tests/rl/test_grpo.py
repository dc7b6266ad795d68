"""The GRPO family's pieces against their papers' formulas, written out by hand on small
tensors: group-relative advantages (GRPO; Dr. GRPO's unscaled ones), the clipped objective with
DAPO's asymmetric bounds, each aggregation (GRPO's sequence mean, DAPO's token sum, Dr. GRPO's
constant, BNPO's batch mean, GSPO's sequence-level ratio), the KL estimators, DAPO's soft
overlong penalty and its dynamic sampling; completions sampled alike in any batch; the
built-in rewards and a failing reward function's one-line error."""

import math

import pytest
import torch

from attune import rl
from attune.demo.tiny import tiny_checkpoint
from attune.errors import ConfigError, RewardError
from attune.models import from_pretrained
from attune.rl.grpo import STD_EPSILON


def test_group_advantages_are_rewards_against_their_group():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])  # 2 groups of 4
    advantages, uniform = rl.group_advantages(rewards, 4, "group")
    first = [1.0, 0.0, 0.5, 0.5]
    mean = sum(first) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in first) / 3)  # unbiased, as TRL's nanstd
    expected = [(r - mean) / (std + STD_EPSILON) for r in first] + [0.0] * 4
    assert advantages.tolist() == pytest.approx(expected, abs=1e-6)
    assert uniform.tolist() == [False, True]

    unscaled, _ = rl.group_advantages(rewards, 4, "none")  # Dr. GRPO
    assert unscaled.tolist() == pytest.approx([r - mean for r in first] + [0.0] * 4)

    batch_scaled, _ = rl.group_advantages(rewards, 4, "batch")
    values = rewards.tolist()
    batch_mean = sum(values) / 8
    batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in values) / 7)
    assert batch_scaled.tolist() == pytest.approx(
        [(r - mean) / (batch_std + STD_EPSILON) for r in first] + [0.0] * 4, abs=1e-6
    )


def _case():
    """Two completions of 3 and 2 tokens, with ratios on both sides of the clip range."""
    logprobs = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -0.5, -1.0], [-0.1, -1.0, 0.0]])
    advantages = torch.tensor([1.5, -0.7])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return logprobs, old, advantages, mask


def _token_terms(logprobs, old, advantages, mask, low, high):
    """PPO's clipped surrogate per token, ``-min(r A, clip(r, 1 - low, 1 + high) A)``,
    written out element by element."""
    terms = []
    for i in range(logprobs.shape[0]):
        row = []
        for t in range(logprobs.shape[1]):
            if not mask[i, t]:
                continue
            r = math.exp(float(logprobs[i, t].detach() - old[i, t]))
            a = float(advantages[i])
            row.append(-min(r * a, min(max(r, 1 - low), 1 + high) * a))
        terms.append(row)
    return terms


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_each_aggregation_is_its_papers_formula(loss_type):
    logprobs, old, advantages, mask = _case()
    settings = rl.GRPOSettings(num_generations=2, loss_type=loss_type, epsilon_high=0.28)
    loss, stats = rl.grpo_loss(logprobs, old, advantages, mask, settings, max_new_tokens=5)
    terms = _token_terms(logprobs, old, advantages, mask, 0.2, 0.28)
    every = [value for row in terms for value in row]
    expected = {
        "grpo": sum(sum(row) / len(row) for row in terms),  # then / completions (the units)
        "dapo": sum(every),  # then / tokens (the units)
        "dr_grpo": sum(every) / 5,  # then / completions
        "bnpo": sum(every) / len(every),  # one unit: the micro-batch
    }[loss_type]
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert settings.units(mask) == {"grpo": 2, "dapo": 5, "dr_grpo": 2, "bnpo": 1}[loss_type]
    # ratios: exp(0.2)=1.22 (inside 1.28), exp(-1)=0.37 with A > 0 (kept: the min is the
    # unclipped term), exp(-0.2)=0.82 with A < 0 (inside), exp(-0.2) likewise
    assert float(stats["clip_high"]) == 0 and float(stats["clip_low"]) == 0


def test_clip_higher_bounds_the_ratio_asymmetrically():
    logprobs = torch.tensor([[0.25, -0.5]], requires_grad=True)  # ratios 1.28.., 0.61
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    for advantage, high, expected_high, expected_low in [
        (1.0, 0.2, 1, 0),  # 1.284 > 1.2 with A > 0: clipped (no gradient)
        (1.0, 0.3, 0, 0),  # DAPO's wider upper bound lets it through
        (-1.0, 0.2, 0, 1),  # 0.61 < 0.8 with A < 0: clipped
    ]:
        settings = rl.GRPOSettings(num_generations=2, loss_type="dapo", epsilon_high=high)
        loss, stats = rl.grpo_loss(
            logprobs, old, torch.tensor([advantage]), mask, settings, max_new_tokens=2
        )
        assert (float(stats["clip_high"]), float(stats["clip_low"])) == (
            expected_high,
            expected_low,
        )
        (grad,) = torch.autograd.grad(loss, logprobs)
        ratios = torch.exp(logprobs.detach())[0]
        for t in range(2):
            clipped = (advantage > 0 and ratios[t] > 1 + high) or (
                advantage < 0 and ratios[t] < 0.8
            )
            # d(-r A)/d log p = -r A where not clipped, 0 where the clip holds
            want = 0.0 if clipped else -float(ratios[t]) * advantage
            assert float(grad[0, t]) == pytest.approx(want, rel=1e-6)


def test_gspo_clips_one_sequence_level_ratio():
    logprobs, old, advantages, mask = _case()
    settings = rl.GRPOSettings(
        num_generations=2, loss_type="gspo", epsilon_low=3e-4, epsilon_high=4e-4
    )
    loss, _ = rl.grpo_loss(logprobs, old, advantages, mask, settings, max_new_tokens=5)
    expected = 0.0
    for i, length in enumerate([3, 2]):
        log_ratio = sum(float(logprobs[i, t].detach() - old[i, t]) for t in range(length)) / length
        s = math.exp(log_ratio)  # the geometric mean of the token ratios
        a = float(advantages[i])
        expected += -min(s * a, min(max(s, 1 - 3e-4), 1 + 4e-4) * a)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_the_kl_term_adds_beta_times_the_estimator(estimator):
    logprobs, old, advantages, mask = _case()
    ref = torch.tensor([[-0.8, -0.9, -1.5], [-0.4, -1.0, 0.0]])
    plain = rl.GRPOSettings(num_generations=2, loss_type="dapo")
    weighted = rl.GRPOSettings(num_generations=2, loss_type="dapo", beta=0.04,
                               kl_estimator=estimator)  # fmt: skip
    base, _ = rl.grpo_loss(logprobs, old, advantages, mask, plain, 5)
    loss, stats = rl.grpo_loss(logprobs, old, advantages, mask, weighted, 5, ref)
    kl = 0.0
    for i, t in mask.nonzero().tolist():
        x = float(logprobs[i, t].detach() - ref[i, t])  # log(p / p_ref)
        kl += {"k1": x, "k2": x * x / 2, "k3": math.exp(-x) - 1 + x}[estimator]
    assert float(stats["kl"]) == pytest.approx(kl, rel=1e-6)
    assert float(loss) == pytest.approx(float(base) + 0.04 * kl, rel=1e-6)
    assert float(stats["policy_loss"]) == pytest.approx(float(base), rel=1e-6)


def test_overlong_penalty_is_dapos_soft_punishment():
    lengths = torch.tensor([10, 12, 14, 16])
    penalty = rl.overlong_penalty(lengths, max_new_tokens=16, buffer=4, penalty=1.0)
    # 0 up to 16 - 4 = 12 tokens, then (12 - length) / 4, reaching -1 at 16
    assert penalty.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_generations": 1}, "grpo.num_generations must be at least 2"),
        ({"epsilon_low": 0.2, "epsilon_high": 0.1}, "grpo.epsilon_high must be >= epsilon_low"),
        ({"loss_type": "ppo"}, "grpo.loss_type must be one of grpo, dapo"),
        ({"scale_rewards": "rank"}, "grpo.scale_rewards must be group, batch or none"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        rl.GRPOSettings(**settings)


def test_dr_grpo_does_not_scale_by_the_std_and_minibatches_must_divide():
    assert rl.GRPOSettings(loss_type="dr_grpo").scale_rewards == "none"
    assert rl.GRPOSettings(loss_type="grpo").scale_rewards == "group"
    with pytest.raises(ConfigError, match="minibatch_size=5 must divide the 16"):
        rl.GRPOSettings(minibatch_size=5).minibatches(16)
    # whole groups per minibatch: 4 completions of groups of 8 would split a group
    with pytest.raises(ConfigError, match="multiple of num_generations=8"):
        rl.GRPOSettings(minibatch_size=4).minibatches(16)
    assert rl.GRPOSettings(minibatch_size=8).minibatches(16) == 2


def test_minibatches_hold_the_same_groups_on_any_number_of_processes():
    """Process r holds the global batch's groups k * world + r; its j-th minibatch and the
    others' together are one process's j-th minibatch, in the same order of steps."""
    generations, groups, minibatches = 2, 8, 2

    def steps(completions):
        generator = torch.Generator().manual_seed(3)
        return list(rl.group_minibatch_rows(completions, 2, minibatches, generator))

    world = 2
    one = steps(groups * generations)
    per_rank = [steps(groups * generations // world) for _ in range(world)]

    def global_groups(rows, rank):  # a local row's global group
        return {(row // generations) * world + rank for row in rows.tolist()}

    for step, rows in enumerate(one):
        together = set().union(*(global_groups(per_rank[r][step], r) for r in range(world)))
        assert together == {row // generations for row in rows.tolist()}, step
    assert len(one) == 4  # two passes of two minibatches


def _group(order, rewards):
    return rl.Group(order, [1], "p", {}, [[2]] * len(rewards), [list(rewards)], list(rewards))


def test_dynamic_sampling_keeps_the_first_varied_groups_in_global_order():
    groups = [_group((1, 0), [1, 1]), _group((1, 1), [0, 1]), _group((2, 0), [1, 0]),
              _group((1, 2), [0, 0]), _group((2, 1), [0, 1])]  # fmt: skip
    chosen, dropped, filled = rl.batch_groups(groups, groups_per_process=2, rank=0, world_size=1)
    assert [g.order for g in chosen] == [(1, 1), (2, 0)] and (dropped, filled) == (3, 0)
    # short of varied groups: the earliest unvaried ones fill the batch, in order
    chosen, dropped, filled = rl.batch_groups(groups[:2], 2, 0, 1)
    assert [g.order for g in chosen] == [(1, 0), (1, 1)] and (dropped, filled) == (0, 1)


def test_a_completion_samples_alike_in_any_batch(tmp_path):
    """Each completion has its own seeded generator: a prompt answered in a batch of two, or
    alone, gives the same completions (what makes 2 processes sample as 1)."""
    model = from_pretrained(tiny_checkpoint()).eval()
    prompts = [[5, 9, 11, 4], [7, 3]]

    def sample(indices, rows):
        batch = [{"prompts": [prompts[i] for i in rows], "texts": ["t"] * len(rows),
                  "columns": [{}] * len(rows), "indices": indices}]  # fmt: skip

        def score(rollout, texts, columns):
            n = rollout.tokens.shape[0]
            return torch.zeros(1, n), torch.arange(n, dtype=torch.float32)

        return rl.sample_groups(
            model, batch, score, num_generations=3, max_new_tokens=6,
            sampling={"temperature": 1.0, "top_k": None, "top_p": None}, stop_tokens=[2],
            pad_id=0, seed=0, step=4, round_index=1,
        )  # fmt: skip

    together = sample([10, 20], [0, 1])
    alone = sample([20], [1])
    assert together[1].responses == alone[0].responses
    assert len({tuple(r) for r in together[0].responses}) > 1  # sampled, not greedy
    assert rl.completion_seed(0, 4, 20, 0) != rl.completion_seed(0, 5, 20, 0)


def test_rewards_weigh_their_sources_and_name_them():
    def exact(prompts, completions, answer, **_):
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    def short(prompts, completions, **_):
        return [float(len(c) < 3) for c in completions]

    rewards = rl.Rewards([rl.FunctionReward(exact), rl.FunctionReward(short)], [1.0, 0.5])
    rollout = rl.Rollout.from_tokens([[1], [1]], [[2], [2]], [2], 0)
    scores = rewards.scores(rollout, ["p", "q"], ["ab", "abcd"], [{"answer": "ab"}] * 2)
    assert scores.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert rewards.total(scores).tolist() == [1.5, 0.0]
    assert rewards.names == ["exact", "short"]
    with pytest.raises(ConfigError, match=r"reward\.weights has 1 numbers for 2 sources"):
        rl.Rewards([rl.FunctionReward(exact), rl.FunctionReward(short)], [1.0])


def test_a_failing_reward_function_is_named_with_its_row():
    def picky(prompts, completions, **_):
        return [1.0 / (len(c) - 4) for c in completions]  # fails on a 4-character completion

    rollout = rl.Rollout.from_tokens([[1]] * 3, [[2]] * 3, [2], 0)
    source = rl.FunctionReward(picky)
    with pytest.raises(RewardError) as raised:
        source(rollout, ["a", "b", "c"], ["xx", "four", "yyy"], [{}] * 3)
    message = str(raised.value)
    assert "reward function picky raised ZeroDivisionError" in message
    assert "on row 1 (prompt 'b')" in message and "\n" not in message

    for returned, expected in [
        ([1.0], "returned 1 scores for 3 completions"),
        ([1.0, "good", 0.0], "returned 'good' for row 1"),
        ([1.0, None, 0.0], "returned None for row 1"),
    ]:
        bad = rl.FunctionReward(lambda prompts, completions, value=returned, **_: value)
        with pytest.raises(RewardError, match=expected):
            bad(rollout, ["a", "b", "c"], ["x"] * 3, [{}] * 3)


def test_math_answer_reward_uses_math_verify():
    pytest.importorskip("math_verify")
    completions = ["so the total is \\boxed{1,234}.", "It is 0.5", "1/2", "I think 73"]
    answers = ["She sells ... #### 1,234", "\\frac{1}{2}", "#### 0.5", "#### 72"]
    assert rl.math_answer_reward([""] * 4, completions, answers) == [1.0, 1.0, 1.0, 0.0]


def test_format_reward_matches_the_whole_completion():
    completions = ["<think>a\nb</think> <answer>4</answer>", "<answer>4</answer>", "x \\boxed{3}"]
    assert rl.format_reward([""] * 3, completions) == [1.0, 0.0, 0.0]
    assert rl.format_reward([""] * 3, completions, pattern=r"(?s).*\\boxed\{.+\}") == [
        0.0,
        0.0,
        1.0,
    ]
    with pytest.raises(ConfigError, match="is not a regex"):
        rl.format_reward([""], ["x"], pattern="(")


def test_batch_scaling_is_exact_far_from_zero():
    """The batch's standard deviation from the squares about its mean: rewards offset by 1000
    give the advantages of the same rewards about 0 (a sum of squares less count x mean²
    would lose every digit in fp32)."""
    rewards = torch.tensor([0.0, 0.05, 0.1, 0.02, -0.03, 0.07, 0.01, 0.04])
    near, _ = rl.group_advantages(rewards, 4, "batch")
    far, _ = rl.group_advantages(rewards + 1000.0, 4, "batch")
    assert torch.allclose(near, far, atol=2e-3), (near, far)


def test_log_probabilities_are_taken_at_the_sampling_temperature():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden, targets = torch.randn(5, 8), torch.randint(0, 11, (5,))
    for temperature in (1.0, 0.7):
        got = rl.token_logprobs(hidden, targets, rl.tempered(head, temperature))
        expected = (head(hidden) / temperature).log_softmax(-1).gather(-1, targets[:, None])
        assert torch.allclose(got, expected.squeeze(-1), atol=1e-6)


def test_a_reward_function_returning_nan_or_numpy_is_judged_by_its_values():
    numpy = pytest.importorskip("numpy")
    rollout = rl.Rollout(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool),
                         1, torch.ones(2, 2, dtype=torch.bool), torch.ones(2, dtype=torch.bool))  # fmt: skip

    def as_numpy(prompts, completions, **_):
        return numpy.array([0.5, 1.0], dtype=numpy.float32)

    def with_nan(prompts, completions, **_):
        return [0.5, float("nan")]

    scores = rl.FunctionReward(as_numpy)(rollout, ["a", "b"], ["x", "y"], [{}, {}])
    assert scores.tolist() == [0.5, 1.0]
    with pytest.raises(RewardError, match="with_nan returned nan for row 1"):
        rl.FunctionReward(with_nan)(rollout, ["a", "b"], ["x", "y"], [{}, {}])
