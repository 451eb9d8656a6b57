"""Packed sequences through `load_model`: each document's logits are the ones it gets alone
(attention within the document, RoPE positions restarting), and bad boundaries are refused."""
from __future__ import annotations

import pytest
import torch

import k2mcore
from harness.hf_models import VARIANTS, hf_config, random_hf_model

LENGTHS = (7, 19, 1, 13, 24)  # a 1-token document too


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("k2")
    random_hf_model(hf_config(**VARIANTS["k2"]), seed=11).save_pretrained(path)
    return k2mcore.load_model(str(path))


def _pack(lengths=LENGTHS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 256, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, *torch.cumsum(torch.tensor(lengths), 0).tolist()])
    return docs, torch.cat(docs)[None], cu


def test_packed_logits_equal_each_document_alone(model):
    docs, ids, cu = _pack()
    out = model(ids, cu_seqlens=cu)
    assert out.dtype == torch.float32 and out.shape == (1, ids.shape[1], 256)
    worst = 0.0
    for doc, a, b in zip(docs, cu[:-1].tolist(), cu[1:].tolist()):
        alone = model(doc[None])[0]
        worst = max(worst, (out[0, a:b] - alone).abs().max().item())
    print(f"packed vs alone: max |logit diff| {worst:.2e}")
    assert worst <= 1e-5
    assert torch.equal(model(ids, cu_seqlens=cu.tolist()), out)  # a list of boundaries too
    # one document covering the batch is the unpacked forward
    single = model(docs[1][None], cu_seqlens=torch.tensor([0, LENGTHS[1]]))
    assert (single - model(docs[1][None])).abs().max() <= 1e-5


def test_rope_positions_restart_at_every_document(model):
    """The queries reaching core attention (RoPE applied) equal each document's alone; with
    positions running on through the pack, the later documents' would not."""
    seen = []
    attn = model.gpt.decoder.layers[0].self_attention.core_attention
    hook = attn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        docs, ids, cu = _pack()
        model(ids, cu_seqlens=cu)
        packed = seen.pop()  # [t, n, d]
        for doc, a, b in zip(docs, cu[:-1].tolist(), cu[1:].tolist()):
            model(doc[None])
            torch.testing.assert_close(packed[a:b], seen.pop()[:, 0], rtol=1e-5, atol=1e-6)
        model(ids)  # unpacked: positions 0..t-1 through all documents
        through = seen.pop()[:, 0]
    finally:
        hook.remove()
    a, b = cu[3].item(), cu[4].item()
    assert (through[a:b] - packed[a:b]).abs().max() > 1e-2


@pytest.mark.parametrize("cu, match", [
    ([1, 64], r"cu_seqlens: \[1, 64\] does not cover the batch's 64 tokens"),
    ([0, 10, 63], r"does not cover the batch's 64 tokens \(start at 0, end at 64\)"),
    ([0, 30, 20, 64], r"not increasing at entry 2 \(30 -> 20\)"),
    ([0, 10, 10, 64], r"not increasing at entry 2 \(10 -> 10\)"),
    ([[0, 64]], "expected a 1-D tensor"),
])
def test_boundaries_that_do_not_cover_the_batch_are_refused(model, cu, match):
    _, ids, _ = _pack()
    with pytest.raises(ValueError, match=match) as err:
        model(ids, cu_seqlens=torch.tensor(cu))
    assert "\n" not in str(err.value)


def test_a_packed_batch_is_one_row(model):
    _, ids, cu = _pack()
    with pytest.raises(ValueError, match=r"input_ids: a packed batch is \[1, total\]"):
        model(ids.reshape(2, -1), cu_seqlens=cu)
