"""experiments.py verify: its PASS/FAIL logic, and one tiny run end to end."""
import json
import os

from conftest import run_script

import experiments


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
    r = run_script("experiments.py", "verify", "--seeds", "1", "--tiny", "--dtype", "float32",
                   "--out-dir", out, timeout=300)
    assert r.returncode in (0, 1), r.stderr  # 1: a tiny model fails the README's claims
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
