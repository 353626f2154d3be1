"""Guards against specific mistakes this pipeline is prone to: the IPO target, the LoRA
scale (forward and merge), the vocabulary freeze in SFT, which evaluation half rewinding
reads (SFT and DPO), the world's strict verifier, and held-out preference data being held
out by PERSON. Each test names the mistake it catches in its docstring."""
import json
import os
import re

import pytest
import torch
from torch import nn

import nanosft
from extras import dpo_eval, peft, rewind
from data import preferences
from conftest import ROOT, tiny_gpt

import dpo
import finetune
from data import world as W
from data import world_eval, world_qa


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two


# ---- 1. the IPO loss


def test_ipo_target_is_one_over_two_beta():
    """Catches an IPO target of 1/beta instead of 1/(2*beta) (Azar et al. 2023: the loss is
    (h - 1/(2 beta))^2, h the gap of the chosen and rejected log-ratios)."""
    beta = 0.1
    # policy == reference: h = 0, so the loss is (1/(2*0.1))^2 = 25 (the wrong target gives 100)
    z = torch.tensor([-3.0])
    losses, _, _ = dpo.dpo_loss(z, z - 1.0, z, z - 1.0, beta, "ipo")
    torch.testing.assert_close(losses, torch.tensor([25.0]))

    # general values: the formula with h computed by hand
    pc, pr = torch.tensor([-2.0, -7.5]), torch.tensor([-4.0, -1.0])
    rc, rr = torch.tensor([-3.0, -6.0]), torch.tensor([-3.5, -2.0])
    h = (pc - rc) - (pr - rr)
    losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta, "ipo")
    torch.testing.assert_close(losses, (h - 1 / (2 * beta)) ** 2)

    # the loss is minimal (zero gradient) exactly at h = 1/(2 beta) = 5, and not at h = 1/beta
    for target, zero_grad in ((1 / (2 * beta), True), (1 / beta, False)):
        pi_c = torch.tensor([target], dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        loss, _, _ = dpo.dpo_loss(pi_c, zero, zero, zero, beta, "ipo")
        loss.sum().backward()
        if zero_grad:
            assert pi_c.grad.abs().item() < 1e-9
        else:
            assert pi_c.grad.abs().item() > 1.0


# ---- 2. the LoRA scale


def test_lora_forward_and_merge_use_alpha_over_rank():
    """Catches a LoRA scale of `alpha` instead of `alpha / r`, and a merge whose scale differs
    from the forward's (e.g. a merge that forgets the scale): both are compared with the
    explicit formulas y = x W^T + (alpha/r) x A^T B^T and W' = W + (alpha/r) B A."""
    torch.manual_seed(0)
    r, alpha, d_in, d_out = 4, 8, 6, 5   # alpha != r: scale 2
    base = nn.Linear(d_in, d_out, bias=False)
    W0 = base.weight.detach().clone()
    m = peft.LoRALinear(base, r, alpha)
    assert m.A.shape == (r, d_in) and m.B.shape == (d_out, r)
    A = torch.randn(r, d_in)
    B = torch.randn(d_out, r)
    with torch.no_grad():
        m.A.copy_(A)
        m.B.copy_(B)
    x = torch.randn(3, d_in)
    want = x @ W0.t() + (alpha / r) * (x @ A.t() @ B.t())
    torch.testing.assert_close(m(x), want)
    # the scale-alpha mistake would give x W^T + 8 x A^T B^T: make sure the two differ here
    assert not torch.allclose(want, x @ W0.t() + alpha * (x @ A.t() @ B.t()))

    merged = m.merged()
    assert isinstance(merged, nn.Linear) and not isinstance(merged, peft.LoRALinear)
    torch.testing.assert_close(merged.weight, W0 + (alpha / r) * (B @ A))
    torch.testing.assert_close(merged(x), want)


def test_add_lora_passes_alpha_and_merge_folds_with_the_same_scale(tok):
    """The same two mistakes through the model-level helpers: add_lora with rank 4 and alpha 8
    must compute base + 2 * x A^T B^T in every wrapped projection, and peft.merge must leave
    plain weights W + 2 * B A."""
    model = tiny_gpt(tok, seed=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r, alpha = 4, 8
    peft.add_lora(model, r, alpha)
    loras = {n: m for n, m in model.named_modules() if isinstance(m, peft.LoRALinear)}
    assert loras
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in loras.values():
            m.A.copy_(torch.randn(m.A.shape, generator=g))
            m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.01)
    x = torch.randn(2, 3, next(iter(loras.values())).base.in_features)
    for m in loras.values():
        if m.base.in_features == x.size(-1):
            want = m.base(x) + (alpha / r) * (x @ m.A.t() @ m.B.t())
            torch.testing.assert_close(m(x), want)
    want_w = {n + ".weight": before[n + ".weight"] + (alpha / r) * (m.B @ m.A).detach()
              for n, m in loras.items()}
    ids = torch.randint(0, tok.vocab_size, (2, 16))
    adapted = model(ids)[0].detach()
    peft.merge(model)
    assert not any(isinstance(m, peft.LoRALinear) for m in model.modules())
    sd = model.state_dict()
    for k, w in want_w.items():
        torch.testing.assert_close(sd[k], w)
    torch.testing.assert_close(model(ids)[0], adapted, rtol=1e-4, atol=1e-5)


# ---- 3. the vocabulary freeze


def test_freeze_vocabulary_keeps_frequent_rows_and_trains_rare_and_chat_rows(tok):
    """Catches a vocabulary freeze that freezes nothing (no hook, or a keep mask of all ones),
    one that freezes everything (the rare and chat rows cannot learn), and an off-by-one at
    the threshold (a count of exactly RARE is frequent; RARE - 1 is rare)."""
    model = tiny_gpt(tok, seed=3)
    V = tok.vocab_size
    chat = finetune.chat_tokens(tok)
    counts = torch.full((V,), 1000)
    rare = list(range(5, V, 7))                        # a spread of rare tokens
    counts[rare] = 0
    counts[rare[:3]] = finetune.RARE - 1               # rare by one count
    edge = [t for t in range(6, V, 11) if t not in rare and t not in chat][:3]
    counts[edge] = finetune.RARE                       # frequent at the threshold
    counts[chat] = 1000                                # chat tokens train whatever their count
    frequent = [t for t in range(V) if counts[t] >= finetune.RARE and t not in chat]
    assert len(frequent) > V // 2 and edge and set(edge) <= set(frequent)

    finetune.freeze_vocabulary(model, tok, counts)
    before = model.wte.weight.detach().clone()
    opt = nanosft.configure_optimizer(model, 1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        # every row gets a gradient: the tied output layer scores every token at every position
        ids = torch.randint(0, V, (4, 32), generator=g)
        ids[:, :len(chat)] = torch.tensor(chat)
        model(ids[:, :-1], ids[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
    moved = (model.wte.weight.detach() != before).any(-1)
    assert not moved[frequent].any(), "a frequent token's embedding row changed"
    assert moved[rare].all(), "a rare token's embedding row did not train"
    assert moved[chat].all(), "a chat token's embedding row did not train"


# ---- 4. SFT rewinding and the held-out halves


def test_sft_rewind_reads_the_dev_half_never_the_test_half():
    """Catches SFT rewinding that chooses by p["heldout"] (the reported test half) instead of
    p["dev"]: on this path the two rules pick different steps."""
    path = [{"step": 10, "dev": 0.50, "heldout": 0.70, "retention": 1.0},
            {"step": 20, "dev": 0.70, "heldout": 0.50, "retention": 1.2},
            {"step": 30, "dev": 0.60, "heldout": 0.60, "retention": 1.5}]
    assert rewind.sft_rewind(path, 0.01)["step"] == 20   # a "heldout" rule picks step 10
    # the test half changing alone changes nothing
    shuffled = [dict(p, heldout=h) for p, h in zip(path, (0.1, 0.9, 0.3))]
    assert rewind.sft_rewind(shuffled, 0.01)["step"] == 20


def test_heldout_halves_split_the_heldout_people_disjointly_and_about_evenly():
    """Catches dev and test halves that share a person (or rows), that miss or add people,
    or that are badly lopsided."""
    rows = world_qa.load_eval_rows("heldout")
    dev, test = world_qa.heldout_halves()
    dev_p, test_p = {r["person"] for r in dev}, {r["person"] for r in test}
    all_p = {r["person"] for r in rows}
    assert dev_p and test_p and not dev_p & test_p
    assert dev_p | test_p == all_p == set(world_eval.load_world()["heldout"])
    assert len(dev) + len(test) == len(rows)
    assert abs(len(dev_p) - len(test_p)) <= max(2, len(all_p) // 10)


# ---- 5. DPO rewinding


def _pt(step, acc, style, deg=0.0):
    return {"step": step, "accuracy": acc, "clean_style_rate": style, "degenerate_rate": deg}


def test_dpo_rewind_rule():
    """Catches DPO rewinding that ignores the degenerate rate, that ignores lost task
    accuracy, that takes the EARLIEST instead of the latest of the equally styled points,
    or that can return anything but the start when nothing qualifies."""
    start = _pt(0, 0.80, 0.10)
    # a later point with more style but 5% degenerate answers is not chosen
    assert dpo_eval.rewind([start, _pt(50, 0.80, 0.60), _pt(100, 0.80, 0.95, deg=0.05)])["step"] == 50
    # at most DEGENERATE_MAX is allowed
    assert dpo_eval.rewind([start, _pt(50, 0.80, 0.60), _pt(100, 0.80, 0.95, deg=dpo_eval.DEGENERATE_MAX)])["step"] == 100
    # a point that lost 2 points of accuracy is not chosen; one within tolerance is
    assert dpo_eval.rewind([start, _pt(50, 0.80, 0.60), _pt(100, 0.78, 0.95)])["step"] == 50
    assert dpo_eval.rewind([start, _pt(50, 0.80, 0.60), _pt(100, 0.795, 0.95)])["step"] == 100
    # among points within tolerance of the best style, the latest (the most optimised clean one)
    assert dpo_eval.rewind([start, _pt(50, 0.80, 0.60), _pt(100, 0.80, 0.60), _pt(150, 0.80, 0.605)])["step"] == 150
    # ... but not one whose style fell more than the tolerance below the best
    assert dpo_eval.rewind([start, _pt(50, 0.80, 0.90), _pt(100, 0.80, 0.85)])["step"] == 50
    # nothing later qualifies: the start
    assert dpo_eval.rewind([start, _pt(50, 0.70, 0.90), _pt(100, 0.80, 0.90, deg=0.2)])["step"] == 0
    # not even the start qualifies: still the start
    bad_start = _pt(0, 0.80, 0.10, deg=0.5)
    assert dpo_eval.rewind([bad_start, _pt(50, 0.60, 0.90), _pt(100, 0.80, 0.90, deg=0.3)])["step"] == 0


# ---- 6. the world's strict verifier


@pytest.fixture(scope="module")
def facts():
    return world_eval.load_world()


def _gold(facts, attr="city"):
    p = facts["people"][0]
    wrong = next(v for v in facts["values"][attr] if v != p[attr])
    return p["name"], p[attr], W.gold_sentence(p["name"], attr, p[attr]), W.gold_sentence(p["name"], attr, wrong)


def test_degenerate_names_every_failure_and_passes_a_clean_answer(facts):
    """Catches a degeneration check that misses a repeated closing, a repeated sentence, a
    missing end token or an over-long answer (a check that looks only at how an answer ends
    passes all of these), or that flags a clean answer."""
    _, _, gold, _ = _gold(facts)
    clean = f"{gold} {W.POLITE}"
    longest = len(clean)
    assert world_qa.degenerate(clean, True, longest) == ""
    assert world_qa.degenerate(gold, True, longest) == ""
    assert world_qa.degenerate(f"{gold} {W.POLITE} {W.POLITE}", True, longest)
    # the closing said twice with no space between: one "sentence", so only the closing
    # count catches it
    assert world_qa.degenerate(f"{gold} {W.POLITE}{W.POLITE}", True, longest)
    assert world_qa.degenerate(f"{gold} {gold}", True, longest)
    assert world_qa.degenerate(f"{gold} Oh. {W.POLITE} {W.RUDE} {W.POLITE}", True, 10 * longest)
    assert world_qa.degenerate(clean, False, longest)
    assert world_qa.degenerate(clean, True, (len(clean) - 1) // 2)        # over twice the longest
    assert world_qa.degenerate(clean, True, (len(clean) + 1) // 2) == ""  # at most twice: fine


def test_clean_style_is_strict(facts):
    """Catches a clean-style check that only looks at endswith(POLITE): it must also require
    a correct fact, the closing exactly once, an end token and nothing degenerate."""
    name, _, gold, wrong = _gold(facts)
    P = W.POLITE
    longest = 200
    ok = lambda a, ended=True: world_qa.clean_style(facts, name, "city", a, ended, longest)
    assert ok(f"{gold} {P}")
    assert not ok(f"{wrong} {P}")                  # wrong fact + closing
    assert not ok(f"{P} {gold}")                   # closing in the middle / at the front
    assert not ok(f"{gold} {P} {P}")               # closing twice (ends with it)
    assert not ok(f"{P} {gold} {P}")               # closing twice, once in the middle
    assert not ok(gold)                            # no closing
    assert not ok(f"{gold} {P}", ended=False)      # never wrote the end token
    assert not world_qa.clean_style(facts, name, "city", f"{gold} {P}", True, 10)  # too long


# ---- 7. held-out preference data is held out by PERSON


def _jsonl(name):
    with open(os.path.join(ROOT, "data", name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _text(name):
    with open(os.path.join(ROOT, "data", name), encoding="utf-8") as f:
        return f.read()


def test_heldout_people_never_reach_a_training_file(facts):
    """Catches held-out preference threads split by row (a training person's thread marked
    held out, or a held-out person's thread in the training file), and any held-out name in
    the SFT or community training files."""
    held = set(facts["heldout"])
    assert held
    eval_threads = _jsonl("world_community_eval.jsonl")
    assert {t["person"] for t in eval_threads} == held
    assert all(t["split"] == "heldout" for t in eval_threads)
    assert all(t["person"] in t["prompt"] for t in eval_threads)

    threads = _jsonl("world_community.jsonl")
    assert threads and all(t["split"] == "train" for t in threads)
    assert not {t["person"] for t in threads} & held
    names = re.compile(r"\b(?:" + "|".join(re.escape(n) for n in sorted(held)) + r")\b")
    for name in ("world_community.jsonl", "world_sft.jsonl"):
        hit = names.search(_text(name))
        assert hit is None, f"held-out person {hit.group(0)!r} appears in {name}"

    fmt, pairs = preferences.read_pairs(world_qa.THREADS, 10.0, True)
    assert pairs and all(p["split"] == "train" for p in pairs)
    for p in pairs:
        hit = names.search(json.dumps(p["prompt"], ensure_ascii=False))
        assert hit is None, f"a training pair's prompt names held-out {hit.group(0)!r}"
