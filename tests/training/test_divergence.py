"""A diverging run stops at the step that went wrong, before saving bad weights, and names only
a checkpoint whose weights are good."""

import pytest
import torch

from attune.training import TrainingError, check_finite, optimizer_step
from attune.training.divergence import UpdateCheck, stopped


def model_with_gradients(scale=1.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    (model(torch.randn(4, 8)).sum() * scale).backward()
    return model


def diverged(problem, stepped):
    return TrainingError(f"{problem} (stepped={stepped})")


def check():
    return UpdateCheck(diverged)


def test_a_non_finite_gradient_stops_before_the_step():
    model = model_with_gradients(scale=float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(TrainingError, match=r"gradient norm is nan \(stepped=False\)"):
        optimizer_step(model.parameters(), optimizer, None, None, check())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_an_update_that_blows_up_the_weights_stops_after_it():
    # Adam moves every weight by about the learning rate: 1e10 leaves finite weights that
    # give a NaN loss only at the next step
    model = model_with_gradients()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e10)
    with pytest.raises(TrainingError, match=r"multiplied the weights' norm .*stepped=True"):
        optimizer_step(model.parameters(), optimizer, None, 1.0, check())


def test_an_ordinary_step_is_torchs_own_clip_and_step():
    reference, checked = model_with_gradients(), model_with_gradients()
    expected = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5))
    torch.optim.AdamW(reference.parameters(), lr=1e-2).step()
    optimizer = torch.optim.AdamW(checked.parameters(), lr=1e-2)
    assert optimizer_step(checked.parameters(), optimizer, None, 0.5, check()) == expected
    for ours, theirs in zip(checked.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs) and ours.grad is None
    # without clipping no norm is returned (the checks compute one all the same)
    (checked(torch.randn(4, 8)).sum()).backward()
    assert optimizer_step(checked.parameters(), optimizer, None, None, check()) is None


def test_a_nan_loss_names_the_checkpoint_before_the_one_that_produced_it(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (2, 4):
        (checkpoints / f"step_{step}" / "training_state").mkdir(parents=True)
        (checkpoints / f"step_{step}" / "training_state" / "state.pt").write_bytes(b"")
    # step 5's loss came from step_4's weights: step_4 is not good, step_2 is
    with pytest.raises(TrainingError, match=r"step 5; .*last good checkpoint is .*step_2\)"):
        check_finite(float("nan"), 5, str(checkpoints / "step_4"))
    with pytest.raises(TrainingError, match=r"step 6; .*last good checkpoint is .*step_4\)"):
        check_finite(float("inf"), 6, str(checkpoints / "step_4"))
    with pytest.raises(TrainingError, match="no good checkpoint was saved before it"):
        check_finite(float("nan"), 3, str(checkpoints / "step_2"))
    assert "step 7" in str(stopped("the loss is nan", 7, None))
