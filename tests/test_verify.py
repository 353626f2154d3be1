"""experiments.py verify: its PASS/FAIL logic, and one tiny run end to end."""
import json
import math
import os

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


def test_verify_runs_end_to_end_on_a_tiny_configuration(tmp_path):
    out = str(tmp_path / "v")
    r = run_script("-m", "extras.experiments", "verify", "--seeds", "1", "--tiny", "--dtype", "float32",
                   "--out-dir", out, timeout=300)
    assert r.returncode == 1, r.stderr  # a tiny model fails the README's claims: exit status 1
    assert "CPU:" in r.stdout and "dtype float32" in r.stdout
    res = json.load(open(os.path.join(out, "verify.json")))
    assert res["seeds"] == [1337] and res["dtype"] == "float32"
    assert len(res["claims"]) == len(experiments.CLAIMS) + len(experiments.INFO)
    assert {c["key"] for c in res["claims"]} == set(res["per_seed"]["1337"])
    md = open(os.path.join(out, "verify.md")).read()
    assert "| seed 1337 |" in md and ("FAIL" in md) == (r.returncode == 1)
    # a tiny model does not store the facts: the probe line must say FAIL, not PASS
    probe = next(c for c in res["claims"] if c["key"] == "probe")
    assert probe["result"] == "FAIL" and probe["values"][0] < 0.9
    assert "verify: seeds 1337" in r.stdout and "worst seed 1337" in r.stdout

    # the pre-training sweep: only pretrain.json is read (--reuse keeps the run above, so this
    # costs a process start), only the pre-training claims are judged, a failing seed exits 1
    log = os.path.join(out, "verify", "float32", "seed1337", "log.txt")
    before = open(log).read()
    r = run_script("-m", "extras.experiments", "verify", "--only", "pretrain", "--seeds", "1337,", "--jobs", "2", "--tiny",
                   "--reuse", "--dtype", "float32", "--out-dir", out, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "seeds 1337" in r.stdout and "worst seed 1337" in r.stdout and "only pretrain" in r.stdout
    res = json.load(open(os.path.join(out, "verify.json")))
    assert res["only"] == "pretrain" and {c["key"] for c in res["claims"]} == set(experiments.PRETRAIN_KEYS)
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
