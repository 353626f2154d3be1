"""Your own data's held-out evaluation (extras/own_eval.py): the split (no prompt on both
sides, the same in every process, the "split" field honoured), the metrics on cases worked
out by hand, and the evaluators end to end on a tiny model."""
import json
import math
import subprocess
import sys

import pytest
import torch

import nanosft
from conftest import ROOT, tiny_gpt
from extras import own_data, own_eval

CPU = nanosft.Process(torch.device("cpu"), "float32")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def thousand_records(tmp_path):
    """1,000 records asking 800 distinct questions: 200 ask again, in other case and spacing."""
    records = [{"prompt": f"What is fact number {i}?", "response": f"Fact {i} is {i % 7}."}
               for i in range(800)]
    records += [{"prompt": f"  what IS fact   number {i}? ", "response": f"It is {i % 7}."}
                for i in range(0, 800, 4)]
    return write_jsonl(tmp_path / "facts.jsonl", records)


# ----------------------------------------------------------------------------------------
# the split


def test_hash_split_holds_out_about_a_tenth_and_no_prompt_on_both_sides(tmp_path):
    path = thousand_records(tmp_path)
    records = own_data.load_instructions(path)
    train, held, counts = own_eval.split_instructions(path, records)
    keys = lambda rs: {own_eval.prompt_key(c[:-1]) for _, c in rs}  # noqa: E731
    assert len(train) + len(held) == 1000 and not keys(train) & keys(held)
    assert counts["records_train"] == len(train) and counts["records_heldout"] == len(held)
    assert counts["prompts_heldout"] == len(keys(held)) and counts["heldout_prompts_also_trained"] == 0
    assert 0.07 <= counts["prompts_heldout"] / 800 <= 0.13  # 10% of 800 prompts, +- 3 sd
    # the same question in other case and spacing is the same prompt: held out together
    assert sum(len(g["references"]) == 2 for g in own_eval.instruction_groups(held)) > 0
    assert "10% of the prompts by hash" in own_eval.split_line(path, counts)


def test_hash_split_does_not_depend_on_the_order_of_the_file(tmp_path):
    path = thousand_records(tmp_path)
    lines = open(path, encoding="utf-8").read().splitlines()
    reverse = str(tmp_path / "reverse.jsonl")
    open(reverse, "w", encoding="utf-8").write("\n".join(reversed(lines)) + "\n")
    held = [own_eval.split_instructions(p, own_data.load_instructions(p))[1] for p in (path, reverse)]
    assert [{own_eval.prompt_key(c[:-1]) for _, c in h} for h in held][0] == \
        {own_eval.prompt_key(c[:-1]) for _, c in held[1]}


SPLIT_SCRIPT = """
import sys
from extras import own_data, own_eval
path = sys.argv[1]
train, held, _ = own_eval.split_instructions(path, own_data.load_instructions(path))
print(",".join(str(n) for n, _ in held))
"""


def test_hash_split_is_the_same_in_every_process(tmp_path):
    """Python's hash() of a str differs per process (PYTHONHASHSEED); the split must not."""
    path = thousand_records(tmp_path)
    seen = set()
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", SPLIT_SCRIPT, path], cwd=ROOT, text=True,
                             capture_output=True, check=True, env={"PYTHONHASHSEED": seed, "PATH": ""})
        seen.add(out.stdout.strip())
    _, held, _ = own_eval.split_instructions(path, own_data.load_instructions(path))
    assert seen == {",".join(str(n) for n, _ in held)}


def test_the_split_field_decides_when_present(tmp_path):
    records = [{"prompt": "a?", "response": "A.", "split": "train"},
               {"prompt": "b?", "response": "B.", "split": "heldout"},
               {"prompt": "c?", "response": "C.", "split": "test"},
               {"prompt": "d?", "response": "D.", "split": "validation"},
               {"prompt": "e?", "response": "E."},                      # none: trained on
               {"prompt": "b?", "response": "Bee.", "split": "train"}]  # a held-out prompt, trained
    path = write_jsonl(tmp_path / "s.jsonl", records)
    loaded = own_eval.instruction_splits(path)
    assert [s for _, _, s in loaded] == ["train", "heldout", "heldout", "heldout", None, "train"]
    train, held, counts = own_eval.split_instructions(path, own_data.load_instructions(path))
    assert [n for n, _ in held] == [2, 3, 4] and [n for n, _ in train] == [1, 5, 6]
    assert counts["rule"] == "the records' split field" and counts["records_without_split"] == 1
    assert counts["heldout_prompts_also_trained"] == 1  # "b?": the file says so, the log warns
    assert "warning" in own_eval.split_line(path, counts)


def test_a_bad_split_value_or_nothing_to_train_on_is_one_clear_error(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a?", "response": "A.", "split": "Train!"}])
    with pytest.raises(nanosft.UserError, match=r"bad.jsonl:1: field 'split' must be"):
        own_eval.split_instructions(bad, own_data.load_instructions(bad))
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "a?", "response": "A.", "split": "test"}])
    with pytest.raises(nanosft.UserError, match="every record is held out"):
        own_eval.split_instructions(held, own_data.load_instructions(held))


# ----------------------------------------------------------------------------------------
# the metrics, by hand


def test_normalize_and_exact_match_squad_style():
    # lower -> punctuation deleted -> "a", "an", "the" dropped -> whitespace collapsed
    assert own_eval.normalize_answer("The  Light, of the World!") == "light of world"
    assert own_eval.exact_match("The light!", "light") == 1.0
    assert own_eval.exact_match("An apple.", "apple") == 1.0
    assert own_eval.exact_match("a light", "the lights") == 0.0   # plural: different word
    assert own_eval.exact_match("theory", "ory") == 0.0           # "the" only as a whole word
    assert own_eval.exact_match("", "") == 1.0


def test_token_f1_partial_overlap_and_multiplicity():
    # answer {there, was, light}, reference {and, there, was, light}: 3 shared,
    # precision 3/3, recall 3/4, F1 = 2 * 1 * 3/4 / (1 + 3/4) = 6/7 (shared / union would be 3/4)
    assert own_eval.token_f1("There was light.", "and there was light") == pytest.approx(6 / 7)
    # "light light light" vs "light of the world" -> [light, of, world]: light shared ONCE,
    # precision 1/3, recall 1/3, F1 1/3 (counting every repeat as shared would give 1.0)
    assert own_eval.token_f1("light light light", "light of the world") == pytest.approx(1 / 3)
    # order is ignored: a permutation is a perfect F1
    assert own_eval.token_f1("light there was", "there was light") == 1.0
    assert own_eval.token_f1("darkness", "light") == 0.0
    assert own_eval.token_f1("the", "light") == 0.0  # nothing left of the answer: 0, not 1


def test_lcs_and_rouge_l_where_order_matters():
    assert own_eval.lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS's example: BCBA
    assert own_eval.lcs_length("abc", "abc") == 3 and own_eval.lcs_length("", "abc") == 0
    assert own_eval.lcs_length("abc", "cba") == 1
    # the same bag of words, another order: F1 1.0, LCS "there was" = 2, P = R = 2/3, F = 2/3
    assert own_eval.rouge_l("light there was", "there was light") == pytest.approx(2 / 3)
    # 7 answer words, 10 reference words, LCS "god said let there be light" = 6:
    # P = 6/7, R = 6/10, F = 2PR / (P + R) = (36/35) / (51/35) = 12/17
    answer, reference = "And God said, Let there be light", "God said let there be light and there was light"
    assert own_eval.rouge_l(answer, reference) == pytest.approx(12 / 17)
    assert own_eval.rouge_l("", "light") == 0.0 and own_eval.rouge_l("Light.", "light") == 1.0


def test_repetition_rate_counts_repeated_3grams_within_an_answer():
    # 6 words, 4 trigrams (the cat the)(cat the cat)(the cat the)(cat the cat): 2 distinct -> 1 - 2/4
    assert own_eval.repetition_rate("The cat, the cat, the cat.") == 0.5
    assert own_eval.repetition_rate("one two three four") == 0.0  # 2 trigrams, both new
    assert own_eval.repetition_rate("too short") == 0.0           # no trigram at all
    # 10 x "go": 8 trigrams, all (go go go): 1 - 1/8
    assert own_eval.repetition_rate(" ".join(["go"] * 10)) == pytest.approx(7 / 8)


def test_answer_stats_best_reference_stop_rate_and_length_ratio():
    refs = [["p q r s"], ["x y z w", "x y"]]  # reference words: 4, and (4 + 2) / 2 = 3
    rows = [own_eval.score_answer("p q r", refs[0], stopped=True),
            own_eval.score_answer("x y", refs[1], stopped=False)]
    assert rows[1]["exact_match"] == 1.0  # the best of the two references, not the first
    assert rows[0]["stopped"] is True and rows[1]["stopped"] is False
    stats = own_eval.answer_stats(rows, refs)
    assert stats["stop_rate"] == 0.5 and stats["exact_match"] == 0.5
    assert stats["length_ratio"] == pytest.approx((3 + 2) / (4 + 3))
    # F1 of "p q r" vs "p q r s" (6/7, as above; with "a b c" the article "a" would drop) and 1.0
    assert stats["f1"] == pytest.approx((6 / 7 + 1.0) / 2)


# ----------------------------------------------------------------------------------------
# the evaluators, end to end on a tiny model


def colour_records(n=120):
    colours = ["red", "blue", "green", "black", "white", "brown"]
    return [{"prompt": f"What colour is item {i}?", "response": f"Item {i} is {colours[i % 6]}."}
            for i in range(n)]


def test_answer_loss_covers_the_answer_and_its_end_only(tok):
    model = tiny_gpt(tok, seed=4)
    messages = [{"role": "user", "content": "What colour is item 3?"}]
    x, y = own_eval.answer_example(tok, messages, "Item 3 is black.", 64)
    assert int((y != -1).sum()) == len(nanosft.encode_content(tok, "Item 3 is black.")) + 1
    [(logp, n)] = own_eval.answer_logprobs(model, [(x, y)], tok.pad, CPU)
    _, loss_sum = model(x[None], y[None], reduction="sum")
    assert n == int((y != -1).sum()) and logp == pytest.approx(-loss_sum.item(), rel=1e-5)
    assert own_eval.answer_example(tok, messages, "word " * 80, 64) is None  # the answer alone is too long


def test_sft_evaluator_end_to_end(tok, tmp_path, one_thread):
    path = write_jsonl(tmp_path / "colours.jsonl", colour_records())
    records = own_data.load_instructions(path)
    model = tiny_gpt(tok, seed=5, block_size=64)
    logged = []
    process = nanosft.Process(torch.device("cpu"), "float32")
    process.log = lambda *a, **k: logged.append(" ".join(map(str, a)))
    own = own_eval.SFTHeldout(path, records, tok, model, process, max_prompts=5)
    held_numbers = {n for n, _ in records} - {n for n, _ in own.train}
    assert len(held_numbers) == own.counts["records_heldout"] > 0
    start_loss = own.history[0]["answer_loss"]
    # a few steps on the training records only
    examples = [nanosft.example_tensors(*nanosft.render_chat(tok, c)) for _, c in own.train]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for it in range(40):
        X, Y = nanosft.collate([examples[i] for i in torch.randint(len(examples), (16,)).tolist()], tok.pad)
        model(X, Y)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert own.evaluate(model, 40) < start_loss  # the answers' form is learnt: held-out loss falls
    result = own.finish(model, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "sft_eval.jsonl", encoding="utf-8")]
    assert len(rows) == result["prompts_answered"] == min(5, own.counts["prompts_heldout"])
    assert {r["prompt"] for r in rows} <= {records[n - 1][1][0]["content"] for n in held_numbers}
    by_number = dict(records)
    for r in rows:
        assert r["reference"] == by_number[r["records"][0]][-1]["content"]
        for side in ("start", "final"):
            assert {"exact_match", "f1", "rouge_l", "repetition", "stopped", "words",
                    "reference_logprob"} <= set(r[side])
            assert 0 <= r[side]["f1"] <= 1 and 0 <= r[side]["rouge_l"] <= 1
            assert isinstance(r[f"{side}_answer"], str)
    # the start answers are the untouched model's greedy answers
    assert result["start"]["answer_loss"] == pytest.approx(start_loss)
    assert result["final"]["answer_loss"] < result["start"]["answer_loss"]
    assert result["answer_loss_path"][0]["step"] == 0 and result["answer_loss_path"][-1]["step"] == 40
    assert 0 <= result["reference_more_likely"] <= 1
    assert any("exact match" in line for line in logged) and any("held out by" in line for line in logged)


def test_dpo_answers_of_an_unchanged_policy_are_the_references(tok, tmp_path, one_thread):
    """The policy equal to the reference: the same answers start and final, and no chosen
    answer more likely (a tie is not a rise)."""
    model = tiny_gpt(tok, seed=6, block_size=64)
    pairs = [{"prompt": [{"role": "user", "content": f"Name colour {i}."}], "chosen": "Blue.",
              "rejected": "I won't.", "record": i + 1} for i in range(6)]
    pairs.append({**pairs[0], "chosen": "Azure.", "record": 7})  # a second chosen answer, same prompt
    result = own_eval.dpo_answers(model, model, tok, pairs, CPU, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "dpo_eval.jsonl", encoding="utf-8")]
    assert len(rows) == 6 and rows[0]["references"] == ["Blue.", "Azure."] and rows[0]["rejected"] == ["I won't."]
    assert all(r["start_answer"] == r["final_answer"] for r in rows)
    assert result["reference_more_likely"] == 0.0 and result["start"] == result["final"]
    assert math.isfinite(result["start"]["answer_loss"])
    assert own_eval.dpo_answers(model, model, tok, [], CPU, str(tmp_path)) is None


def test_nothing_held_out_measures_nothing(tok, tmp_path):
    """A file too small for its tenth to catch a prompt: trained on whole, nothing measured."""
    path = write_jsonl(tmp_path / "few.jsonl", [{"prompt": "Say one.", "response": "One."}])
    records = own_data.load_instructions(path)
    assert own_eval.hash_share("say one.") >= 0.1  # its prompt key: not in the held-out tenth
    own = own_eval.SFTHeldout(path, records, tok, tiny_gpt(tok, seed=7), CPU)
    assert own.counts["records_heldout"] == 0 and own.train == records and own.evaluate(None, 1) is None
    assert own.finish(None, str(tmp_path)) == {"split": own.counts}
    assert not (tmp_path / "sft_eval.jsonl").exists()


def wired(script):
    return "own_eval" in open(f"{ROOT}/{script}", encoding="utf-8").read()


@pytest.mark.skipif(not (wired("finetune.py") and wired("dpo.py")),
                    reason="finetune.py and dpo.py do not call extras/own_eval.py yet")
def test_the_stages_measure_your_own_data(tok, tmp_path, one_thread):
    """finetune.py and dpo.py with --data: the held-out records are not trained on, and each
    stage writes its rows and its "own_eval" report."""
    import dpo
    import finetune

    checkpoint = str(tmp_path / "pretrain.pt")
    nanosft.save_checkpoint(checkpoint, nanosft.checkpoint_dict("pretrain", tiny_gpt(tok, seed=8), tok))
    data = write_jsonl(tmp_path / "colours.jsonl", colour_records(60))
    flags = ["--out-dir", str(tmp_path), "--max-iters", "4", "--eval-interval", "2", "--batch-size", "4",
             "--device", "cpu", "--dtype", "float32"]
    finetune.main(["--ckpt", checkpoint, "--data", data, *flags])
    report = json.load(open(tmp_path / "sft.json"))
    own = report["own_eval"]
    assert report["data"]["total"] == 60 and own["split"]["records_train"] + own["split"]["records_heldout"] == 60
    assert [p["step"] for p in own["answer_loss_path"]] == [0, 2, 4]
    rows = [json.loads(line) for line in open(tmp_path / "sft_eval.jsonl", encoding="utf-8")]
    assert len(rows) == own["prompts_answered"] == own["split"]["prompts_heldout"]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": r["prompt"], "chosen": r["response"],
                                                     "rejected": "I do not know."} for r in colour_records(60)])
    dpo.main(["--ckpt", str(tmp_path / "sft.pt"), "--data", pairs, *flags])
    result = json.load(open(tmp_path / "dpo.json"))["own_eval"]
    rows = [json.loads(line) for line in open(tmp_path / "dpo_eval.jsonl", encoding="utf-8")]
    assert len(rows) == result["prompts_answered"] > 0 and rows[0]["rejected"] == ["I do not know."]
