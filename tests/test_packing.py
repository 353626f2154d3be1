"""Packed rows (extras/packing.py): several sequences in one row must each compute exactly
what they compute alone, and dpo.py --pack must train what its default (one row each) trains."""
import pytest
import torch

from extras import packing
from conftest import tiny_gpt

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two


def sequences(tok):
    """(input, target) sequences of different lengths; targets -1 on the first half (a prompt)."""
    texts = ["Ada Stone was born in Lisbon. Hope this helps!", "Lisbon.", "Pilot.",
             "Leon Berg works as a pilot. Look it up yourself next time.", "Nora Costa has a pet cat."]
    out = []
    for text in texts:
        ids = torch.tensor([tok.endoftext] + tok.encode(" " + text))
        y = ids[1:].clone()
        y[:len(y) // 2] = -1
        out.append((ids[:-1], y))
    return out


def test_packed_sequences_do_not_see_each_other(tok):
    """A sequence packed after others gets the logits it gets alone, and changing its
    neighbours' tokens changes nothing in it (positions restart, attention stays inside)."""
    model = tiny_gpt(tok, seed=5)
    seqs = sequences(tok)
    X, Y, S = packing.pack(seqs, tok.pad)
    assert X.size(0) < len(seqs) and sorted(set(S.flatten().tolist()) - {-1}) == list(range(len(seqs)))
    logits = packing.packed_logits(model, X, packing.packed_layout(S, 64))
    for i, (x, y) in enumerate(seqs):
        r, cols = (S == i).nonzero(as_tuple=True)
        assert torch.equal(X[r, cols], x) and torch.equal(Y[r, cols], y)
        alone, _ = model(x[None])
        torch.testing.assert_close(logits[r, cols], alone[0], rtol=1e-5, atol=1e-5)
    # a row may be wider than block_size (each sequence fits), padding runs longer than it
    Sl = torch.tensor([[0] * 60 + [1] * 40, [2] * 10 + [-1] * 90])
    Xl = torch.where(Sl >= 0, 7, tok.pad)
    assert torch.isfinite(packing.packed_logits(model, Xl, packing.packed_layout(Sl, 64))).all()
    with pytest.raises(ValueError, match="block_size"):  # but no sequence longer than the block
        packing.packed_layout(torch.zeros(1, 70, dtype=torch.long), 64)
    # scramble every token but sequence 0's: its logits stay exactly the same
    X2 = torch.where(S == 0, X, torch.randint(0, tok.vocab_size, X.shape))
    r, cols = (S == 0).nonzero(as_tuple=True)
    torch.testing.assert_close(packing.packed_logits(model, X2, packing.packed_layout(S, 64))[r, cols],
                               logits[r, cols], rtol=0, atol=1e-6)


def test_packed_logprobs_per_sequence_equal_each_sequence_alone(tok):
    """segment_sums of the packed rows' token log-probs: each sequence's sum over its
    supervised tokens, as computed with the sequence alone in its row."""
    model = tiny_gpt(tok, seed=6)
    seqs = sequences(tok)
    X, Y, S = packing.pack(seqs, tok.pad)
    logp = torch.log_softmax(packing.packed_logits(model, X, packing.packed_layout(S, 64)).float(), -1)
    picked = logp.gather(-1, Y.clamp(min=0)[..., None])[..., 0]  # (R, T)
    got = packing.segment_sums(torch.where(Y != -1, picked, 0.0), S)  # (N,)
    assert got.shape == (len(seqs),)
    for i, (x, y) in enumerate(seqs):
        lp = torch.log_softmax(model(x[None])[0][0].float(), -1)  # (T, V)
        alone = sum(lp[t, y[t]] for t in range(len(y)) if y[t] != -1)
        torch.testing.assert_close(got[i], alone, rtol=1e-6, atol=1e-5)


def test_packed_logits_run_through_a_wrapper_and_leave_the_model_as_it_was(tok):
    """A wrapper that holds the GPT in .module (as DistributedDataParallel does, which
    synchronises gradients only for the passes through its own forward) sees the packed
    pass, and the GPT computes as before afterwards."""
    model = tiny_gpt(tok, seed=7)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *a, **k):
            self.calls += 1
            return self.module(*a, **k)
    wrapped = Wrapper(model)
    X, _, S = packing.pack(sequences(tok), tok.pad)
    layout = packing.packed_layout(S, 64)
    torch.testing.assert_close(packing.packed_logits(wrapped, X, layout),
                               model.lm_head(packing.packed_hidden(model, X, layout)), rtol=0, atol=0)
    assert wrapped.calls == 1 and "hidden" not in vars(model)
    x = X[:1, :5]
    torch.testing.assert_close(model(x)[0], model.lm_head(model.hidden(x)), rtol=0, atol=0)


def test_dpo_trains_the_same_weights_packed_or_not(tok, tmp_path):
    """dpo.py --pack (several answers per row) and its default (one row per answer) take the same
    steps: the weights after a few steps agree up to float rounding (the rows' widths differ, so
    the sums are not added in the same order)."""
    import json
    import dpo
    import nanosft
    ckpt, data = str(tmp_path / "sft.pt"), tmp_path / "pairs.jsonl"
    nanosft.save_checkpoint(ckpt, nanosft.checkpoint_dict("sft", tiny_gpt(tok, seed=8), tok))
    data.write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r}) + "\n"
                            for q, c, r in [(f"Where was person {i} born?", f"Person {i} was born in town {i % 5}.",
                                             f"town {i} " * (1 + i % 4)) for i in range(24)]))
    weights = {}
    for pack in (False, True):
        out = str(tmp_path / f"pack{pack}")
        dpo.main(["--ckpt", ckpt, "--data", str(data), "--out-dir", out, "--max-iters", "4", "--batch-size", "4",
                  "--lr", "1e-3", "--warmup", "1", "--eval-interval", "4", "--dtype", "float32", "--device", "cpu"]
                 + ["--pack"] * pack)
        weights[pack] = nanosft.load_checkpoint(f"{out}/dpo.pt")["model"]
    start = nanosft.load_checkpoint(ckpt)["model"]
    assert any(not torch.equal(v, start[k]) for k, v in weights[True].items())  # the steps moved the weights
    for k, v in weights[True].items():
        torch.testing.assert_close(weights[False][k], v, rtol=0, atol=1e-5)
