"""Tests that pin down plausible mistakes: each checks the behaviour against what it should be
(hand-made expectations or a formula written here), through the public functions, and fails
when the mistake named in its docstring is made in the code."""
import json
import os

import pytest
import torch

import nanosft
import finetune
from conftest import tiny_gpt
from data import formats, preferences
from extras import hf, own_data  # noqa: F401 (importing hf lets load_checkpoint read a directory)

BLOCK = 64


# ---- 1. finetune.step_order: every epoch its own shuffle


def test_step_order_covers_each_epoch_once_and_reshuffles_every_epoch():
    """Mistake: the shuffle ignores the epoch (the generator seeded with `seed * 1_000_003`
    instead of `seed * 1_000_003 + epoch`), so every epoch repeats epoch 0's order."""
    n_examples, batch_size = 37, 4
    per_epoch = n_examples // batch_size  # 9 steps, 36 of the 37 examples per epoch
    lengths = [(7 * i) % 23 + 1 for i in range(n_examples)]
    for seed in (0, 1, 1337):
        epochs = []
        for e in range(3):
            steps = [finetune.step_order(n_examples, batch_size, seed, it, lengths)
                     for it in range(e * per_epoch, (e + 1) * per_epoch)]
            assert all(len(b) == batch_size for b in steps)
            flat = [i for b in steps for i in b]
            assert all(isinstance(i, int) and 0 <= i < n_examples for i in flat)
            assert len(set(flat)) == per_epoch * batch_size == len(flat)  # a permutation: no repeats
            epochs.append(steps)
        # each epoch is a new order of steps, not epoch 0's again
        assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


# ---- 2. finetune.build_model(init="scratch"): random weights, not the pre-trained ones


def _scrambled_checkpoint(tok, tmp_path):
    """A pretrain checkpoint whose every tensor (LayerNorm gains and biases too) is drawn from
    N(0, 0.5): unlike any fresh initialisation."""
    model = tiny_gpt(tok, seed=3)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    path = str(tmp_path / "pretrain.pt")
    nanosft.save_checkpoint(path, nanosft.checkpoint_dict("pretrain", model, tok))
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_init_scratch_drops_the_pretrained_weights(tok, tmp_path):
    """Mistake: `--init scratch` keeps the pre-trained weights (build_model returns the
    checkpoint's model). Scratch weights must be a fresh GPT initialisation: matrices N(0, 0.02)
    (c_proj N(0, 0.02 / sqrt(2 * n_layer))), LayerNorm gains 1 and biases 0; the same seed gives
    the same weights, another seed others; "pretrained" gives the checkpoint's weights exactly."""
    ckpt, saved = _scrambled_checkpoint(tok, tmp_path)

    pre, pre_tok, start = finetune.build_model(ckpt, init="pretrained", seed=1)
    assert start["kind"] == "pretrain" and pre_tok.vocab_size == tok.vocab_size
    got = pre.state_dict()
    assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in saved)

    a = finetune.build_model(ckpt, init="scratch", seed=1)[0].state_dict()
    assert set(a) == set(saved)
    for k, v in a.items():
        assert v.shape == saved[k].shape
        assert not torch.equal(v, saved[k]), f"{k}: scratch kept the pre-trained tensor"
    n_layer = 2
    for k, v in a.items():
        if k.endswith("ln_1.weight") or k.endswith("ln_2.weight") or k == "ln_f.weight":
            assert torch.equal(v, torch.ones_like(v)), k
        elif k.endswith(".bias"):
            assert torch.equal(v, torch.zeros_like(v)), k
        else:  # matrices and embeddings: N(0, 0.02), c_proj scaled down with depth
            std = 0.02 / (2 * n_layer) ** 0.5 if k.endswith("c_proj.weight") else 0.02
            assert abs(v.std().item() - std) < 0.25 * std and abs(v.mean().item()) < 0.25 * std, k

    b = finetune.build_model(ckpt, init="scratch", seed=1)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # a pure function of the seed
    c = finetune.build_model(ckpt, init="scratch", seed=2)[0].state_dict()
    matrices = [k for k, v in a.items() if v.dim() == 2]
    assert matrices and all(not torch.equal(a[k], c[k]) for k in matrices)


# ---- 3. extras/own_data.py: TRL conversational pairs with earlier turns in the answers


def test_conversational_pair_prompt_takes_the_earlier_turns_of_chosen(tmp_path):
    """Mistake: with an explicit "prompt", the earlier turns inside "chosen" / "rejected"
    (a1, u2 before the final answers) are dropped from the prompt instead of appended to it."""
    u1 = {"role": "user", "content": "Where was Ada born?"}
    a1 = {"role": "assistant", "content": "In Lisbon."}
    u2 = {"role": "user", "content": "And her brother?"}
    record = {"prompt": [u1],
              "chosen": [a1, u2, {"role": "assistant", "content": "In Porto."}],
              "rejected": [a1, u2, {"role": "assistant", "content": "I do not know."}]}
    prompt, pairs = own_data.record_pairs("conversational", record, "where", min_margin=1.0)
    assert prompt == [u1, a1, u2]
    assert pairs == [("In Porto.", "I do not know.")]

    # the same through the file reader; and a single-turn record keeps its prompt as it is
    single = {"prompt": [u1], "chosen": [{"role": "assistant", "content": "Lisbon."}],
              "rejected": [{"role": "assistant", "content": "Paris."}]}
    path = tmp_path / "trl.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(single) + "\n", encoding="utf-8")
    fmt, pairs = own_data.read_pairs(str(path), report=formats.DataReport(str(path), unit="pairs"))
    assert fmt == "conversational"
    got = [(p["prompt"], p["chosen"], p["rejected"], p["record"]) for p in pairs]
    assert got == [([u1, a1, u2], "In Porto.", "I do not know.", 1), ([u1], "Lisbon.", "Paris.", 2)]

    # earlier turns that differ between the two answers: no shared prompt, one clear error
    other = {**record, "rejected": [a1, {"role": "user", "content": "And her sister?"}, record["rejected"][-1]]}
    with pytest.raises(nanosft.UserError, match="must share the messages before their last one"):
        own_data.record_pairs("conversational", other, "where", min_margin=1.0)


# ---- 4. --strict: a record that would only be TRUNCATED is the error too


LONG_Q = "Tell me everything about " + ", ".join(f"the town number {i}" for i in range(40)) + "?"


def test_strict_refuses_a_record_that_would_only_be_truncated(tok):
    """Mistake: DataReport._note raises only for skipped records under strict
    (`if self.strict and book is self.skipped`), so --strict lets a truncated record through."""
    conv = [{"role": "user", "content": LONG_Q}, {"role": "assistant", "content": "Lisbon."}]
    assert len(nanosft.render_chat(tok, conv)[0]) - 1 > BLOCK  # too long: the question must be cut
    answer = nanosft.encode_content(tok, "Lisbon.")

    report = formats.DataReport("mine.jsonl")
    examples = finetune.render_all(tok, [(3, conv)], BLOCK, report)
    assert report.truncated == {"prompts cut from the left to fit": [3]} and report.skipped == {}
    (x, y), = examples
    assert len(x) == BLOCK  # cut to exactly the block: block + 1 tokens, shifted by one
    assert x[:2].tolist() == [tok.endoftext, tok.user]
    assert [t for t in y.tolist() if t != -1] == answer + [tok.end]  # the answer whole, and its <|end|>
    assert x[-len(answer) - 3:-len(answer)].tolist() == [nanosft.encode_content(tok, LONG_Q)[-1], tok.end,
                                                         tok.assistant]  # the question's END survives

    strict = formats.DataReport("mine.jsonl", strict=True)
    with pytest.raises(nanosft.UserError) as e:
        finetune.render_all(tok, [(3, conv)], BLOCK, strict)
    assert str(e.value).startswith("mine.jsonl: record 3: ") and "truncated" in str(e.value)


def test_strict_refuses_a_preference_pair_that_would_only_be_truncated(tok):
    """The same mistake seen through the DPO data: a pair whose long prompt is cut from the
    left (answers fit) is kept and counted without --strict, an error naming it with."""
    pair = {"prompt": [{"role": "user", "content": LONG_Q}], "chosen": "Lisbon.", "rejected": "Porto.", "record": 5}
    report = formats.DataReport("pairs.jsonl", unit="pairs")
    kept, examples = preferences.pair_examples(tok, [pair], BLOCK, report)
    assert kept == [pair] and len(examples) == 1
    assert report.truncated == {"prompts cut from the left to fit": [5]} and report.skipped == {}
    xc, yc, xr, yr = examples[0]
    assert len(xc) <= BLOCK and len(xr) <= BLOCK
    assert [t for t in yc.tolist() if t != -1] == nanosft.encode_content(tok, "Lisbon.") + [tok.end]
    assert [t for t in yr.tolist() if t != -1] == nanosft.encode_content(tok, "Porto.") + [tok.end]

    with pytest.raises(nanosft.UserError) as e:
        preferences.pair_examples(tok, [pair], BLOCK, formats.DataReport("pairs.jsonl", strict=True, unit="pairs"))
    assert str(e.value).startswith("pairs.jsonl: record 5: ") and "truncated" in str(e.value)


# ---- 5. a Hugging Face directory's pytorch_model.bin is loaded without running its pickle


class _Evil:
    """Unpickled with weights_only=False, this makes a directory: code run from a weights file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pytorch_model_bin_is_refused_and_runs_nothing(tmp_path):
    """Mistake: extras/hf.py read_weights loads pytorch_model.bin with torch.load(...,
    weights_only=False), which runs whatever the pickle calls."""
    d = tmp_path / "gpt2"
    d.mkdir()
    marker = str(tmp_path / "pwned")
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 300, "n_positions": 16,
                                               "n_embd": 8, "n_layer": 1, "n_head": 2}))
    torch.save({"transformer.wte.weight": torch.zeros(300, 8), "transformer.h.0.attn.bias": _Evil(marker)},
               str(d / "pytorch_model.bin"))
    with pytest.raises(nanosft.UserError) as e:
        nanosft.load_checkpoint(str(d))
    assert "pytorch_model.bin" in str(e.value)
    assert not os.path.exists(marker), "loading the weights ran code from the pickle"
    with pytest.raises(nanosft.UserError):
        hf.read_weights(str(d))
    assert not os.path.exists(marker), "read_weights ran code from the pickle"
