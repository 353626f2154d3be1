"""The cross-domain split of `experiments.py scale`: SFT on some attributes' questions
(--sft-attributes), evaluation also on the others'. The split is clean only if no SFT record
asks about an evaluation-only attribute and the in-/cross-domain rows partition the test half."""
import json
import re

import pytest
import torch

import nanosft
import finetune
from extras import cross_domain
import pretrain
from conftest import tiny_gpt
from data import world as W
from data import world_eval, world_qa

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
    attrs = cross_domain.attributes(SFT_ATTRS)
    every = questions(finetune.world_conversations(labels, 1337))
    kept = questions(finetune.world_conversations(labels, 1337, world_eval.HERE, attrs))
    cross = set(cross_domain.ATTRS) - set(attrs)
    assert {asked_attribute(q) for q in every} == set(cross_domain.ATTRS)   # the detector has teeth (no list tasks by default)
    assert not [q for q in kept if asked_attribute(q) in cross]
    assert kept == [q for q in every if asked_attribute(q) not in cross]  # nothing else dropped, same order


def test_in_and_cross_domain_rows_partition_the_test_half_by_attribute():
    attrs = cross_domain.attributes(SFT_ATTRS)
    dev, test = world_qa.heldout_halves()
    inside, cross = cross_domain.by_domain(test, attrs)
    assert sorted(map(json.dumps, inside + cross)) == sorted(map(json.dumps, test))
    assert {r["attribute"] for r in inside} == set(attrs)
    assert {r["attribute"] for r in cross} == set(cross_domain.ATTRS) - set(attrs)
    assert all(asked_attribute(r["prompt"]) == r["attribute"] for r in test)  # the rows' labels are right
    # graded per side: right answers in-domain, a wrong value cross-domain
    facts = world_eval.load_world()
    value = {p["name"]: p for p in facts["people"]}
    answers = [W.gold_sentence(r["person"], r["attribute"], value[r["person"]][r["attribute"]])
               if r["attribute"] in attrs else "I do not know." for r in test]
    assert cross_domain.domain_accuracy(world_eval.load_world(), test, answers, attrs) == (1.0, 0.0)
    assert cross_domain.domain_accuracy(world_eval.load_world(), test, answers, cross_domain.ATTRS) == (len(inside) / len(test), None)


def test_bad_world_flags_are_one_clear_error(tmp_path):
    assert finetune.parse_args([]).sft_attributes is None  # every attribute
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
    """The scale experiment's world (--people beyond the distinct first names, a quarter held
    out): distinct full names, no held-out person in any SFT or DPO record, and the evaluation
    files of the same shape."""
    from extras import experiments
    people = experiments.SCALE_PEOPLE
    files = W.build_files(1337, n_people=people, n_heldout=people // 4)
    facts = json.loads(files["world.json"])
    names = [p["name"] for p in facts["people"]]
    assert len(set(names)) == len(names) == people and len(facts["heldout"]) == people // 4
    heldout = set(facts["heldout"])
    mentions = lambda text: {n for n in names if n in text}  # every full name a record's text contains
    sft = [json.loads(line) for line in files["world_sft.jsonl"].splitlines()]
    community = [json.loads(line) for line in files["world_community.jsonl"].splitlines()]
    assert not [r for r in sft if mentions(r["prompt"] + r["response"]) & heldout]
    assert not [t for t in community if (mentions(json.dumps(t)) | {t["person"]}) & heldout]
    assert {t["person"] for t in community} == set(names) - heldout   # every training person, only them
    evals = [json.loads(line) for line in files["world_eval.jsonl"].splitlines()]
    assert {r["person"] for r in evals if r["split"] == "heldout"} == heldout
    assert sum(r["split"] == "heldout" for r in evals) == len(heldout) * 10
    probed = world_eval.probe_people(facts)
    assert len(probed) == max(world_eval.PROBE_PEOPLE, len(heldout)) and heldout <= probed


def test_stored_bits_on_a_hand_made_case():
    """Two attributes: 4 values (2 bits each), 2 values (1 bit each), 10 people. Accuracy 1 on
    the first is 10 x 2 bits; accuracy 0.75 on the second is half known (0.75 = k + (1 - k)/2),
    5 x 1 bit; at or below chance nothing is stored."""
    from extras import experiments
    values = {"a": ["w", "x", "y", "z"], "b": ["p", "q"]}
    assert experiments.stored_bits({"a": 1.0, "b": 0.75}, values, 10) == pytest.approx(25.0)
    assert experiments.stored_bits({"a": 0.25, "b": 0.4}, values, 10) == 0.0
    assert experiments.stored_bits({"a": 0.625}, values, 8) == pytest.approx(8 * 0.5 * 2)


def result(params, probes, pre, scratch, cross=0.0):
    """A size's results as exp_scale gathers them: one pretrain.json and two sft.json per seed."""
    sj = lambda i, c: {"heldout_accuracy_in_domain": i, "heldout_accuracy_cross_domain": c}
    return {"pretrain": [{"params": params, "seconds": 10.0, "knowledge_probe_accuracy": p, "bits": 1000 * p}
                         for p in probes],
            "pre": [sj(a, cross) for a in pre], "scratch": [sj(a, 0.0) for a in scratch]}


def test_scale_table_claims_and_figure_arithmetic(tmp_path):
    from extras import experiments
    res = {"small": result(1000, [0.1, 0.3], pre=[0.2, 0.3], scratch=[0.1, 0.0]),
           "mid": result(4000, [0.5, 0.5], pre=[0.5, 0.4], scratch=[0.0, 0.1], cross=0.1),
           "big": result(9000, [0.9, 0.7], pre=[1.0, 0.8], scratch=[0.0, 0.1], cross=0.2)}
    assert [round(g[2], 3) for g in experiments.scale_gains(res["mid"], "heldout_accuracy_in_domain")] == [0.5, 0.3]
    md = experiments.scale_table(res, {n: ["--n-layer", "1", "--n-embd", "256"] for n in res}, [1, 2], 1000, ["--max-iters", "9"])
    big = next(line for line in md.splitlines() if line.startswith("| big"))
    assert "| 0.800 [0.700–0.900] | 800 | 0.0889 |" in big        # probe; bits = mean 800; 800 / 9000 params
    assert "0.850 [0.700–1.000] | 0.200 [0.200–0.200]" in big      # in-domain gain; cross-domain gain
    claims = {c["claim"].split(":")[0].split(" (")[0]: c for c in experiments.scale_claims(res, chance=0.05)}
    rise = claims["gain rises size to size"]     # gains per seed: small 0.1, 0.3; mid 0.5, 0.3; big 1.0, 0.7
    assert rise["values"] == pytest.approx([0.4, 0.0]) and not rise["pass"]
    top = claims["largest gain minus second-largest's"]
    assert top["values"] == pytest.approx([0.5, 0.4]) and top["pass"]
    scratch = claims["scratch minus chance, worst size"]
    assert scratch["values"] == pytest.approx([0.05, 0.05]) and scratch["pass"]
    res["small"]["scratch"][1]["heldout_accuracy_in_domain"] = 0.11   # 6 points over chance
    assert not {c["claim"]: c for c in experiments.scale_claims(res, 0.05)}[scratch["claim"]]["pass"]
    png = str(tmp_path / "scale.png")
    experiments.plot_scale(png, res)
    assert open(png, "rb").read(4) == b"\x89PNG"


def test_a_wider_model_takes_smaller_steps():
    from extras import experiments
    flags = lambda width: ["--n-layer", "2", "--n-embd", str(width)]
    assert [experiments.scale_lr(6e-3, flags(w)) for w in (64, 128, 256, 640)] == ["0.006", "0.006", "0.003", "0.0012"]
    assert experiments.scale_lr(2e-3, flags(640)) == "0.0004"
    sft = [experiments.scale_lr(2e-3, flags(w), experiments.SCALE_SFT_LEAST) for w in (64, 128, 256, 640)]
    assert sft == ["0.002", "0.002", "0.001", "0.0008"]  # SFT's floor lifts only the widest


def test_the_cross_domain_world_keeps_both_domains_out_of_training():
    """experiments.SCALE_WORLD: another hospital's people are in the corpus only as terse
    records and never in an SFT record, a community thread or a held-out thread; the other
    phrasings ask only held-out people and appear in no training file; everything the default
    flags write stays the same file for file (the corpus, by construction, gains the records)."""
    from extras import experiments
    people = experiments.SCALE_PEOPLE
    plain = W.build_files(1337, n_people=people, n_heldout=people // 4)
    files = W.build_files(1337, n_people=people, n_heldout=people // 4, other_people=176, other_phrasings=True)
    facts = json.loads(files["world.json"])
    other = [p["name"] for p in facts["other_people"]]
    assert len(set(other)) == 176 and not set(other) & {p["name"] for p in facts["people"]}
    assert not {n.split()[0] for n in other} & {p["name"].split()[0] for p in facts["people"]}  # its own names
    for name in ("world_sft.jsonl", "world_community.jsonl", "world_community_eval.jsonl"):
        assert files[name] == plain[name]
        assert not [n for n in other if n in files[name]], name
        asked = [re.escape(q).replace(re.escape("{n}"), "[^\"]+") for q in W.OTHER_QUESTIONS.values()]
        assert not [q for q in asked if re.search(q, files[name])], name
    assert {k: v for k, v in facts.items() if k != "other_people"} == json.loads(plain["world.json"])
    evals = [json.loads(line) for line in files["world_eval.jsonl"].splitlines()]
    assert evals[: len(plain["world_eval.jsonl"].splitlines())] == [json.loads(l) for l in plain["world_eval.jsonl"].splitlines()]
    assert {r["person"] for r in evals if r["split"] == "other_phrasing"} == set(facts["heldout"])
    assert {r["person"] for r in evals if r["split"] == "other_people"} == set(other)
    docs = files["world_corpus.txt"].strip("\n").split("\n\n")
    about_other = [d for d in docs if any(n in d for n in other)]
    assert len(about_other) == 176 * 20 and all(d.startswith("Record: ") for d in about_other)
    assert sorted(d for d in docs if d not in set(about_other)) == sorted(plain["world_corpus.txt"].strip("\n").split("\n\n"))


def test_cross_domain_measures_read_the_test_side_and_grade_the_second_population(tmp_path, tok):
    """other_rows asks half of another hospital's people and the test half of the held-out
    people, about SFT's attributes only; cross_domain and record_probe grade with the world's
    verifier, which knows the second population's facts."""
    from extras import experiments
    world = tmp_path / "world"
    world.mkdir()
    for name, text in W.build_files(1337, 200, 50, other_people=40, other_phrasings=True).items():
        (world / name).write_text(text, encoding="utf-8")
    facts = world_eval.load_world(str(world))
    people = experiments.other_rows(str(world), "other_people")
    asked = {r["person"] for r in people}
    assert len(asked) == 20 and {r["attribute"] for r in people} == set(experiments.SCALE_ATTRIBUTES)
    phrasing = experiments.other_rows(str(world), "other_phrasing")
    assert {r["person"] for r in phrasing} == {r["person"] for r in world_qa.heldout_halves(str(world))[1]}
    p = facts["other_people"][0]
    assert world_eval.grade(facts, p["name"], "city", f"{p['name']} was born in {p['city']}.")
    model = tiny_gpt(tok, block_size=64)
    ckpt = str(tmp_path / "m.pt")
    torch.save(nanosft.checkpoint_dict("sft", model, tok), ckpt)
    out = experiments.cross_domain(ckpt, str(world))
    assert set(out) == {"other_people", "other_people_answers", "other_phrasing", "other_phrasing_answers"}
    assert 0 <= out["other_people"] <= 1 and len(out["other_phrasing_answers"]) == 5
    assert 0 <= experiments.record_probe(ckpt, str(world)) <= 1


def test_cross_domain_claims_and_table_on_a_hand_made_case(tmp_path):
    """The three checks per cross-domain test, worked by hand. "another way of asking" gains
    per seed: small 0.10, 0.00; mid 0.20, 0.10; big 0.40, 0.12 -> smallest rise 0.10, 0.02
    (both > 0); top minus second 0.20, 0.02 (< 0.05 on seed 2); scratch off chance |0.0 - 0.05| and
    |0.12 - 0.05| -> 0.05, 0.07: the bound is two-sided."""
    from extras import experiments
    res = {"small": result(1000, [0.1, 0.3], pre=[0.2, 0.3], scratch=[0.1, 0.0]),
           "mid": result(4000, [0.5, 0.5], pre=[0.5, 0.4], scratch=[0.0, 0.1]),
           "big": result(9000, [0.9, 0.7], pre=[1.0, 0.8], scratch=[0.0, 0.1])}
    phrasing = {"small": ([0.10, 0.12], [0.0, 0.12]), "mid": ([0.20, 0.15], [0.0, 0.05]),
                "big": ([0.40, 0.17], [0.0, 0.05])}  # (pre-trained, scratch) accuracy per seed
    for name, r in res.items():
        for s in range(2):
            r["pre"][s].update(other_people=0.05, other_phrasing=phrasing[name][0][s])
            r["scratch"][s].update(other_people=0.05, other_phrasing=phrasing[name][1][s])
        for p in r["pretrain"]:
            p.update(probe_in_domain=p["knowledge_probe_accuracy"], probe_other_people=0.5)
    claims = {c["claim"]: c for c in experiments.scale_claims(res, chance=0.05)}
    rise = claims["another way of asking: gain rises size to size: smallest step"]
    assert rise["values"] == pytest.approx([0.10, 0.02]) and rise["pass"]
    top = claims["another way of asking: largest gain minus second-largest's (>= 0.05)"]
    assert top["values"] == pytest.approx([0.20, 0.02]) and not top["pass"]
    scratch = claims["another way of asking: scratch off chance, worst size (<= 0.05)"]
    assert scratch["values"] == pytest.approx([0.05, 0.07]) and not scratch["pass"]
    flat = claims["another hospital: gain rises size to size: smallest step"]  # every gain 0
    assert flat["values"] == [0.0, 0.0] and not flat["pass"]
    md = experiments.scale_table(res, {n: ["--n-layer", "1", "--n-embd", "256"] for n in res}, [1, 2], 1000,
                                 ["--max-iters", "9"])
    big = [line for line in md.splitlines() if line.startswith("| big")][-1]  # the cross-domain table's row
    assert big.endswith("| 0.025 [0.000–0.050] | 0.285 [0.170–0.400] | 0.260 [0.120–0.400] |"), big
