"""DPO: the loss math, the concatenated forward, the frozen reference, the data formats, and
dpo.py end to end (including an exact --resume)."""
import copy
import json
import math
import os

import pytest
import torch

import nanosft
from data import formats, world_qa, preferences
from extras import own_data
from conftest import tiny_gpt, run_script

import dpo
from extras import dpo_eval


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two


PAIRS = [  # (question, chosen, rejected): responses of different lengths
    ("Where was Ada Stone born?", "Ada Stone was born in Lisbon. Hope this helps!", "Lisbon."),
    ("What is Leon Berg's job?", "Pilot.", "Leon Berg works as a pilot. Look it up yourself next time."),
    ("What pet does Nora Costa have?", "Nora Costa has a pet cat.", "Nora Costa has a pet dog."),
]


def pair_dict(q, c, r):
    return {"prompt": [{"role": "user", "content": q}], "chosen": c, "rejected": r}


def examples(tok, block_size=64):
    return [preferences.pair_example(tok, pair_dict(*p), block_size) for p in PAIRS]


def answer_logprob(model, tok, question, answer):
    """log pi(answer | question), computed from the text alone (no pair code)."""
    prompt = nanosft.chat_prompt(tok, [{"role": "user", "content": question}])
    ids = prompt + nanosft.encode_content(tok, answer) + [tok.end]
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].float(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))


def loss_kw(**kw):
    """pair_loss's loss settings: the DPO paper's sigmoid loss, beta 0.1, unless changed."""
    return dict(dict(beta=0.1, loss="sigmoid", label_smoothing=0.0, rpo_alpha=0.0), **kw)


# ---- the loss as pure functions


def test_sequence_logprobs_is_the_sum_of_picked_log_softmax():
    torch.manual_seed(0)
    V = 11
    logits = torch.randn(2, 6, V)
    # -1: prompt positions at the front, padding at the back
    labels = torch.tensor([[-1, -1, 3, 5, 2, -1], [-1, 7, 1, -1, -1, -1]])
    mask = labels != -1
    got = dpo.sequence_logprobs(logits, labels, mask)
    for b in range(2):
        want = 0.0
        for t in range(6):
            if labels[b, t] != -1:
                row = logits[b, t].tolist()
                want += row[labels[b, t]] - math.log(sum(math.exp(v) for v in row))
        assert abs(got[b].item() - want) < 1e-5
    # prompt and padding positions never enter: scramble their logits and labels
    logits2 = logits.clone()
    logits2[~mask] = torch.randn(int((~mask).sum()), V) * 100
    labels2 = torch.where(mask, labels, torch.randint(0, V, labels.shape))
    assert torch.equal(dpo.sequence_logprobs(logits2, labels2, mask), got)
    # more padding changes nothing (a mean over the padded length would)
    padded = dpo.sequence_logprobs(torch.cat([logits, torch.randn(2, 5, V)], 1),
                                   torch.cat([labels, torch.full((2, 5), -1)], 1),
                                   torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], 1))
    torch.testing.assert_close(padded, got, rtol=0, atol=1e-6)


def test_pair_example_masks_exactly_the_response(tok):
    (xc, yc, xr, yr), = [preferences.pair_example(tok, pair_dict(*PAIRS[0]), 64)]
    prompt = nanosft.chat_prompt(tok, [{"role": "user", "content": PAIRS[0][0]}])
    for x, y, text in ((xc, yc, PAIRS[0][1]), (xr, yr, PAIRS[0][2])):
        resp = nanosft.encode_content(tok, text) + [tok.end]
        assert x.tolist() == (prompt + resp)[:-1]
        assert y.tolist() == [-1] * (len(prompt) - 1) + resp  # first answer token kept, <|end|> trained


def test_loss_is_ln2_and_gradients_cancel_when_policy_is_reference():
    pi_c = torch.tensor([-3.0, -10.0, -0.5], requires_grad=True)
    pi_r = torch.tensor([-7.0, -1.0, -2.5], requires_grad=True)
    for eps in (0.0, 0.3):
        pi_c.grad = pi_r.grad = None
        losses, r_c, r_r = dpo.dpo_loss(pi_c, pi_r, pi_c.detach(), pi_r.detach(), 0.1,
                                        label_smoothing=eps)
        assert torch.allclose(losses, torch.full((3,), math.log(2)), rtol=0, atol=1e-7)
        assert torch.equal(r_c, torch.zeros(3)) and torch.equal(r_r, torch.zeros(3))
        losses.sum().backward()
        # d/dh at h = 0 is -beta/2 (1 - 2 eps): chosen pushed up exactly as rejected is pushed down
        assert torch.equal(pi_c.grad, -pi_r.grad)
        assert torch.allclose(pi_c.grad, torch.full((3,), -0.05 * (1 - 2 * eps)))


def test_loss_is_ln2_on_a_model_and_identical_pairs_give_zero_gradient(tok):
    model = tiny_gpt(tok, seed=1)
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    ex = examples(tok)
    X, Y, S = dpo.collate_pairs(ex, tok.pad)
    ref_c, ref_r = dpo.concatenated_logprobs(ref, X, Y, S)
    loss, _, _ = dpo.pair_loss(model, X, Y, ref_c, ref_r, **loss_kw(), segments=S)
    assert abs(loss.item() / len(ex) - math.log(2)) < 1e-6
    # the same response as chosen and rejected: the two halves' gradients cancel exactly
    same = [(xc, yc, xc, yc) for xc, yc, _, _ in ex]
    X, Y, S = dpo.collate_pairs(same, tok.pad, packed=False)  # same rows, same float rounding
    ref_c, ref_r = dpo.concatenated_logprobs(ref, X, Y, S)
    dpo.pair_loss(model, X, Y, ref_c, ref_r, **loss_kw(), segments=S)[0].backward()
    grads = [p.grad.abs().max().item() for p in model.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-7
    model.zero_grad()
    dpo.pair_loss(model, X, Y, ref_c, ref_r, **loss_kw(rpo_alpha=1.0), segments=S)[0].backward()  # not vacuous
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) > 1e-4


def test_ipo_and_label_smoothing_match_their_formulas():
    pi_c, pi_r = torch.tensor([-4.0]), torch.tensor([-6.0])
    ref_c, ref_r = torch.tensor([-5.0]), torch.tensor([-5.5])
    beta = 0.5
    h = (-4.0 + 5.0) - (-6.0 + 5.5)  # 1.5
    ipo, r_c, r_r = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "ipo")
    assert abs(ipo.item() - (h - 1 / (2 * beta)) ** 2) < 1e-6 and abs(ipo.item() - 0.25) < 1e-6
    assert abs(r_c.item() - 0.5) < 1e-7 and abs(r_r.item() + 0.25) < 1e-7
    logsig = lambda z: -math.log1p(math.exp(-z))
    eps = 0.2
    cdpo, _, _ = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "sigmoid", eps)
    assert abs(cdpo.item() - (-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h))) < 1e-6
    plain, _, _ = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    assert abs(plain.item() + logsig(beta * h)) < 1e-6
    # hinge (SLiC): max(0, 1 - beta h); zero, with zero gradient, once the gap passes 1 / beta
    hinge, _, _ = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "hinge")
    assert abs(hinge.item() - 0.25) < 1e-6  # 1 - 0.5 * 1.5
    far = torch.tensor([-1.0], requires_grad=True)  # h = 4 + 0.5 > 1 / beta
    done, _, _ = dpo.dpo_loss(far, pi_r, ref_c, ref_r, beta, "hinge")
    done.sum().backward()
    assert done.item() == 0.0 and far.grad.item() == 0.0


def test_rpo_adds_alpha_times_chosen_per_token_nll(tok):
    model = tiny_gpt(tok, seed=2)
    ex = examples(tok)
    X, Y, S = dpo.collate_pairs(ex, tok.pad)
    with torch.no_grad():
        ref_c, ref_r = dpo.concatenated_logprobs(model, X, Y, S)
        base = dpo.pair_loss(model, X, Y, ref_c, ref_r, **loss_kw(), segments=S)[0]
        rpo = dpo.pair_loss(model, X, Y, ref_c, ref_r, **loss_kw(rpo_alpha=2.0), segments=S)[0]
        nll = sum(model(xc[None], yc[None])[1].item() for xc, yc, _, _ in ex)  # per-token means
    assert abs((rpo - base).item() - 2.0 * nll) < 1e-4


# ---- the concatenated forward and the frozen reference


def test_concatenated_forward_equals_separate_forwards(tok):
    model = tiny_gpt(tok, seed=3)
    ex = examples(tok)
    assert len({len(e[0]) for e in ex} | {len(e[2]) for e in ex}) > 2  # padding really differs
    X, Y, S = dpo.collate_pairs(ex, tok.pad)
    assert X.size(0) < 2 * len(ex)  # packed: fewer rows than sequences
    pi_c, pi_r = dpo.concatenated_logprobs(model, X, Y, S)
    unpacked = dpo.concatenated_logprobs(model, *dpo.collate_pairs(ex, tok.pad, packed=False))
    for k, got, pad in ((0, pi_c, unpacked[0]), (2, pi_r, unpacked[1])):
        torch.testing.assert_close(got, pad, rtol=1e-6, atol=1e-5)
        X, Y = nanosft.collate([e[k:k + 2] for e in ex], tok.pad)  # padded to this half's longest
        sep = dpo.sequence_logprobs(model(X)[0], Y, Y != -1)
        one = torch.stack([dpo.sequence_logprobs(model(e[k][None])[0], e[k + 1][None], e[k + 1][None] != -1)[0]
                           for e in ex])  # no padding at all
        torch.testing.assert_close(got, sep, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(got, one, rtol=1e-6, atol=1e-5)


def test_reference_stays_frozen_and_cached_logprobs_match(tok):
    model = tiny_gpt(tok, seed=4)
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    ex = examples(tok) * 2
    process = nanosft.Process(torch.device("cpu"), "float32")
    cache_c, cache_r = dpo.pair_logprobs(ref, ex, list(range(len(ex))), tok.pad, process, packed=False)
    opt = nanosft.configure_optimizer(model, 1e-2)
    for it in range(4):  # dpo.py's step, two pairs at a time
        for group in opt.param_groups:
            group["lr"] = nanosft.lr_at(it, 1e-2, 1, 4)
        ids = torch.tensor([(2 * it) % len(ex), (2 * it + 1) % len(ex)])
        X, Y, segments = dpo.collate_pairs([ex[i] for i in ids.tolist()], tok.pad)
        loss_sum = dpo.pair_loss(model, X, Y, cache_c[ids], cache_r[ids], **loss_kw(rpo_alpha=1.0),
                                 segments=segments)[0]
        (loss_sum / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())  # bit-identical
    assert all(not p.requires_grad and p.grad is None for p in ref.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # policy moved
    for i, e in enumerate(ex):  # recomputed one pair at a time, packed == the cache (one row per sequence)
        c, r = dpo.concatenated_logprobs(ref, *dpo.collate_pairs([e], tok.pad))
        # sums of ~20 log-probs of ~-6 each: float32 rounding is relative, so is the tolerance
        torch.testing.assert_close(torch.cat([c, r]), torch.stack([cache_c[i], cache_r[i]]), rtol=1e-6, atol=1e-5)


def test_batches_are_a_pure_function_of_seed_and_step():
    a = [dpo.step_pair_ids(7, it, 4, 10) for it in range(6)]
    assert a == [dpo.step_pair_ids(7, it, 4, 10) for it in range(6)]
    flat = sum(a, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs
    assert a != [dpo.step_pair_ids(8, it, 4, 10) for it in range(6)]


# ---- data formats


def write(tmp_path, name, rows, array=False):
    p = tmp_path / name
    p.write_text(json.dumps(rows) if array else "".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


HH_CHOSEN = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
             "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.")
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?\n\nAssistant: 5, obviously."


def test_each_format_parses(tmp_path):
    votes = [{"prompt": f"Q{i}", "split": "heldout" if i == 0 else "train",
              "answers": [{"text": "a", "up": 10, "down": 0}, {"text": "b", "up": 5, "down": 5},
                          {"text": "c", "up": 5, "down": 4}]} for i in range(3)]
    fmt, train, held = own_data.load_preferences(write(tmp_path, "v.jsonl", votes), min_margin=1, top_only=False)
    assert fmt == "votes" and len(train) == 6 and len(held) == 3
    assert {(p["chosen"], p["rejected"]) for p in held} == {("a", "b"), ("a", "c"), ("c", "b")}
    _, train, held = own_data.load_preferences(write(tmp_path, "v.jsonl", votes), min_margin=2, top_only=False)
    assert {(p["chosen"], p["rejected"]) for p in held} == {("a", "b"), ("a", "c")}
    _, train, held = own_data.load_preferences(write(tmp_path, "v.jsonl", votes), min_margin=1)  # top vs the rest
    assert len(train) == 4 and {(p["chosen"], p["rejected"]) for p in held} == {("a", "b"), ("a", "c")}
    # a tie at the top: no single best answer, so the thread gives no pairs (the others still do)
    tied = votes + [{"prompt": "T", "answers": [{"text": "p", "up": 3, "down": 0}, {"text": "q", "up": 4, "down": 1},
                                                {"text": "r", "up": 0, "down": 3}]}]
    _, train, held = own_data.load_preferences(write(tmp_path, "v.jsonl", tied), min_margin=1)
    assert len(train) + len(held) == 6 and all(p["chosen"] == "a" for p in train + held)

    pairs = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
    fmt, train, held = own_data.load_preferences(write(tmp_path, "p.jsonl", pairs))
    # about 10% held out, by a hash of the prompt (here 3 of 20: Q6, Q10, Q19)
    assert fmt == "pairs" and len(train) == 17 and {p["chosen"] for p in held} == {"good 6", "good 10", "good 19"}
    assert train[0]["prompt"] == [{"role": "user", "content": train[0]["prompt"][0]["content"]}]
    assert {p["chosen"] for p in train + held} == {f"good {i}" for i in range(20)}

    alpaca = [{"instruction": "Name a colour.", "input": "Not red.", "output": "Blue.",
               "chosen": "Blue.", "rejected": "Red."}, {"instruction": "Say hi.", "chosen": "Hi!", "rejected": "No."}]
    fmt, train, held = own_data.load_preferences(write(tmp_path, "a.json", alpaca, array=True))
    assert fmt == "alpaca" and len(train) + len(held) == 2
    p = next(p for p in train + held if p["chosen"] == "Blue.")
    assert p["prompt"] == [{"role": "user", "content": "Name a colour.\n\nNot red."}] and p["rejected"] == "Red."

    scores = [{"prompt": "Q", "responses": [{"text": "x", "score": 0.5}, {"text": "y", "score": 2.5},
                                            {"text": "z", "score": 2.0}]}]
    fmt, train, _ = own_data.load_preferences(write(tmp_path, "s.jsonl", scores), min_margin=1, top_only=False)
    assert fmt == "scores" and {(p["chosen"], p["rejected"]) for p in train} == {("y", "x"), ("z", "x")}
    fmt, train, _ = own_data.load_preferences(write(tmp_path, "s.jsonl", scores), min_margin=1)
    assert {(p["chosen"], p["rejected"]) for p in train} == {("y", "x")}

    fmt, train, _ = own_data.load_preferences(write(tmp_path, "h.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]))
    assert fmt == "hh" and train[0]["chosen"] == "It is 4."


def test_hh_split_on_a_multi_turn_dialogue(tok):
    msgs, chosen = own_data.split_hh(HH_CHOSEN, "x")
    msgs_r, rejected = own_data.split_hh(HH_REJECTED, "x")
    assert msgs == msgs_r == [{"role": "user", "content": "Hi there"},
                              {"role": "assistant", "content": "Hello! How can I help?"},
                              {"role": "user", "content": "What is 2+2?"}]
    assert (chosen, rejected) == ("It is 4.", "5, obviously.")
    # the earlier assistant turn is context: only the last reply is scored
    _, yc, _, _ = preferences.pair_example(tok, {"prompt": msgs, "chosen": chosen, "rejected": rejected}, 64)
    assert [t for t in yc.tolist() if t != -1] == nanosft.encode_content(tok, "It is 4.") + [tok.end]


@pytest.mark.parametrize("rows, match", [
    ([{"prompt": "Q", "chosen": "same", "rejected": "same"}], r"p\.jsonl: record 1: chosen and rejected .* same"),
    ([{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"question": "Q"}], r"p\.jsonl:2: unknown preference record"),
    ([{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"chosen": "\n\nHuman: a\n\nAssistant: b",
                                                        "rejected": "\n\nHuman: a\n\nAssistant: c"}],
     r"p\.jsonl:2: a 'hh' record, but"),
    ([{"chosen": HH_CHOSEN, "rejected": "\n\nHuman: other\n\nAssistant: 5"}], r"p\.jsonl:1: .*share the dialogue"),
    ([{"chosen": "no turns at all", "rejected": "x"}], r"p\.jsonl:1 \(chosen\): expected a dialogue"),
    ([{"prompt": "Q", "answers": [{"text": "a", "up": 1, "down": 1}, {"text": "b", "up": "many", "down": 0}]}],
     r"p\.jsonl:1: answers\[1\]: field 'up'"),
    ([{"prompt": "Q", "answers": [{"text": "a", "up": 3, "down": 0}, {"text": "a", "up": 0, "down": 3}]}],
     r"p\.jsonl: record 1: chosen and rejected"),
])
def test_bad_preference_data_is_one_clear_error(tmp_path, rows, match):
    """Malformed records are errors always; a tie is one under --strict (see test_data.py)."""
    path = write(tmp_path, "p.jsonl", rows)
    with pytest.raises(nanosft.UserError, match=match):
        own_data.load_preferences(path, report=formats.DataReport(path, strict=True, unit="pairs"))


# ---- dpo.py end to end


@pytest.fixture(scope="module")
def sft_ckpt(tok, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dpo") / "sft.pt")
    nanosft.save_checkpoint(path, nanosft.checkpoint_dict("sft", tiny_gpt(tok, seed=5), tok))
    return path


def summed_answer_logprobs(model, seqs, pad, rows=256):
    """log pi(answer | prompt) of (inputs, targets) examples, targets -1 off the answer: padded
    forwards, the targets' log-softmax summed (no pair, packing or reference-cache code)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), rows):
            X, Y = nanosft.collate(seqs[i:i + rows], pad)
            logp = torch.log_softmax(model.eval()(X)[0].float(), -1)
            picked = logp.gather(-1, Y.clamp(min=0)[..., None])[..., 0]
            out.append(torch.where(Y != -1, picked, torch.zeros_like(picked)).sum(-1))
    return torch.cat(out).double()


def test_dpo_script_end_to_end(sft_ckpt, tok, tmp_path):
    """On the world with --rewind (the dev half's path, rewinding) and --plot."""
    out = str(tmp_path / "out")
    r = run_script("dpo.py", "--ckpt", sft_ckpt, "--out-dir", out, "--min-margin", "30", "--max-iters", "6",
                   "--batch-size", "4", "--lr", "1e-3", "--warmup", "2", "--eval-interval", "3",
                   "--log-interval", "3", "--dtype", "float32", "--device", "cpu", "--rewind", "--plot")
    assert r.returncode == 0, r.stderr
    assert "rewards/margins" in r.stdout and "KL(pi||ref)" in r.stdout
    res = json.load(open(os.path.join(out, "dpo.json")))
    for key in ("pref_accuracy_heldout", "style_rate_before", "style_rate_after", "heldout_accuracy_before",
                "heldout_accuracy_after", "kl", "response_tokens_before", "response_tokens_after", "seconds"):
        assert res[key] is not None, key
    assert res["steps"] == 6 and res["format"] == "votes"
    assert len(res["samples"]) == 5 and {"before", "after", "prompt"} <= set(res["samples"][0])
    assert len(res["history"]["train"]["rewards/margins"]) == 6
    for png in ("dpo_logratio.png", "dpo_margin.png"):
        assert os.path.getsize(os.path.join(out, png)) > 0
    # dpo.pt's step is its weights' step: the rewound one (the last step is in dpo.json)
    assert nanosft.load_checkpoint(os.path.join(out, "dpo.pt"), expect_kind=("dpo",))["iter"] == res["rewound_step"]

    # step 0: the policy IS the reference, every implicit reward 0: margin 0, ties (accuracy 0.5), KL 0
    ev = res["history"]["eval"]
    assert ev["step"] == [0, 3, 6]
    assert (ev["margin"][0], ev["pref_accuracy"][0], ev["kl"][0]) == (0.0, 0.5, 0.0)
    # the held-out pairs (the world's, all of them scored), scored here from their tensors
    _, held = preferences.read_pairs(world_qa.EVAL_THREADS, *dpo.HELDOUT_RULE)
    _, held = preferences.pair_examples(tok, held, 64, formats.DataReport(world_qa.EVAL_THREADS, unit="pairs"))
    assert len(held) == res["pairs_heldout"] == res["pairs_heldout_scored"] <= dpo.EVAL_PAIRS
    beta = dpo.DEFAULTS["beta"]
    assert res["beta"] == beta
    load = lambda p: nanosft.model_from_checkpoint(nanosft.load_checkpoint(p))[0]
    start = load(sft_ckpt)
    score = lambda m: (summed_answer_logprobs(m, [e[:2] for e in held], tok.pad),
                       summed_answer_logprobs(m, [e[2:] for e in held], tok.pad))
    ref_c, ref_r = score(start)

    def check(scores, margin, pref_accuracy, logp_accuracy=None):
        """The reported mean margin and preference accuracy are those of a model's `scores` against
        the start's: beta ((pi_c - ref_c) - (pi_r - ref_r)), a tie counting 1/2. Float rounding
        (packed rows there, padded ones here) may flip the sign of a margin within 1e-4 of 0:
        those may go either way. The start's own weights give exact zeros on both sides: ties."""
        pi_c, pi_r = scores
        m = beta * ((pi_c - ref_c) - (pi_r - ref_r))
        slack = ((m != 0) & (m.abs() < 1e-4)).double().mean().item() + 1e-6  # (+ a float32 mean there)
        assert margin == pytest.approx(m.mean().item(), abs=1e-5)
        assert abs(pref_accuracy - ((m > 0).double() + 0.5 * (m == 0).double()).mean().item()) <= slack
        if logp_accuracy is not None:
            near = ((pi_c - pi_r).abs() < 1e-3).double().mean().item() + 1e-6
            assert abs(logp_accuracy - (pi_c > pi_r).double().mean().item()) <= near
        return m

    # the evaluations along the way: the weights of steps 3 and 6 (kept for rewinding) moved, the KL
    # is > 0, and the margin and accuracy logged at step 6 are its weights' against the starting model
    assert abs(res["logp_accuracy_heldout_before"] - (ref_c > ref_r).double().mean().item()) < 1e-6
    at, scores = {0: start}, {0: (ref_c, ref_r)}
    for k, step in enumerate(ev["step"][1:], 1):
        ck = nanosft.load_checkpoint(dpo_eval.path_checkpoint(out, step))
        assert ck["iter"] == step and ev["kl"][k] > 0
        at[step] = nanosft.model_from_checkpoint(ck)[0]
        assert any(not torch.equal(v, start.state_dict()[n]) for n, v in at[step].state_dict().items())
    scores[6] = score(at[6])
    assert check(scores[6], ev["margin"][2], ev["pref_accuracy"][2]).abs().max() > 1e-3
    # the reported final numbers are those of the saved dpo.pt, the weights of the step rewound to
    # (on this untrained model every answer is degenerate, so only the start qualifies: step 0)
    if all(p["degenerate_rate"] > dpo_eval.DEGENERATE_MAX for p in res["history"]["path"][1:]):
        assert res["rewound_step"] == 0
    final = load(os.path.join(out, "dpo.pt"))
    saved = at[res["rewound_step"]].state_dict()
    assert all(torch.equal(v, saved[n]) for n, v in final.state_dict().items())
    final_scores = scores.get(res["rewound_step"]) or score(final)  # (the same weights: the same scores)
    check(final_scores, res["heldout_reward_margin"], res["pref_accuracy_heldout"], res["logp_accuracy_heldout_after"])
    assert res["kl"] == 0.0 if res["rewound_step"] == 0 else res["kl"] > 0


def test_resume_5_plus_5_equals_10_straight(sft_ckpt, tmp_path):
    rows = [{"prompt": f"{q} ({k})", "chosen": c, "rejected": r} for k in range(4) for q, c, r in PAIRS]
    rows += [rows[0], {"prompt": "Tie?", "chosen": "same", "rejected": "same"}]  # skipped, and counted in dpo.json
    data = write(tmp_path, "p.jsonl", rows)
    # warmup > max-iters keeps the learning rate independent of --max-iters, so 5 steps and
    # a resume to 10 follow the same schedule as 10 straight steps
    common = ["--ckpt", sft_ckpt, "--data", data, "--batch-size", "4", "--lr", "1e-3", "--warmup", "100",
              "--eval-interval", "100", "--log-interval", "100", "--dtype", "float32", "--device", "cpu"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    dpo.main(common + ["--out-dir", a, "--max-iters", "10"])
    dpo.main(common + ["--out-dir", b, "--max-iters", "5"])
    assert nanosft.load_checkpoint(os.path.join(b, "dpo.pt"))["iter"] == 5
    assert nanosft.load_checkpoint(os.path.join(b, "dpo_last.pt"))["iter"] == 5  # what --resume reads
    dpo.main(common + ["--out-dir", b, "--max-iters", "10", "--resume"])
    ck_a, ck_b = nanosft.load_checkpoint(os.path.join(a, "dpo.pt")), nanosft.load_checkpoint(os.path.join(b, "dpo.pt"))
    assert ck_a["iter"] == ck_b["iter"] == 10
    moved = False
    for k, v in ck_a["model"].items():
        torch.testing.assert_close(ck_b["model"][k], v, rtol=0, atol=1e-5)
        moved |= not torch.equal(v, nanosft.load_checkpoint(sft_ckpt)["model"][k])
    assert moved
    report = json.load(open(os.path.join(a, "dpo.json")))["data_report"]
    n = len(rows)
    assert report["total"] == n and report["kept"] == n - 2
    assert {r: v["records"] for r, v in report["skipped"].items()} == {
        "that repeat an earlier pair exactly": [n - 1], "whose chosen == rejected": [n]}
    hist_a = json.load(open(os.path.join(a, "dpo.json")))["history"]["train"]
    hist_b = json.load(open(os.path.join(b, "dpo.json")))["history"]["train"]
    assert hist_b["step"] == list(range(1, 11))
    torch.testing.assert_close(torch.tensor(hist_b["rewards/margins"]), torch.tensor(hist_a["rewards/margins"]))


def test_dpo_script_bad_data_exits_2_with_one_line(sft_ckpt, tmp_path):
    bad = write(tmp_path, "bad.jsonl", [{"prompt": "Q", "chosen": "x", "rejected": {"text": "y"}}])
    r = run_script("dpo.py", "--ckpt", sft_ckpt, "--data", bad, "--out-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "bad.jsonl:1: field 'rejected' must be a string" in r.stderr
    assert not os.path.exists(tmp_path / "o")


def constant_next_token_model(tok, logits):
    """A GPT whose next-token distribution is softmax(logits) at every position, whatever the
    context: ln_f's gain 0 and bias e_0 make every final hidden state e_0, so the (tied) output
    layer reads column 0 of the embedding."""
    model = tiny_gpt(tok, seed=6)
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
        model.ln_f.bias[0] = 1.0
        model.wte.weight[:, 0] = logits
    return model.eval()


def test_kl_estimate_is_the_exact_sequence_kl(tok):
    model = tiny_gpt(tok, seed=6)
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    process = nanosft.Process(torch.device("cpu"), "float32")
    prompts = [pair_dict(*p)["prompt"] for p in PAIRS]
    assert dpo.kl_estimate(model, ref, tok, prompts, process, seed=0) == 0.0
    # Two models, each with one next-token distribution at every position: p (the policy) never
    # draws <|end|>, so every sampled answer has the full n tokens; q (the reference) gives
    # <|end|> 0.9. KL(pi || ref) of an answer is then exactly n KL(p || q), whatever was sampled.
    g = torch.Generator().manual_seed(0)
    V = tok.vocab_size
    zp, zq = torch.randn(V, generator=g) * 2, torch.randn(V, generator=g) * 2
    zp[tok.end] = -60.0
    zq[tok.end] = 0.0
    zq[tok.end] = math.log(9.0) + torch.logsumexp(zq[torch.arange(V) != tok.end], 0)  # q(<|end|>) = 0.9
    p, q = torch.softmax(zp.double(), 0), torch.softmax(zq.double(), 0)
    assert abs(q[tok.end].item() - 0.9) < 1e-5 and p[tok.end].item() < 1e-20
    kl_pq, kl_qp = (p * (p.log() - q.log())).sum().item(), (q * (q.log() - p.log())).sum().item()
    n = min(dpo.KL_TOKENS, 64 // 2)  # the tokens sampled per prompt (block_size 64)
    policy, reference = constant_next_token_model(tok, zp), constant_next_token_model(tok, zq)
    got = dpo.kl_estimate(policy, reference, tok, prompts, process, seed=0)
    assert got == pytest.approx(n * kl_pq, rel=1e-4)
    # the mistakes this tells apart: KL(ref || pi) (arguments swapped), the answer sampled from
    # the reference (it stops after ~1 token), the prompt and padding positions summed too, one
    # position's KL (a mean over positions)
    prompt_lens = [len(nanosft.chat_prompt(tok, m)) for m in prompts]
    for wrong in (n * kl_qp, 1.2 * kl_pq, (min(prompt_lens) + n - 1) * kl_pq, kl_pq):
        assert abs(wrong - n * kl_pq) > 0.02 * n * kl_pq
    assert dpo.kl_estimate(policy, copy.deepcopy(policy), tok, prompts, process, seed=0) == 0.0


def test_script_uses_the_starting_checkpoint_as_reference(tok, sft_ckpt, tmp_path):
    """dpo.py's own wiring: the reference is the frozen STARTING model. If the live policy
    (detached) were used as the reference, every log-ratio would be 0 at every step, so the
    logged rewards would never move. At step 1 policy == reference (margin ~0); after a few
    steps at a high learning rate the policy has moved away from it."""
    data = write(tmp_path, "p.jsonl", [{"prompt": f"{q} ({k})", "chosen": c, "rejected": r} for k in range(4) for q, c, r in PAIRS])
    out = str(tmp_path / "o")
    dpo.main(["--ckpt", sft_ckpt, "--data", data, "--batch-size", "4", "--lr", "3e-3", "--warmup", "1",
              "--loss", "sigmoid", "--max-iters", "8", "--eval-interval", "8", "--log-interval", "8",
              "--dtype", "float32", "--device", "cpu", "--out-dir", out])
    res = json.load(open(os.path.join(out, "dpo.json")))
    hist = res["history"]["train"]
    chosen = hist["rewards/chosen"]
    assert abs(chosen[0]) < 1e-4 and abs(hist["rewards/margins"][0]) < 1e-4
    assert max(abs(v) for v in chosen[1:]) > 1e-3
    assert hist["rewards/margins"][-1] > hist["rewards/margins"][0]  # and it moved the right way
    # the evaluator measures against the starting model too: a policy that moved has a KL > 0
    # (the live policy as the evaluator's reference logs 0 at every step)
    assert res["history"]["eval"]["kl"][-1] > 0 and res["kl"] > 0
    # "the right way" from the text alone, no pair code: log pi(chosen) - log pi(rejected) grew
    # relative to the starting model's (a swap anywhere in the script's pairs would shrink it)
    start, final = (nanosft.model_from_checkpoint(nanosft.load_checkpoint(p))[0] for p in (sft_ckpt, os.path.join(out, "dpo.pt")))

    def gap(m):
        with torch.no_grad():
            return sum(answer_logprob(m, tok, q, c) - answer_logprob(m, tok, q, r) for q, c, r in PAIRS)
    assert gap(final) > gap(start)
