"""Knowledge distillation's losses against their formulas on hand-computed tensors: each
divergence, temperature, TRL GKD's beta ends, the mix with cross-entropy, the trained tokens
only, chunked equal to unchunked (values and gradients), a teacher with a padded vocabulary,
and settings out of range."""

import math

import pytest
import torch
import torch.nn.functional as F

from attune.errors import ConfigError
from attune.training.distillation import DistillationLoss, divergence

# two positions over a vocabulary of 3
STUDENT = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
TEACHER = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])


def softmax(row, temperature=1.0):
    exps = [math.exp(x / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def expected(kind, beta=0.5, temperature=1.0):
    values = []
    for s_row, t_row in zip(STUDENT.tolist(), TEACHER.tolist(), strict=True):
        q, p = softmax(s_row, temperature), softmax(t_row, temperature)
        if kind == "forward_kl":
            values.append(kl(p, q))
        elif kind == "reverse_kl":
            values.append(kl(q, p))
        elif kind == "symmetric_kl":
            values.append((kl(p, q) + kl(q, p)) / 2)
        else:
            m = [(1 - beta) * b + beta * a for a, b in zip(p, q, strict=True)]
            values.append(beta * kl(p, m) + (1 - beta) * kl(q, m))
    return values


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "symmetric_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_each_kl_is_its_formula(kind, temperature):
    got = divergence(STUDENT, TEACHER, kind, temperature=temperature)
    assert got.tolist() == pytest.approx(expected(kind, temperature=temperature), abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_is_the_generalized_formula(beta):
    got = divergence(STUDENT, TEACHER, "jsd", beta=beta, temperature=1.5)
    assert got.tolist() == pytest.approx(expected("jsd", beta, 1.5), abs=1e-6)


def test_jsd_ends_are_forward_and_reverse_kl_as_in_trl():
    forward, reverse = expected("forward_kl"), expected("reverse_kl")
    assert divergence(STUDENT, TEACHER, "jsd", beta=0.0).tolist() == pytest.approx(
        forward, abs=1e-6
    )
    assert divergence(STUDENT, TEACHER, "jsd", beta=1.0).tolist() == pytest.approx(
        reverse, abs=1e-6
    )
    # the plain JSD (beta 0.5) is bounded by ln 2
    assert max(divergence(STUDENT, TEACHER, "jsd", beta=0.5).tolist()) < math.log(2)


def test_identical_distributions_diverge_by_zero():
    for kind in ("forward_kl", "reverse_kl", "symmetric_kl", "jsd"):
        assert divergence(STUDENT, STUDENT, kind).abs().max().item() < 1e-6


def test_a_padded_teacher_vocabulary_is_compared_on_the_shared_ids():
    padded = torch.cat([TEACHER, torch.full((2, 5), 30.0)], dim=-1)  # padding rows, even huge
    got = divergence(STUDENT, padded, "forward_kl")
    assert got.tolist() == pytest.approx(expected("forward_kl"), abs=1e-6)


# the loss over a batch: a head of 4 hidden units onto a vocabulary of 6
HIDDEN, VOCAB, TEACHER_HIDDEN, TEACHER_VOCAB = 4, 6, 5, 8


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 7, HIDDEN, generator=generator)
    teacher_hidden = torch.randn(2, 7, TEACHER_HIDDEN, generator=generator)
    labels = torch.randint(0, VOCAB, (2, 7), generator=generator)
    labels[0, :3] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    teacher_head = torch.nn.Linear(TEACHER_HIDDEN, TEACHER_VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator))
        teacher_head.weight.copy_(torch.randn(TEACHER_VOCAB, TEACHER_HIDDEN, generator=generator))
    teacher_head.requires_grad_(False)
    return hidden, labels, head, teacher_hidden, teacher_head


def plain_loss(hidden, labels, head, teacher_hidden, teacher_head, kind, beta, temperature, ratio):
    """The same loss written out with full logits: softmax math, no chunks."""
    logits = head(hidden[:, :-1]).float()
    teacher_logits = teacher_head(teacher_hidden[:, :-1]).float()[..., :VOCAB]
    targets = labels[:, 1:]
    mask = targets != -100
    ce = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
    q = torch.softmax(logits[mask] / temperature, -1)
    p = torch.softmax(teacher_logits[mask] / temperature, -1)

    def kl_rows(a, b):
        return (a * (a.log() - b.log())).sum()

    if kind == "forward_kl":
        kd = kl_rows(p, q)
    elif kind == "reverse_kl":
        kd = kl_rows(q, p)
    elif kind == "symmetric_kl":
        kd = (kl_rows(p, q) + kl_rows(q, p)) / 2
    else:
        m = (1 - beta) * q + beta * p
        kd = beta * kl_rows(p, m) + (1 - beta) * kl_rows(q, m)
    return (1 - ratio) * ce + ratio * kd, ce, kd, int(mask.sum())


@pytest.mark.parametrize(
    ("kind", "beta"),
    [("forward_kl", 0.5), ("reverse_kl", 0.5), ("symmetric_kl", 0.5), ("jsd", 0.3)],
)
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_the_chunked_loss_and_its_gradients_are_the_plain_formulas(kind, beta, chunk_size):
    hidden, labels, head, teacher_hidden, teacher_head = batch()
    ours_hidden = hidden.clone().requires_grad_(True)
    loss_fn = DistillationLoss(kind, beta, temperature=2.0, kd_ratio=0.7, chunk_size=chunk_size)
    terms = loss_fn(ours_hidden, labels, head, teacher_hidden, teacher_head)
    terms.loss.backward()
    ours_grads = (ours_hidden.grad.clone(), head.weight.grad.clone())
    head.weight.grad = None

    plain_hidden = hidden.clone().requires_grad_(True)
    loss, ce, kd, tokens = plain_loss(
        plain_hidden, labels, head, teacher_hidden, teacher_head, kind, beta, 2.0, 0.7
    )
    loss.backward()
    assert terms.tokens == tokens == 4 + 4
    assert terms.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert terms.ce.item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms.kd.item() == pytest.approx(kd.item(), rel=1e-5)
    assert torch.allclose(ours_grads[0], plain_hidden.grad, atol=1e-5)
    assert torch.allclose(ours_grads[1], head.weight.grad, atol=1e-5)
    assert teacher_head.weight.grad is None


def test_untrained_positions_do_not_count():
    hidden, labels, head, teacher_hidden, teacher_head = batch()
    loss_fn = DistillationLoss("forward_kl", kd_ratio=1.0)
    before = loss_fn(hidden, labels, head, teacher_hidden, teacher_head).loss
    # the teacher disagreeing wildly where nothing is trained changes nothing
    changed = teacher_hidden.clone()
    changed[0, :2] = 100.0  # positions 0, 1 predict labels 1, 2: untrained
    changed[1, 4:] = -100.0  # positions 4.. predict padding (and the last predicts nothing)
    after = loss_fn(hidden, labels, head, changed, teacher_head).loss
    assert after.item() == pytest.approx(before.item(), rel=1e-6)


def test_kd_ratio_ends_are_cross_entropy_and_divergence_alone():
    hidden, labels, head, teacher_hidden, teacher_head = batch()
    only_ce = DistillationLoss(kd_ratio=0.0)(hidden, labels, head, teacher_hidden, teacher_head)
    only_kd = DistillationLoss(kd_ratio=1.0)(hidden, labels, head, teacher_hidden, teacher_head)
    targets = labels[:, 1:]
    mask = targets != -100
    ce = F.cross_entropy(head(hidden[:, :-1])[mask], targets[mask], reduction="sum")
    assert only_ce.loss.item() == pytest.approx(ce.item(), rel=1e-6)
    assert only_kd.loss.item() == pytest.approx(only_kd.kd.item(), rel=1e-6)


def test_no_trained_positions_give_zero_with_a_graph():
    hidden, labels, head, teacher_hidden, teacher_head = batch()
    hidden.requires_grad_(True)
    terms = DistillationLoss()(
        hidden, torch.full_like(labels, -100), head, teacher_hidden, teacher_head
    )
    assert terms.tokens == 0 and terms.loss.item() == 0.0
    terms.loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().max().item() == 0.0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kd_ratio": 1.5}, "loss.kd_ratio must be in [0, 1], got 1.5"),
        ({"kd_ratio": -0.1}, "loss.kd_ratio must be in [0, 1], got -0.1"),
        ({"temperature": 0.0}, "loss.temperature must be > 0, got 0.0"),
        ({"temperature": float("nan")}, "loss.temperature must be > 0, got nan"),
        ({"beta": 1.2}, "loss.beta must be in [0, 1], got 1.2"),
        ({"kind": "kl"}, "loss.kind must be one of forward_kl, reverse_kl, symmetric_kl, jsd"),
        ({"chunk_size": 0}, "loss.chunk_size must be positive, got 0"),
    ],
)
def test_settings_out_of_range_are_one_line_config_errors(settings, message):
    with pytest.raises(ConfigError) as error:
        DistillationLoss(**settings)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_kd_ratio_bounds_are_allowed():
    assert DistillationLoss(kd_ratio=0).kd_ratio == 0.0
    assert DistillationLoss(kd_ratio=1).kd_ratio == 1.0


def test_generated_rows_count_in_the_divergence_only():
    """On-policy rows (the student's own completions) have no reference answer: their
    positions add to the divergence and nothing to the cross-entropy."""
    hidden, labels, head, teacher_hidden, teacher_head = batch()
    loss_fn = DistillationLoss("forward_kl", kd_ratio=0.3)
    generated = torch.tensor([False, True])
    terms = loss_fn(hidden, labels, head, teacher_hidden, teacher_head, generated=generated)
    every = loss_fn(hidden, labels, head, teacher_hidden, teacher_head)
    first_row = loss_fn(hidden[:1], labels[:1], head, teacher_hidden[:1], teacher_head)
    assert terms.tokens == every.tokens == 8
    assert terms.kd.item() == pytest.approx(every.kd.item(), rel=1e-6)
    assert terms.ce.item() == pytest.approx(first_row.ce.item(), rel=1e-6)
    assert terms.loss.item() == pytest.approx(0.7 * terms.ce.item() + 0.3 * terms.kd.item())
    no_rows = torch.zeros(2, dtype=torch.bool)
    none = loss_fn(hidden, labels, head, teacher_hidden, teacher_head, generated=no_rows)
    assert none.loss.item() == pytest.approx(every.loss.item(), rel=1e-6)


def test_an_offloaded_model_is_on_the_device_only_while_used(monkeypatch):
    """``offload_teacher``'s mechanism (shared with RL's frozen models): to the device for the
    block, back to the CPU after it, also when the block raises; nothing moves without it."""
    from attune.training.frozen import brought_to

    moves = []
    module = torch.nn.Linear(2, 2)
    monkeypatch.setattr(module, "to", lambda device: moves.append(str(device)) or module)
    with brought_to(module, torch.device("cuda")):
        moves.append("used")
    assert moves == ["cuda", "used", "cpu"]
    with pytest.raises(RuntimeError), brought_to(module, torch.device("cuda")):
        raise RuntimeError
    assert moves[-2:] == ["cuda", "cpu"]
    with brought_to(module, torch.device("cuda"), offload=False):
        pass
    assert len(moves) == 5
