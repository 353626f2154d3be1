"""The wiring behind the claims that make the results honest: held-out preference pairs
about people never trained on, a split by record, rewinding on the dev half while the test
half is reported, the KL measured against the frozen starting model and in the direction
KL(pi || ref), a pair's prompt cut from the left, DPO pushing the chosen answer up with no
RPO term, a generator that keeps the held-out people out of every training file, and a
resume that restores the RNG. Each test fails when its part is wired wrong, and each runs in
well under a second: fakes stand in for generation, and the evaluations depend on WHICH
people they see, so a wrong half gives a different number."""
import json
import os
import re
import types

import pytest
import torch

import nanosft
from extras import runtime
from data import formats, preferences
from extras import own_data
from data import world as W
from data import world_eval, world_qa
from conftest import tiny_gpt
from test_dpo import PAIRS, answer_logprob

import dpo
import finetune as sft_eval  # (the SFT evaluation lives in the stage file)

RT = nanosft.Process(torch.device("cpu"), "float32")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


class Stop(Exception):
    """Raised by a stand-in to end dpo.main once what it wired is recorded."""


@pytest.fixture(scope="module")
def facts():
    return world_eval.load_world()


def names_re(names):
    return re.compile(r"\b(?:" + "|".join(re.escape(n) for n in sorted(names)) + r")\b")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def start_ckpt(tok, tmp_path):
    path = str(tmp_path / "sft.pt")
    nanosft.save_checkpoint(path, nanosft.checkpoint_dict("sft", tiny_gpt(tok, seed=5), tok))
    return path


# ---- 1. the held-out preference pairs: people never trained on


def test_dpo_on_the_world_scores_held_out_pairs_about_held_out_people_only(start_ckpt, tmp_path, monkeypatch, facts):
    """Catches dpo.py reading its held-out pairs from the training threads (or training on
    the held-out people's): what dpo.main hands to the pair loader is checked by the people
    its pairs name."""
    seen = {}

    def load_pairs(path, heldout_path, *a, **k):
        seen.update(path=path, heldout=heldout_path)
        raise Stop
    monkeypatch.setattr(preferences, "load_pairs", load_pairs)
    with pytest.raises(Stop):
        dpo.main(["--ckpt", start_ckpt, "--out-dir", str(tmp_path / "o"), "--device", "cpu", "--dtype", "float32"])
    held = names_re(facts["heldout"])
    train_pairs = preferences.read_pairs(seen["path"], 10.0)[1]
    held_pairs = preferences.read_pairs(seen["heldout"], 10.0)[1]
    assert train_pairs and held_pairs
    assert all(held.search(p["prompt"][0]["content"]) for p in held_pairs)
    assert not any(held.search(p["prompt"][0]["content"]) for p in train_pairs)


def test_load_pairs_takes_held_out_pairs_from_the_held_out_file(tok, tmp_path):
    """Catches preferences.load_pairs reading its held-out pairs from the training file."""
    thread = lambda q, good, bad: {"prompt": q, "answers": [{"text": good, "up": 9, "down": 0},
                                                            {"text": bad, "up": 0, "down": 3}]}
    train = write_jsonl(tmp_path / "train.jsonl", [thread(f"Where was Ada Stone born? ({k})", "Lisbon.", "Oslo.")
                                                   for k in range(6)])
    heldout = write_jsonl(tmp_path / "held.jsonl", [thread(f"Where was Leon Berg born? ({k})", "Cairo.", "Lima.")
                                                    for k in range(3)])
    (tp, tx), (hp, hx), counts = preferences.load_pairs(train, heldout, tok, 64, 1.0, True, False, lambda s: None, 100)
    assert len(tp) == len(tx) == 6 and len(hp) == len(hx) == 3 and counts["pairs_heldout"] == 3
    assert all("Ada Stone" in p["prompt"][0]["content"] for p in tp)
    assert all("Leon Berg" in p["prompt"][0]["content"] for p in hp)


def test_held_out_benchmark_stays_the_same_whatever_the_training_pairs(tok, tmp_path):
    """dpo.py on the world scores the same held-out pairs (HELDOUT_RULE) whatever --pairs and
    --min-margin the training uses, so runs with different pair rules are comparable."""
    import dpo
    votes = [{"prompt": f"Where was Ada Stone born? ({k})",
              "answers": [{"text": t, "up": u, "down": 0} for t, u in (("Lisbon.", 40), ("Oslo.", 25), ("Lima.", 5))]}
             for k in range(4)]
    train = write_jsonl(tmp_path / "train.jsonl", votes)
    held = write_jsonl(tmp_path / "held.jsonl", [{**v, "prompt": v["prompt"].replace("Ada Stone", "Leon Berg")}
                                                 for v in votes])
    seen = set()
    for margin, top in ((10.0, True), (20.0, True), (1.0, False), (30.0, False)):
        (tp, _), (hp, _), _ = preferences.load_pairs(train, held, tok, 64, margin, top, False, lambda s: None, 100,
                                                 heldout_rule=dpo.HELDOUT_RULE)
        seen.add(tuple((p["chosen"], p["rejected"]) for p in hp))
    # top answer (40) against those it beat by >= 10: Oslo (25) and Lima (5), in each of 4 threads
    assert len(seen) == 1 and len(next(iter(seen))) == 8
    assert dpo.HELDOUT_RULE == (dpo.DEFAULTS["min_margin"], dpo.DEFAULTS["pairs"] == "top")


# ---- 2. a file without a "split" field is divided by record


def test_a_file_without_a_split_field_is_divided_by_prompt(tmp_path):
    """Catches a split by pair: the pairs of one thread (one record, one prompt) must all
    land on the same side; the held-out prompts are those whose hash falls below
    HELDOUT_FRAC, in any order of the file (so SFT's own-data split agrees)."""
    rows = [{"prompt": f"Question {i}?", "answers": [{"text": f"answer {i}.{j}", "up": 40 - 10 * j, "down": 0}
                                                     for j in range(4)]} for i in range(300)]
    path = write_jsonl(tmp_path / "votes.jsonl", rows)
    _, train, held = own_data.load_preferences(path, 1.0)
    expect = {r["prompt"] for r in rows
              if own_data.hash_share(own_data.prompt_key([{"role": "user", "content": r["prompt"]}])) < 0.1}
    assert {p["prompt"][0]["content"] for p in held} == expect and 15 <= len(expect) <= 60  # about 10%
    assert len(train) + len(held) == 300 * 3 and len(held) == 3 * len(expect)  # whole threads
    assert not {p["prompt"][0]["content"] for p in train} & {p["prompt"][0]["content"] for p in held}
    _, _, held_reversed = own_data.load_preferences(write_jsonl(tmp_path / "reversed.jsonl", rows[::-1]), 1.0)
    assert {p["prompt"][0]["content"] for p in held_reversed} == expect


# ---- 3, 4. rewinding reads the dev half; the test half is what is reported


def fake_answers(knows):
    """world_qa.answer_questions for a model that knows the facts of the people in `knows` and
    gives a wrong fact about everyone else: its accuracy on a half says which half it saw."""
    facts = world_eval.load_world()
    people = {p["name"]: p for p in facts["people"]}
    rows = {r["prompt"]: r for r in world_qa.load_eval_rows() if "person" in r}

    def answer(r):
        p, a = people[r["person"]], r["attribute"]
        value = p[a] if r["person"] in knows else next(v for v in W.VALUES[a] if v != p[a])
        return W.gold_sentence(r["person"], a, value)

    def answer_questions(model, tok, prompts, max_new_tokens=24):
        return [answer(rows[q]) for q in prompts], [True] * len(prompts)
    return answer_questions


def test_sft_dev_key_is_the_dev_halfs_accuracy(tok, monkeypatch):
    """Catches the rewinding measure (extras/rewind.py DevHalf, on every point of
    finetune.SFTEvaluator with --rewind) feeding the test half's accuracy into "dev" (what
    rewinding reads), or swapping the halves: the model knows the dev half's people only."""
    from extras import rewind

    dev, test = world_qa.heldout_halves()
    dev_people = {r["person"] for r in dev}
    monkeypatch.setattr(world_qa, "answer_questions", fake_answers(dev_people))
    monkeypatch.setattr(world_eval, "knowledge_probe", lambda *a, **k: 0.5)
    ev = sft_eval.SFTEvaluator(RT, tok, None, 256)
    half = rewind.DevHalf(ev, None, sft_eval.top_voted)
    ev.more.append(half)
    r = ev(tiny_gpt(tok, block_size=256))
    assert r["dev"] == 1.0 and r["heldout"] == 0.0
    assert {r["person"] for r in half.dev} <= dev_people and {r["person"] for r in ev.test} == {r["person"] for r in test}
    # the dev answer loss is measured on the dev half's people too
    said = " ".join(tok.decode(X[i].tolist()) for X, _ in half.answers for i in range(len(X)))
    assert names_re(dev_people).search(said) and not names_re({r["person"] for r in test}).search(said)


def test_dpo_path_is_measured_on_the_dev_half_and_the_report_on_the_test_half(tok, start_ckpt, tmp_path, monkeypatch):
    """Catches dpo.py --rewind measuring its path on the test half, or dpo.py reporting the dev
    half as the result: the model knows the dev half's people only. Without --rewind there is
    no path: out/dpo.pt holds the final weights."""
    dev, _ = world_qa.heldout_halves()
    monkeypatch.setattr(world_qa, "answer_questions", fake_answers({r["person"] for r in dev}))
    monkeypatch.setattr(dpo, "kl_estimate", lambda *a, **k: 0.0)
    flags = ["--ckpt", start_ckpt, "--max-iters", "2", "--eval-interval", "1", "--batch-size", "2", "--device", "cpu",
             "--dtype", "float32"]
    for rewinding in (True, False):
        out = str(tmp_path / str(rewinding))
        dpo.main(flags + ["--out-dir", out] + ["--rewind"] * rewinding)
        result = json.load(open(f"{out}/dpo.json"))
        path = result["history"]["path"]
        assert [p["step"] for p in path] == ([0, 1, 2] if rewinding else [])
        assert [p["accuracy"] for p in path] == [1.0] * len(path)  # the dev half, which rewinding reads
        assert result["heldout_accuracy_before"] == result["heldout_accuracy_after"] == 0.0  # the test half, reported
        assert {s["prompt"] for s in result["samples"]} <= {r["prompt"] for r in world_qa.heldout_halves()[1]}
        assert os.path.isdir(f"{out}/dpo_path") == rewinding
        assert nanosft.load_checkpoint(f"{out}/dpo.pt")["iter"] == result["rewound_step"] == (result["rewound_step"] if rewinding else 2)


# ---- 5. the reference: the frozen starting model, never the policy


def test_dpo_main_measures_against_the_frozen_starting_model(tok, start_ckpt, tmp_path, monkeypatch):
    """Catches the measures given the live policy as their reference (every logged KL would be
    0), and a reference left unfrozen: what dpo.main hands to the KL estimate at its first
    evaluation. (The held-out margins against the starting model: test_dpo's end-to-end test.)"""
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Where was Ada Stone born? ({k})", "chosen": "Lisbon.",
                                              "rejected": "Oslo, I think."} for k in range(8)])
    seen = {}
    real = nanosft.configure_optimizer

    def configure_optimizer(model, *a, **k):  # what dpo.main trains: the policy
        seen["policy"] = model
        return real(model, *a, **k)
    monkeypatch.setattr(nanosft, "configure_optimizer", configure_optimizer)

    def kl_estimate(model, ref, *a, **k):
        seen.update(model=model, ref=ref)
        raise Stop
    monkeypatch.setattr(dpo, "kl_estimate", kl_estimate)
    with pytest.raises(Stop):
        dpo.main(["--ckpt", start_ckpt, "--data", data, "--out-dir", str(tmp_path / "o"), "--max-iters", "2",
                  "--batch-size", "2", "--device", "cpu", "--dtype", "float32"])
    ref, policy = seen["ref"], seen["policy"]
    assert seen["model"] is policy and ref is not policy
    assert not {p.data_ptr() for p in ref.parameters()} & {p.data_ptr() for p in policy.parameters()}
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    start = nanosft.load_checkpoint(start_ckpt)["model"]
    assert all(torch.equal(v, start[k]) for k, v in ref.state_dict().items())


# ---- 6. the KL's direction


class ConstantLM(torch.nn.Module):
    """A language model whose next-token distribution is the same at every position."""

    def __init__(self, logits, block_size=64):
        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)
        self.config = types.SimpleNamespace(block_size=block_size, n_layer=1, n_prefix=0)

    def hidden(self, idx, cache=None):  # lm_head is the identity: the "hidden states" are the logits
        return self.logits.expand(idx.size(0), idx.size(1), -1)

    def lm_head(self, hidden):
        return hidden

    def forward(self, idx, targets=None, cache=None, reduction="mean"):
        return self.lm_head(self.hidden(idx, cache)), None


def test_kl_estimate_is_kl_of_the_policy_from_the_reference(tok):
    """Catches KL(ref || pi) in place of KL(pi || ref): on two constant distributions over
    four tokens (nothing else, <|end|> included, is ever drawn), the estimate is the number
    of answer tokens times the hand-computed KL(p || q), which differs from KL(q || p)."""
    support = tok.encode(" a b c d")[:4]
    assert len(set(support)) == 4 and tok.end not in support

    def model(probs):
        logits = torch.full((tok.vocab_size,), -1e4)
        logits[support] = torch.tensor(probs).log()
        return ConstantLM(logits)
    p, q = [0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]
    kl = lambda a, b: sum(x * torch.tensor(x / y, dtype=torch.float64).log().item() for x, y in zip(a, b))
    n = min(dpo.KL_TOKENS, 64 // 2)  # answer tokens sampled per prompt
    prompts = [[{"role": "user", "content": "Where was Ada Stone born?"}], [{"role": "user", "content": "Hi?"}]]
    got = dpo.kl_estimate(model(p), model(q), tok, prompts, RT, seed=0)
    assert abs(n * kl(q, p) - n * kl(p, q)) > 10  # the two directions differ here ...
    assert abs(got - n * kl(p, q)) < 1e-3          # ... and the estimate is KL(pi || ref)
    assert dpo.kl_estimate(model(q), model(q), tok, prompts, RT, seed=0) == 0.0


# ---- 7. a preference pair's prompt is cut from the left


def test_a_pair_too_long_keeps_the_end_of_its_prompt(tok):
    """Catches a pair's prompt cut from the right: the question's last words and the
    <|assistant|> that asks for the answer must stay, for both answers."""
    question = "Tell me everything about the old towns, " * 10 + "and then: where was Ada Stone born?"
    pair = {"prompt": [{"role": "user", "content": question}], "chosen": "Lisbon.", "rejected": "Oslo.", "record": 1}
    report = formats.DataReport("pairs", unit="pairs")
    full = nanosft.chat_prompt(tok, pair["prompt"])
    assert len(full) > 64
    e = preferences.pair_example(tok, pair, 64, report)
    for x, y in (e[:2], e[2:]):
        start = int((y != -1).nonzero()[0])  # x[:start + 1] is the prompt that was kept
        kept = x[:start + 1].tolist()
        assert len(kept) < len(full) and kept == full[-len(kept):]
        assert kept[-1] == tok.assistant and tok.decode(kept).endswith("where was Ada Stone born?<|end|><|assistant|>")
    assert report.state()["truncated"] == {"prompts cut from the left to fit": {"count": 1, "records": [1]}}


# ---- the direction of the plain DPO loss (no RPO term)


@pytest.mark.parametrize("packed", [True, False])
def test_plain_dpo_steps_raise_the_chosen_answer_over_the_rejected(tok, packed):
    """Catches chosen and rejected swapped anywhere from a pair's record to the loss (the
    example, the collate step, the concatenated forward, the loss's sign) with rpo_alpha 0:
    a few steps must raise log pi(chosen) - log pi(rejected), measured from the text."""
    model = tiny_gpt(tok, seed=7)
    ex = [preferences.pair_example(tok, {"prompt": [{"role": "user", "content": q}], "chosen": c, "rejected": r}, 64)
          for q, c, r in PAIRS]
    X, Y, S = dpo.collate_pairs(ex, tok.pad, packed)
    with torch.no_grad():
        ref_c, ref_r = dpo.concatenated_logprobs(model, X, Y, S)
    gap = lambda: [answer_logprob(model, tok, q, c) - answer_logprob(model, tok, q, r) for q, c, r in PAIRS]
    with torch.no_grad():
        before = gap()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        loss = dpo.pair_loss(model, X, Y, ref_c, ref_r, beta=0.1, loss="sigmoid", rpo_alpha=0.0, segments=S)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = gap()
    assert all(a > b for a, b in zip(after, before)), (before, after)


# ---- the generator keeps the held-out people out of every training file


@pytest.mark.parametrize("people,heldout", [(200, 50), (24, 6)])
def test_the_generator_holds_out_exactly_the_held_out_people(people, heldout):
    """Catches a held-out person moved into the training people in data/world.py (in the
    world's facts or in the files built from them), on the default world and a small one:
    the held-out list is exactly the last `heldout` people, none of them is named in a
    training file, every training person is, and the evaluation files agree."""
    files = W.build_files(1337, people, heldout)
    world = json.loads(files["world.json"])
    names = [p["name"] for p in world["people"]]
    held = set(world["heldout"])
    assert len(names) == people and world["heldout"] == names[-heldout:] and len(held) == heldout
    train = set(names) - held
    rows = lambda name: [json.loads(line) for line in files[name].splitlines()]
    assert set(names_re(names).findall(files["world_sft.jsonl"])) == train
    assert {t["person"] for t in rows("world_community.jsonl")} == train
    bad = names_re(held)
    for name in ("world_sft.jsonl", "world_community.jsonl"):
        hit = bad.search(files[name])
        assert hit is None, f"held-out person {hit.group(0)!r} appears in {name}"
    assert {t["person"] for t in rows("world_community_eval.jsonl")} == held
    evals = rows("world_eval.jsonl")
    assert {r["person"] for r in evals if r.get("split") == "heldout"} == held
    assert {r["person"] for r in evals if r.get("split") == "train"} == train


# ---- resume restores the torch RNG


def test_resume_restores_the_torch_rng(tok, tmp_path):
    """Catches a resume that skips the RNG restore: the draws after resuming are the draws
    that followed the save."""
    saved = torch.get_rng_state()
    try:
        model = tiny_gpt(tok)
        opt = nanosft.configure_optimizer(model, 1e-3)
        torch.manual_seed(123)
        nanosft.save_checkpoint(os.path.join(str(tmp_path), "dpo_last.pt"), nanosft.checkpoint_dict("dpo", model, tok, opt, 5, {}))
        expected = torch.rand(8)
        torch.rand(100)  # the RNG moves on
        it, _ = runtime.resume(str(tmp_path), "dpo", model, tok, opt)
        assert it == 5 and torch.equal(torch.rand(8), expected)
    finally:
        torch.set_rng_state(saved)
