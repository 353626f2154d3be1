"""The cross-domain split of `experiments.py scale`: SFT on some attributes' questions
(--sft-attributes), evaluation also on the others'. The split is clean only if no SFT record
asks about an evaluation-only attribute and the in-/cross-domain rows partition the test half."""
import json
import re

import pytest

import nanosft
import finetune
import pretrain
from data import world as W
from data import world_eval

SFT_ATTRS = "city,job,food"


def asked_attribute(question):
    """The attribute a question asks about, read from its text against the world's question
    templates (not from any label the code under test attaches); None for a list task."""
    for attr, templates in W.QUESTIONS.items():
        for t in templates:
            if re.fullmatch(re.escape(t).replace(re.escape("{n}"), ".+"), question):
                return attr
    return None


def questions(convs):
    return [m["content"] for c in convs for m in c if m["role"] == "user"]


@pytest.mark.parametrize("labels", ["top-voted", "gold", "random-community"])
def test_sft_attributes_keep_the_evaluation_only_attributes_out_of_sft(labels):
    """Catches a filter that is missing (unfiltered data asks about pet and hobby: the
    detector below sees them), leaky (one labels path unfiltered) or too eager (an in-domain
    question dropped)."""
    attrs = world_eval.sft_attributes(SFT_ATTRS)
    every = questions(world_eval.world_conversations(labels, 1337))
    kept = questions(world_eval.world_conversations(labels, 1337, world_eval.HERE, attrs))
    cross = set(W.ATTRS) - set(attrs)
    assert {asked_attribute(q) for q in every} == set(W.ATTRS)   # the detector has teeth (no list tasks by default)
    assert not [q for q in kept if asked_attribute(q) in cross]
    assert kept == [q for q in every if asked_attribute(q) not in cross]  # nothing else dropped, same order


def test_in_and_cross_domain_rows_partition_the_test_half_by_attribute():
    attrs = world_eval.sft_attributes(SFT_ATTRS)
    dev, test = world_eval.heldout_halves()
    inside, cross = world_eval.by_domain(test, attrs)
    assert sorted(map(json.dumps, inside + cross)) == sorted(map(json.dumps, test))
    assert {r["attribute"] for r in inside} == set(attrs)
    assert {r["attribute"] for r in cross} == set(W.ATTRS) - set(attrs)
    assert all(asked_attribute(r["prompt"]) == r["attribute"] for r in test)  # the rows' labels are right
    # graded per side: right answers in-domain, a wrong value cross-domain
    facts = world_eval.load_world()[1]
    value = {p["name"]: p for p in facts["people"]}
    answers = [W.gold_sentence(r["person"], r["attribute"], value[r["person"]][r["attribute"]])
               if r["attribute"] in attrs else "I do not know." for r in test]
    assert world_eval.domain_accuracy(world_eval.load_world(), test, answers, attrs) == (1.0, 0.0)
    assert world_eval.domain_accuracy(world_eval.load_world(), test, answers, W.ATTRS) == (len(inside) / len(test), None)


def test_bad_world_flags_are_one_clear_error(tmp_path):
    assert finetune.parse_args([]).sft_attributes == W.ATTRS
    assert finetune.parse_args(["--sft-attributes", "food,city"]).sft_attributes == ["city", "food"]
    for argv, needle in ((["--sft-attributes", "city,colour"], "unknown attribute colour"),
                         (["--sft-attributes", ","], "unknown attribute"),
                         (["--data", "x.jsonl", "--sft-attributes", "city"], "does not apply to --data"),
                         (["--world", str(tmp_path)], "no world.json")):
        with pytest.raises(nanosft.UserError, match=needle):
            finetune.parse_args(argv)
    with pytest.raises(nanosft.UserError, match="not both"):
        pretrain.parse_args(["--world", str(tmp_path), "--data", "x.txt"])
    assert pretrain.parse_args([]).world == world_eval.HERE


def test_a_larger_world_keeps_its_shape():
    """--people beyond the distinct first names: distinct full names, the held-out people in
    no SFT record, and the evaluation files of the same shape."""
    files = W.build_files(1337, n_people=260, n_heldout=40)
    facts = json.loads(files["world.json"])
    names = [p["name"] for p in facts["people"]]
    assert len(set(names)) == len(names) == 260 and len(facts["heldout"]) == 40
    sft = files["world_sft.jsonl"]
    assert not [n for n in facts["heldout"] if re.search(rf"\b{n}\b", sft)]
    evals = [json.loads(line) for line in files["world_eval.jsonl"].splitlines()]
    assert sum(r["split"] == "heldout" for r in evals) == 40 * 10
    assert len(world_eval.probe_people(facts)) == world_eval.PROBE_PEOPLE and set(facts["heldout"]) <= world_eval.probe_people(facts)


def test_scale_table_and_figure_report_the_gain_over_scratch_per_domain(tmp_path):
    from extras import experiments
    sj = lambda i, c: {"heldout_accuracy_in_domain": i, "heldout_accuracy_cross_domain": c}
    res = {"small": {"pretrain": {"params": 1000, "seconds": 10.0, "knowledge_probe_accuracy": 0.5},
                     "pre": [sj(0.9, 0.3), sj(0.8, 0.1)], "scratch": [sj(0.1, 0.0), sj(0.2, 0.1)]},
           "big": {"pretrain": {"params": 9000, "seconds": 90.0, "knowledge_probe_accuracy": 0.9},
                   "pre": [sj(1.0, 0.6), sj(1.0, 0.8)], "scratch": [sj(0.0, 0.0), sj(0.0, 0.0)]}}
    assert [g[2] for g in experiments.scale_gains(res["small"], "heldout_accuracy_cross_domain")] == [0.3, 0.0]
    md = experiments.scale_table(res, {"small": ["--n-layer", "1"], "big": ["--n-layer", "6"]}, [1337, 2], "data")
    big = next(line for line in md.splitlines() if line.startswith("| big"))
    assert "1.000 [1.000–1.000]" in big and "0.700 [0.600–0.800]" in big   # in-domain gain, cross-domain gain
    png = str(tmp_path / "scale.png")
    experiments.plot_scale(png, res)
    assert open(png, "rb").read(4) == b"\x89PNG"
