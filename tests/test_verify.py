"""experiments.py verify: its PASS/FAIL logic, and one tiny run end to end."""
import json
import math
import os
import time

import pytest

from conftest import run_script

from extras import experiments


def passing_seed():
    """Values that meet every claim's threshold (and the info keys)."""
    v = {}
    for key, _, thr, op in experiments.CLAIMS:
        v[key] = thr + (0.05 if op == ">=" else -0.05) * (100 if thr >= 100 else 1)
    v.update({key: 1.0 for key, _ in experiments.INFO})
    return v


def test_judge_passes_only_when_every_seed_passes():
    seeds = {1337: passing_seed(), 2: passing_seed(), 3: passing_seed()}
    rows = experiments.judge(seeds)
    assert [r["result"] for r in rows if r["result"] != "info"] == ["PASS"] * len(experiments.CLAIMS)
    for key, _, thr, op in experiments.CLAIMS:
        bad = {s: dict(v) for s, v in seeds.items()}
        bad[2][key] = thr - 0.01 if op == ">=" else thr + 0.01  # one seed just past the threshold
        by_key = {r["key"]: r for r in experiments.judge(bad)}
        assert by_key[key]["result"] == "FAIL", key
        assert by_key[key]["min"] <= by_key[key]["mean"] <= by_key[key]["max"]
        assert all(r["result"] in ("PASS", "info") for k, r in by_key.items() if k != key)
    # exactly at the threshold is a pass (the README says ">=" and "<=")
    edge = {1: {**passing_seed(), "sft_heldout": 0.90, "dpo_degenerate": 0.01}}
    by_key = {r["key"]: r for r in experiments.judge(edge)}
    assert by_key["sft_heldout"]["result"] == by_key["dpo_degenerate"]["result"] == "PASS"


def expected_values(d):
    """Each claim's and info line's value for one seed, read by hand from the JSON files the
    stages wrote into d, as CLAIMS and INFO describe them."""
    read = lambda *p: json.load(open(os.path.join(d, *p)))
    pre, sft, scratch, over, dpo = (read("pretrain.json"), read("sft.json"), read("scratch", "sft.json"),
                                    read("overshoot", "sft.json"), read("dpo.json"))
    reached = [s for s, p in zip(pre["history"]["step"], pre["history"]["probe"]) if p is not None and p >= 0.90]
    return {
        "probe": pre["knowledge_probe_accuracy"],
        "probe_reach": reached[0] / pre["steps"] if reached else math.inf,
        "pretrain_val_loss": pre["val_loss"], "pretrain_seconds": pre["seconds"],
        "sft_heldout": sft["heldout_accuracy_final"],  # sft.pt's: the final weights (no --rewind)
        "scratch_over_chance": scratch["heldout_accuracy_final"] - scratch["chance_accuracy"],
        # rewinding is a flag: the overshoot run (--rewind interpolate) measures the path's choice too
        "rewound_minus_final": over["rewind_path"]["heldout"] - over["heldout_accuracy_final"],
        "overshoot_peak": max(p["heldout"] for p in over["path"]),
        "overshoot_rewound_minus_final": over["heldout_accuracy_rewound"] - over["heldout_accuracy_final"],
        "overshoot_retention_gap": over["retention_val_loss_final"] - over["retention_val_loss_rewound"],
        "dpo_clean_style": dpo["clean_style_rate_after"], "dpo_degenerate": dpo["degenerate_rate_after"],
        "dpo_pref": dpo["pref_accuracy_heldout"],
        "dpo_task_change": dpo["heldout_accuracy_after"] - dpo["heldout_accuracy_before"],
        "pipeline_seconds": pre["seconds"] + sft["seconds"] + dpo["seconds"],
        "retention_gap": over["retention_val_loss_final"] - over["rewind_path"]["retention"],
        "sft_rewound_step": over["rewind_path"]["step"], "sft_degenerate": sft["degenerate_rate_final"],
        "overshoot_rewound_alpha": over["rewound_alpha"], "dpo_rewound_step": dpo["rewound_step"],
        "dpo_style_loose": dpo["style_rate_after"], "dpo_kl": dpo["kl"]}


def same(a, b):
    return a == b or (a != math.inf and b != math.inf and a == pytest.approx(b, rel=1e-12, abs=1e-12))


def test_verify_runs_end_to_end_on_a_tiny_configuration(tmp_path):
    out = str(tmp_path / "v")
    t0 = time.time()
    r = run_script("-m", "extras.experiments", "verify", "--seeds", "1", "--tiny", "--dtype", "float32",
                   "--out-dir", out, timeout=300)
    wall = time.time() - t0
    assert "CPU:" in r.stdout and "dtype float32" in r.stdout, r.stderr
    res = json.load(open(os.path.join(out, "verify.json")))
    assert res["seeds"] == [1337] and res["dtype"] == "float32"

    # what verify recorded for the seed is what the stages wrote, read as the claims describe it
    d = os.path.join(out, "verify", "float32", "seed1337")
    want = expected_values(d)
    got = res["per_seed"]["1337"]
    assert set(got) == set(want) == {k for k, *_ in experiments.CLAIMS} | {k for k, _ in experiments.INFO}
    for key in want:
        assert same(got[key], want[key]), (key, got[key], want[key])
    # ... and every value lies in its range
    for key in ("probe", "sft_heldout", "overshoot_peak", "dpo_clean_style", "dpo_degenerate", "dpo_pref",
                "sft_degenerate", "dpo_style_loose"):
        assert 0.0 <= got[key] <= 1.0, key
    for key in ("rewound_minus_final", "overshoot_rewound_minus_final", "dpo_task_change", "scratch_over_chance"):
        assert -1.0 <= got[key] <= 1.0, key  # differences of two accuracies
    assert got["probe_reach"] == math.inf or 0 < got["probe_reach"] <= 1
    assert 0 < got["pretrain_seconds"] < got["pipeline_seconds"] < wall  # the stages ran inside verify's wall time
    assert got["pretrain_val_loss"] > 0 and got["dpo_kl"] >= 0
    assert 0 <= got["sft_rewound_step"] <= 4 and got["dpo_rewound_step"] in (0, 4)  # TINY: 4 steps, evaluated at 4
    assert 0 < got["overshoot_rewound_alpha"] <= 1
    if got["dpo_rewound_step"] == 0:  # rewound to the start, the policy IS the reference: all ties, no KL
        assert got["dpo_pref"] == 0.5 and got["dpo_kl"] == 0.0

    # each claim's verdict is its rule applied by hand to that number (one seed: min = max = mean = worst)
    rows = res["claims"]
    assert [row["key"] for row in rows] == [k for k, *_ in experiments.CLAIMS] + [k for k, _ in experiments.INFO]
    failed = 0
    for row, (key, text, thr, op) in zip(rows, experiments.CLAIMS):
        v = want[key]
        verdict = "PASS" if (v >= thr if op == ">=" else v <= thr) else "FAIL"
        failed += verdict == "FAIL"
        assert row["result"] == verdict and row["claim"] == text and row["threshold"] == f"{op} {thr:g}", row
        assert row["worst_seed"] == 1337 and all(same(row[k], v) for k in ("min", "max", "mean", "worst")), row
        assert len(row["values"]) == 1 and same(row["values"][0], v), row
    for row, (key, text) in zip(rows[len(experiments.CLAIMS):], experiments.INFO):
        v = want[key]
        assert row["result"] == "info" and row["claim"] == text and "worst_seed" not in row, row
        assert len(row["values"]) == 1 and same(row["values"][0], v) and same(row["mean"], v), row
    # a tiny model does not store the facts: the probe line must say FAIL, not PASS
    assert want["probe"] < 0.9 and rows[0]["result"] == "FAIL"
    assert r.returncode == (1 if failed else 0), r.stderr
    assert f"{failed} of {len(experiments.CLAIMS)} claims FAIL" in r.stdout
    assert "verify: seeds 1337" in r.stdout and "worst seed 1337" in r.stdout
    # the markdown table says the same, claim by claim
    md = open(os.path.join(out, "verify.md")).read()
    assert "| seed 1337 |" in md
    for row in rows:
        line = next(l for l in md.splitlines() if l.startswith(f"| {row['claim']} |"))
        assert line.endswith({"FAIL": "| **FAIL** |", "PASS": "| PASS |", "info": "| info |"}[row["result"]]), line

    # the pre-training sweep: only pretrain.json is read (--reuse keeps the run above, so this
    # costs a process start), only the pre-training claims are judged, a failing seed exits 1
    log = os.path.join(d, "log.txt")
    before = open(log).read()
    r = run_script("-m", "extras.experiments", "verify", "--only", "pretrain", "--seeds", "1337,", "--jobs", "2", "--tiny",
                   "--reuse", "--dtype", "float32", "--out-dir", out, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "seeds 1337" in r.stdout and "worst seed 1337" in r.stdout and "only pretrain" in r.stdout
    res = json.load(open(os.path.join(out, "verify.json")))
    assert res["only"] == "pretrain" and [c["key"] for c in res["claims"]] == ["probe", "probe_reach",
                                                                               "pretrain_val_loss", "pretrain_seconds"]
    assert set(res["per_seed"]["1337"]) == set(experiments.PRETRAIN_KEYS)
    for key, v in res["per_seed"]["1337"].items():
        assert same(v, want[key]), key
    assert open(log).read() == before  # nothing was trained again


def test_judge_names_the_worst_seed_in_the_claims_direction():
    seeds = {101: passing_seed(), 102: passing_seed(), 103: passing_seed()}
    seeds[102]["probe"] = 0.91        # the lowest probe: worst for a ">=" claim
    seeds[103]["probe"] = 0.99
    seeds[101]["probe_reach"] = 0.65  # the latest step to reach 0.90: worst for a "<=" claim
    seeds[102]["probe_reach"] = 0.40
    by_key = {r["key"]: r for r in experiments.judge(seeds)}
    assert (by_key["probe"]["worst_seed"], by_key["probe"]["worst"]) == (102, 0.91)
    assert (by_key["probe_reach"]["worst_seed"], by_key["probe_reach"]["worst"]) == (101, 0.65)
    # a seed whose probe never reached 0.90 fails the claim
    seeds[103]["probe_reach"] = math.inf
    by_key = {r["key"]: r for r in experiments.judge(seeds)}
    assert by_key["probe_reach"]["result"] == "FAIL" and by_key["probe_reach"]["worst_seed"] == 103


def test_judge_judges_only_the_claims_the_seeds_measured():
    pre = {k: v for k, v in passing_seed().items() if k in experiments.PRETRAIN_KEYS}
    rows = experiments.judge({1: pre, 2: pre})
    assert {r["key"] for r in rows} == set(experiments.PRETRAIN_KEYS)
    assert all(r["result"] in ("PASS", "info") for r in rows)


def test_probe_reach_is_the_first_step_at_the_threshold_as_a_fraction():
    pre = {"steps": 2000, "history": {"step": [200, 400, 600, 800, 1000],
                                      "probe": [0.1, 0.5, 0.91, 0.89, 0.95]}}
    assert experiments.probe_reach(pre) == 600 / 2000
    assert experiments.probe_reach(pre, threshold=0.92) == 1000 / 2000
    assert experiments.probe_reach(pre, threshold=0.99) == math.inf
    assert experiments.probe_reach(pre, threshold=0.91) == 600 / 2000  # reaching it exactly counts
    assert experiments.probe_reach({"steps": 10, "history": {"step": [10], "probe": [None]}}) == math.inf


def test_parse_seeds():
    assert experiments.parse_seeds("3") == [1337, 2, 3]
    assert experiments.parse_seeds("101-105") == [101, 102, 103, 104, 105]
    assert experiments.parse_seeds("7,101,9") == [7, 101, 9]
    for bad in ("a", "5-x", "3,3"):
        with pytest.raises(SystemExit):
            experiments.parse_seeds(bad)
