"""The training step: token-exact gradient accumulation, packed = unpacked, chunked loss."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from attune.data.collate import IGNORE_INDEX, labels_from_mask, pack_collate, pad_collate
from attune.models import DecoderConfig, TransformerDecoder
from attune.models.chunked_head import frozen_head_weight
from attune.training import ChunkedCrossEntropy, TrainingError, backward_step, check_finite

CONFIG = DecoderConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
CPU = torch.device("cpu")


def examples():
    """Four examples of unequal lengths, each training a different number of tokens."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for length, prompt in ((5, 2), (9, 3), (3, 1), (12, 8)):
        tokens = torch.randint(0, 64, (length,), generator=generator).tolist()
        mask = [i >= prompt for i in range(length)]
        out.append({"tokens": tokens, "labels": labels_from_mask(tokens, mask)})
    return out


def model():
    torch.manual_seed(0)
    return TransformerDecoder(CONFIG)


def updated_weights(micro_batches):
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    result = backward_step(net, micro_batches, ChunkedCrossEntropy(chunk_size=5), CPU)
    optimizer.step()
    return result.loss, torch.cat([p.detach().flatten() for p in net.parameters()])


def test_batch_4_x_1_equals_batch_1_x_4_accumulated():
    data = examples()
    loss_one, weights_one = updated_weights([pad_collate(data, pad_id=0)])
    loss_four, weights_four = updated_weights([pad_collate([e], pad_id=0) for e in data])
    assert abs(loss_one - loss_four) < 1e-6
    assert (weights_one - weights_four).abs().max().item() < 1e-6


def test_packed_and_unpacked_steps_give_the_same_loss_and_update():
    data = examples()
    loss_padded, weights_padded = updated_weights([pad_collate(data, pad_id=0)])
    packed = pack_collate([data[:2], data[2:]], pad_id=0, max_seq_len=16)
    loss_packed, weights_packed = updated_weights([packed])
    assert abs(loss_padded - loss_packed) < 1e-5
    assert (weights_padded - weights_packed).abs().max().item() < 1e-5


def test_chunked_cross_entropy_equals_the_plain_one_in_value_and_gradient():
    batch = pad_collate(examples(), pad_id=0)
    net = model()
    hidden = net(batch["tokens"], padding_mask=batch["padding_mask"], return_hidden=True)
    total, count = ChunkedCrossEntropy(chunk_size=3)(hidden, batch["labels"], net.output)
    total.backward()
    chunked_grad = net.lm_head.weight.grad.clone()
    net.zero_grad()
    logits = net(batch["tokens"], padding_mask=batch["padding_mask"])
    plain = F.cross_entropy(
        logits[:, :-1].reshape(-1, 64), batch["labels"][:, 1:].reshape(-1), reduction="sum"
    )
    plain.backward()
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert abs(total.item() - plain.item()) < 1e-4
    assert (chunked_grad - net.lm_head.weight.grad).abs().max().item() < 1e-5


def test_a_frozen_heads_loss_equals_the_plain_one_in_value_and_gradient():
    """With the head frozen (LoRA's), the loss takes the one-pass path; the trained weights'
    gradients are those of full logits through the plain cross-entropy."""
    batch = pad_collate(examples(), pad_id=0)
    grads = []
    for chunked in (True, False):
        net = model()
        net.lm_head.requires_grad_(False)
        if chunked:
            hidden = net(batch["tokens"], padding_mask=batch["padding_mask"], return_hidden=True)
            total, _ = ChunkedCrossEntropy(chunk_size=3)(hidden, batch["labels"], net.output)
            assert total.grad_fn.name() == "_FrozenHeadCrossEntropyBackward"
        else:
            logits = net(batch["tokens"], padding_mask=batch["padding_mask"])
            total = F.cross_entropy(
                logits[:, :-1].reshape(-1, 64), batch["labels"][:, 1:].reshape(-1), reduction="sum"
            )
        total.backward()
        grads.append((total.item(), [p.grad.clone() for p in net.parameters() if p.requires_grad]))
    assert abs(grads[0][0] - grads[1][0]) < 1e-4
    for chunked_grad, plain_grad in zip(grads[0][1], grads[1][1], strict=True):
        assert (chunked_grad - plain_grad).abs().max().item() < 1e-5


def test_only_a_plain_frozen_head_is_taken_for_the_one_pass_loss():
    model = TransformerDecoder(CONFIG)
    assert frozen_head_weight(model.output) is None  # it trains
    model.lm_head.requires_grad_(False)
    assert frozen_head_weight(model.output) is model.lm_head.weight
    assert frozen_head_weight(model.lm_head) is None  # not the model's output method
    handle = model.lm_head.register_forward_hook(lambda *args: None)
    assert frozen_head_weight(model.output) is None
    handle.remove()
    capped = TransformerDecoder(replace(CONFIG, final_softcap=30.0)).requires_grad_(False)
    assert frozen_head_weight(capped.output) is None


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_checkpoint():
    check_finite(1.5, 3, None)
    with pytest.raises(TrainingError, match=r"loss is nan at step 7.*checkpoints/step_5"):
        check_finite(float("nan"), 7, "out/checkpoints/step_5")
