"""Your own data: every format loads, and records that are valid but unusable at this block
size (too long, a tie, a duplicate, no answer) are skipped or truncated, counted per reason,
reported in the stage's JSON -- or, under --strict, are the one clear error. The fixtures in
tests/fixtures/ are real-shaped records, each unusable case marked in the comments of the
expectations below."""
import json
import os

import pytest
import torch

import finetune
import nanosft
from data import formats, preferences
from extras import own_data
from conftest import ROOT

FIX = os.path.join(ROOT, "tests", "fixtures")
BLOCK = 64

# file -> (skipped {reason: [records]}, truncated {reason: [records]}, examples kept)
SFT = {
    "sft_alpaca.json": ({"whose answer is empty": [4], "that repeat an earlier record exactly": [5],
                         "whose answer alone is longer than block_size 64": [7]},
                        {"prompts cut from the left to fit": [6]}, 5),
    "sft_messages.jsonl": ({"with no assistant turn": [3], "that repeat an earlier record exactly": [5]},
                           {"conversations cut to their last turns that fit": [2]}, 3),
    "sft_sharegpt.json": ({"with tool-call turns (this chat format has no role for them)": [2],
                           "with no assistant turn": [5]},
                          {"prompts cut from the left to fit": [4]}, 3),
}
PREF = {
    "pref_pairs.jsonl": ("pairs", {"whose chosen == rejected": [2], "that repeat an earlier pair exactly": [3],
                                   "whose answers are the same within the block": [6]},
                         {"prompts cut from the left to fit": [4], "answers cut to fit the block": [5]}, 4),
    "pref_alpaca.json": ("alpaca", {"that repeat an earlier pair exactly": [4]}, {}, 3),
    "pref_trl.jsonl": ("conversational", {"whose chosen == rejected": [4]}, {}, 3),
    "pref_sharegpt.json": ("sharegpt", {}, {}, 2),
    "pref_hh.jsonl": ("hh", {"whose chosen == rejected": [2]}, {}, 1),
}


def fixture(name):
    return os.path.join(FIX, name)


def load_sft(tok, name, strict=False):
    report = formats.DataReport(fixture(name), strict)
    records = own_data.load_instructions(fixture(name), report)
    return records, finetune.render_all(tok, records, BLOCK, report), report


def load_pref(tok, name, strict=False):
    report = formats.DataReport(fixture(name), strict, unit="pairs")
    fmt, pairs = own_data.read_pairs(fixture(name), report=report)
    kept, examples = preferences.pair_examples(tok, pairs, BLOCK, report)
    return fmt, kept, examples, report


def supervised(tok, x, y):
    return tok.decode([t for t in y.tolist() if t != -1])


@pytest.mark.parametrize("name", SFT)
def test_sft_formats_skip_and_truncate_with_counts(tok, name):
    skipped, truncated, n = SFT[name]
    records, examples, report = load_sft(tok, name)
    state = report.state()
    assert {r: v["records"] for r, v in state["skipped"].items()} == skipped
    assert {r: v["records"] for r, v in state["truncated"].items()} == truncated
    assert len(examples) == n == state["kept"] and state["total"] == n + sum(map(len, skipped.values()))
    assert all(len(x) <= BLOCK for x, _ in examples)
    # the summary names the reason, the counts and the records
    lines = report.lines()
    assert len(lines) == len(skipped) + len(truncated)
    for reason, recs in skipped.items():
        assert any(reason in line and f"skipped {len(recs)} of {state['total']}" in line
                   and f"record {recs[0]}" in line for line in lines)


def test_a_cut_keeps_the_answer_whole_and_the_latest_turns(tok):
    """Truncation cuts from the LEFT, at turn boundaries where it can: the last question and
    the answer survive; an answer is never cut."""
    records, examples, _ = load_sft(tok, "sft_alpaca.json")
    kept = dict(zip([n for n, _ in records if n != 7], examples))  # record 7 was skipped at render
    x, y = kept[6]
    assert supervised(tok, x, y) == " Johannes Gutenberg.<|end|>"
    assert x[0] == tok.endoftext and x[1] == tok.user
    long_q = dict(records)[6][0]["content"]
    assert tok.decode(x.tolist()).endswith(long_q[-60:] + "<|end|><|assistant|> Johannes Gutenberg.")

    records, examples, _ = load_sft(tok, "sft_messages.jsonl")
    x, y = dict(zip([n for n, _ in records], examples))[2]
    text = tok.decode(x.tolist())
    assert "How many days for Lisbon?" in text and "visit Portugal" not in text  # oldest turns dropped
    assert "<|system|> You are a travel agent." in text                             # the system message fits
    assert supervised(tok, x, y) == " Three days.<|end|>"
    # a trailing user turn with nothing after it is dropped (it has no target)
    x, y = dict(zip([n for n, _ in records], examples))[4]
    assert not tok.decode(x.tolist()).endswith("Bye")


@pytest.mark.parametrize("name", PREF)
def test_preference_formats_skip_and_truncate_with_counts(tok, name):
    fmt, skipped, truncated, n = PREF[name]
    got_fmt, kept, examples, report = load_pref(tok, name)
    state = report.state()
    assert got_fmt == fmt
    assert {r: v["records"] for r, v in state["skipped"].items()} == skipped
    assert {r: v["records"] for r, v in state["truncated"].items()} == truncated
    assert len(examples) == len(kept) == n
    assert all(len(x) <= BLOCK for e in examples for x in e[::2])


def test_a_cut_pair_keeps_one_prompt_for_both_answers(tok):
    _, kept, examples, _ = load_pref(tok, "pref_pairs.jsonl")
    by_record = {p["record"]: e for p, e in zip(kept, examples)}
    xc, yc, xr, yr = by_record[4]  # long prompt: cut from the left, the same way for both answers
    start_c, start_r = int((yc != -1).nonzero()[0]), int((yr != -1).nonzero()[0])
    assert start_c == start_r and torch.equal(xc[:start_c + 1], xr[:start_r + 1])
    assert supervised(tok, xc, yc) == " Gutenberg.<|end|>" and supervised(tok, xr, yr) == " Nobody knows who did it first, to be honest.<|end|>"
    xc, yc, xr, yr = by_record[5]  # long answers: cut to the block, still different
    assert len(xc) == len(xr) == BLOCK and supervised(tok, xc, yc) != supervised(tok, xr, yr)


def test_formats_carry_their_prompt(tok):
    _, kept, _, _ = load_pref(tok, "pref_trl.jsonl")
    assert kept[1]["prompt"] == [{"role": "user", "content": "What is 3 + 3?"}]  # implicit prompt
    assert [m["role"] for m in kept[2]["prompt"]] == ["system", "user", "assistant", "user"]
    _, kept, _, _ = load_pref(tok, "pref_sharegpt.json")
    assert kept[1]["prompt"][0] == {"role": "system", "content": "Be brief."} and kept[1]["chosen"] == "Jupiter."
    _, kept, _, _ = load_pref(tok, "pref_alpaca.json")
    assert kept[2]["prompt"][0] == {"role": "system", "content": "You are kind."}


@pytest.mark.parametrize("name", [n for n in SFT] + [n for n in PREF if PREF[n][1] or PREF[n][2]])
def test_strict_makes_each_unusable_record_the_one_clear_error(tok, name):
    with pytest.raises(nanosft.UserError) as e:
        load_sft(tok, name, strict=True) if name in SFT else load_pref(tok, name, strict=True)
    msg = str(e.value)
    unusable = {r for book in (SFT.get(name) or PREF[name][1:])[:2] for recs in book.values() for r in recs}
    assert any(msg.startswith(f"{fixture(name)}: record {r}: ") for r in unusable) and "--strict" in msg


def test_more_than_half_unusable_stops_with_the_reason(tok, tmp_path):
    long = json.load(open(fixture("sft_alpaca.json")))[6]  # an answer too long for the block
    rows = [dict(long, instruction=f"{long['instruction']} ({i})") for i in range(3)] + \
        [{"instruction": "Say hi.", "input": "", "output": "Hi."}]
    p = tmp_path / "long.json"
    p.write_text(json.dumps(rows))
    report = formats.DataReport(str(p))
    with pytest.raises(nanosft.UserError, match=r"3 of 4 records would be skipped .*answer alone is longer than "
                                           r"block_size 64.*pre-train with --block-size (\d+)") as e:
        finetune.render_all(tok, own_data.load_instructions(str(p), report), BLOCK, report)
    # the advice: the power of two that the long records' answer, a short question and the frame fit in
    need = len(nanosft.encode_content(tok, long["output"])) + finetune.MIN_PROMPT + 5
    assert f"--block-size {1 << (need - 1).bit_length()} (90% of the records fit in it)" in str(e.value)
    # half is still fine: two good records, two too long
    rows = rows[1:] + [{"instruction": "Say bye.", "input": "", "output": "Bye."}]
    p.write_text(json.dumps(rows))
    report = formats.DataReport(str(p))
    assert len(finetune.render_all(tok, own_data.load_instructions(str(p), report), BLOCK, report)) == 2


# The counts reach sft.json and dpo.json: test_sft.test_cli_accumulation_and_resume_match and
# test_dpo.test_resume_5_plus_5_equals_10_straight (their data files hold a copy and a tie).


def test_list_tasks_are_an_option_that_changes_no_other_record():
    """world.py --list-tasks adds the copy / reverse / count tasks; without it (the default
    data) every other record is the same, in the same order."""
    from data import world
    plain, tasks = world.build_files(1337), world.build_files(1337, list_tasks=True)
    is_task = lambda line: line.startswith(('{"prompt": "Repeat', '{"prompt": "Reverse', '{"prompt": "How many'))
    with_tasks = tasks["world_sft.jsonl"].splitlines()
    assert sum(map(is_task, with_tasks)) == 300 and not any(map(is_task, plain["world_sft.jsonl"].splitlines()))
    assert [line for line in with_tasks if not is_task(line)] == plain["world_sft.jsonl"].splitlines()
    assert [r for r in tasks["world_eval.jsonl"].splitlines() if '"split": "tasks"' not in r] == \
        plain["world_eval.jsonl"].splitlines()
    assert {k: v for k, v in tasks.items() if k not in ("world_sft.jsonl", "world_eval.jsonl")} == \
        {k: v for k, v in plain.items() if k not in ("world_sft.jsonl", "world_eval.jsonl")}
