"""Packed rows: each document gets the logits it would get alone."""

import torch

from attune import models
from attune.models.masks import positions_from_document_ids
from tests.models.hf_reference import make_checkpoint


def test_two_documents_in_one_row_match_running_each_alone(tmp_path):
    make_checkpoint(
        "qwen2_sliding_layers", tmp_path
    )  # sliding layers too: windows stay per document
    model = models.from_pretrained(tmp_path).eval()
    generator = torch.Generator().manual_seed(3)
    first = torch.randint(0, 96, (1, 7), generator=generator)
    second = torch.randint(0, 96, (1, 5), generator=generator)
    packed = torch.cat([first, second], dim=1)
    document_ids = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        together = model(packed, document_ids=document_ids)
        alone = torch.cat([model(first), model(second)], dim=1)
    assert (together - alone).abs().max().item() < 1e-5


def test_positions_restart_at_each_document():
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert positions_from_document_ids(document_ids).tolist() == [
        [0, 1, 2, 0, 1, 0],
        [0, 1, 2, 3, 4, 5],
    ]


def test_per_document_attention_equals_the_block_causal_mask():
    from attune.models.masks import DocumentSpans, attention_mask

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, seq, dim = 2, 4, 2, 12, 8
    q = torch.randn(batch, heads, seq, dim, generator=generator, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, dim, generator=generator, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, dim, generator=generator, requires_grad=True)
    # three documents, one, and a padding "document" at the end of the first row
    document_ids = torch.tensor([[0] * 5 + [1] * 3 + [2] * 4, [0] * 12])
    spans = DocumentSpans.from_document_ids(document_ids)
    assert spans.spans == ((0, 0, 5), (0, 5, 8), (0, 8, 12), (1, 0, 12))
    per_document = spans.attend(q, k, v, scale=dim**-0.5)
    mask = attention_mask(seq, document_ids=document_ids)
    masked = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=dim**-0.5, enable_gqa=True
    )
    assert (per_document - masked).abs().max().item() < 1e-6
    grads = torch.autograd.grad(per_document.square().sum(), (q, k, v))
    reference = torch.autograd.grad(masked.square().sum(), (q, k, v))
    for grad, expected in zip(grads, reference, strict=True):
        assert (grad - expected).abs().max().item() < 1e-5


def test_padding_documents_give_zeros_and_mixed_padding_falls_back_to_the_mask():
    from attune.models.masks import DocumentSpans

    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 6, 4, generator=generator, requires_grad=True)
    k = torch.randn(1, 2, 6, 4, generator=generator, requires_grad=True)
    v = torch.randn(1, 2, 6, 4, generator=generator, requires_grad=True)
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    padding_mask = torch.tensor([[True, True, True, True, True, False]])
    spans = DocumentSpans.from_document_ids(document_ids, padding_mask)
    assert spans.spans == ((0, 0, 3), (0, 3, 5)) and spans.padding == ((0, 5, 6),)
    out = spans.attend(q, k, v, scale=0.5)
    assert out.shape == q.shape and out[0, :, 5].abs().sum() == 0
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, 3:5], k[:, :, 3:5], v[:, :, 3:5], is_causal=True, scale=0.5
    )
    assert (out[:, :, 3:5] - expected).abs().max().item() < 1e-6
    # the padding document's inputs get zero gradients, the others their documents' own
    for grad in torch.autograd.grad(out.square().sum(), (q, k, v)):
        assert grad[0, :, 5].abs().sum() == 0 and grad[0, :, :5].abs().sum() > 0
    # padding inside a document: only the mask says what that means
    mixed = torch.tensor([[True, True, False, True, True, True]])
    assert DocumentSpans.from_document_ids(document_ids, mixed) is None


def _tiny_model_and_packed_batch():
    from attune.data.collate import pack_collate
    from attune.demo.tiny import HF_CONFIG
    from attune.models import from_hf_config

    torch.manual_seed(0)
    model = from_hf_config({**HF_CONFIG, "num_hidden_layers": 2}).eval()
    examples = [
        {"tokens": list(range(5, 5 + n)), "labels": [-100, *range(6, 5 + n)]} for n in (7, 4, 9, 3)
    ]
    batch = pack_collate([examples[:2], examples[2:]], pad_id=0, max_seq_len=16)
    inputs = {"document_ids": batch["document_ids"], "padding_mask": batch["padding_mask"]}
    return model, batch, inputs


def test_a_packed_batch_gives_the_same_logits_through_spans_as_through_the_mask(monkeypatch):
    from attune.models.masks import DocumentSpans

    model, batch, inputs = _tiny_model_and_packed_batch()
    assert DocumentSpans.from_document_ids(**inputs) is not None  # the first pass takes spans
    with torch.no_grad():
        per_document = model(batch["tokens"], **inputs)
        monkeypatch.setattr(model, "_attends_per_document", lambda *args: False)
        masked = model(batch["tokens"], **inputs)
    real = batch["padding_mask"]
    assert (per_document[real] - masked[real]).abs().max().item() < 1e-5


def test_the_flex_block_mask_gives_the_masks_attention():
    """The GPU path's block mask (run here through eager flex attention, forward only: the CPU
    has no flex backward) attends as :func:`attention_mask` says, padding and windows too."""
    from attune.models.masks import DocumentBlockMask, attention_mask

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, seq, dim = 2, 4, 2, 20, 8
    q = torch.randn(batch, heads, seq, dim, generator=generator)
    k = torch.randn(batch, kv_heads, seq, dim, generator=generator)
    v = torch.randn(batch, kv_heads, seq, dim, generator=generator)
    document_ids = torch.tensor([[0] * 9 + [1] * 7 + [2] * 4, [0] * 14 + [1] * 6])
    padding = torch.ones(batch, seq, dtype=torch.bool)
    padding[0, 16:] = padding[1, 14:] = False
    for padding_mask in (None, padding):
        for window in (None, 4):
            options = {"padding_mask": padding_mask, "sliding_window": window}
            mask = attention_mask(seq, document_ids=document_ids, **options)
            want = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True
            )
            with torch.no_grad():
                got = DocumentBlockMask.build(document_ids, **options).attend(q, k, v, 0.3)
            assert (got - want).abs().max().item() < 1e-5, options


def test_a_packed_batch_gives_the_same_logits_through_flex_attention(monkeypatch):
    model, batch, inputs = _tiny_model_and_packed_batch()
    calls = []
    real_build = models.masks.DocumentBlockMask.build
    monkeypatch.setattr(
        models.masks.DocumentBlockMask,
        "build",
        lambda *args: calls.append(1) or real_build(*args),
    )
    with torch.no_grad():
        monkeypatch.setattr(model, "_attends_per_document", lambda *args: False)
        masked = model(batch["tokens"], **inputs)
        monkeypatch.setattr(model, "_attends_by_blocks", lambda *args: True)
        blocks = model(batch["tokens"], **inputs)
    assert calls  # the second pass took the block mask
    assert (blocks - masked).abs().max().item() < 1e-5


def test_compiled_layers_do_not_recompile_for_each_packing(monkeypatch):
    """The spans differ from batch to batch; traced, each batch would be a new graph (measured:
    a recompilation per step up to dynamo's limit)."""
    import torch._dynamo

    from attune.data.collate import pack_collate

    model, _, _ = _tiny_model_and_packed_batch()
    for layer in model.layers:
        layer.compile(backend="eager")  # dynamo's guards alone decide recompilation
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for lengths in ((7, 4, 5), (3, 3, 10), (16,)):
        examples = [
            {"tokens": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in lengths
        ]
        batch = pack_collate([examples], pad_id=0, max_seq_len=16)
        with torch.no_grad():
            model(
                batch["tokens"],
                document_ids=batch["document_ids"],
                padding_mask=batch["padding_mask"],
            )
