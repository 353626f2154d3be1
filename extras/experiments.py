"""
The comparisons the README reports, each a set of ordinary stage-script runs whose JSON
outputs are collected into a markdown table (printed and written to out/<name>.md).

    python -m extras.experiments sft        # full SFT vs scratch vs LoRA vs prompt tuning vs replay (~12 min)
    python -m extras.experiments labels     # gold vs top-voted vs random-community labels (~8 min)
    python -m extras.experiments overshoot  # SFT at 1.5x the learning rate, rewound along the pre-trained -> final line
    python -m extras.experiments scale --jobs 2  # four sizes, 0.2M-11M, on a world of 700 people: the
                                     # knowledge probe and SFT's gain over scratch, 2 seeds (~40 min)
    python -m extras.experiments dpo        # DPO: loss, beta, pair construction, NLL weight, seed (~8 min)
    python -m extras.experiments plane      # every SFT method on the stability-plasticity plane, 3 seeds
    python -m extras.experiments prompt     # prompt tuning's remedies, one at a time
    python -m extras.experiments verify --seeds 101-105 [--dtype float32]
                                     # the whole default pipeline + a scratch SFT per seed: one
                                     # PASS/FAIL line per README headline, with its worst seed
    python -m extras.experiments verify --only pretrain --seeds 101-110 --jobs 2
                                     # pre-training's claims only, a cheap sweep over many seeds

All start from out/pretrain.pt (run `python pretrain.py` first) except `scale`, which
pre-trains its own models into out/scale/, `dpo`, which starts from out/sft.pt, and `verify`,
which runs everything itself into out/verify/.
"""
import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def run(script, *args, log=None, threads=None):
    """Run a stage script; its output goes to the file `log` (appended) or nowhere.
    threads: its OpenMP threads (default: the script's own choice, every core)."""
    cmd = [sys.executable, os.path.join(HERE, script), *args]
    print("$ " + " ".join(["python", script, *args]), flush=True)
    if log:
        os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with open(log, "a") if log else open(os.devnull, "w") as out:
        subprocess.run(cmd, check=True, stdout=out, env=env)


def threads_for(jobs):
    """OpenMP threads for each of `jobs` runs side by side (None: one run, the script's own choice)."""
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None


def sft(out_root, name, ckpt, *extra, threads=None):
    out = os.path.join(out_root, name)
    run("finetune.py", "--ckpt", ckpt, "--out-dir", out, *extra, threads=threads)
    with open(os.path.join(out, "sft.json")) as f:
        return json.load(f)


def sft_many(out_root, ckpt, runs, jobs=1, reuse=False):
    """{name: sft.json} of finetune.py runs {name: [out-dir name, *flags]}, `jobs` at a time,
    each on cores/jobs threads. Small models use two cores poorly, so two one-thread runs
    side by side finish sooner than the same runs one after the other (the runs' own
    train_seconds then count a shared machine: compare times only within one --jobs)."""
    from concurrent.futures import ThreadPoolExecutor
    threads = threads_for(jobs)

    def one(item):
        name, (where, *flags) = item
        t = time.time()
        done = os.path.join(out_root, where, "sft.json")
        if reuse and os.path.isfile(done):
            print(f"reusing {done}", flush=True)
            with open(done) as f:
                return name, json.load(f)
        r = sft(out_root, where, ckpt, *flags, threads=threads)
        print(f"  {name}: {time.time() - t:.0f}s", flush=True)
        return name, r
    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, runs.items()))


def slug(name):
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def fmt(v, digits=3):
    return "—" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.{digits}f}")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def sft_row(name, r):
    return [name, fmt(r["trainable_params"]), f"{100 * r['trainable_params'] / r['total_params']:.2f}%",
            fmt(r["heldout_accuracy"]), fmt(r["train_accuracy"]), fmt(r["retention_val_loss_before"]),
            fmt(r["retention_val_loss_rewound"]), fmt(r["retention_val_loss_final"]), f"{r['train_seconds']:.0f}s"]


SFT_HEADER = ["run", "trainable params", "share", "held-out acc", "training-people acc",
              "retention before", "retention (sft.pt)", "retention final", "train time"]


# ----------------------------------------------------------------------------------------
# verify: every headline of the README, checked on this machine, on every seed

# (key, what the README claims, threshold, ">=" or "<="); a claim holds only if it holds on
# EVERY seed: a mean that passes while one seed fails is a FAIL
CLAIMS = [
    ("probe", "knowledge probe (pre-training stored the facts)", 0.90, ">="),
    ("probe_reach", "pre-training: first evaluated step with probe >= 0.90, fraction of the steps", 0.70, "<="),
    ("sft_heldout", "SFT held-out accuracy, test half, final weights", 0.90, ">="),
    ("scratch_over_chance", "SFT from scratch minus chance (final weights)", 0.05, "<="),
    ("rewound_minus_final", "overshoot run: rewound along the path minus final held-out accuracy", -0.01, ">="),
    ("overshoot_peak", "overshoot run: peak held-out accuracy along its path", 0.90, ">="),
    ("overshoot_rewound_minus_final", "overshoot run: rewound minus final held-out accuracy", -0.01, ">="),
    ("overshoot_retention_gap", "overshoot run: retention loss, final minus rewound (nats)", 0.10, ">="),
    ("dpo_clean_style", "DPO clean style rate (test half)", 0.90, ">="),
    ("dpo_degenerate", "DPO degenerate rate (test half)", 0.01, "<="),
    ("dpo_pref", "DPO preference accuracy, pairs of people never trained on", 0.90, ">="),
    ("dpo_task_change", "DPO held-out task accuracy, after minus before", -0.01, ">="),
    ("pipeline_seconds", "default pipeline seconds (pretrain + finetune + dpo)", 600, "<="),
]
PRETRAIN_KEYS = ("probe", "probe_reach", "pretrain_val_loss", "pretrain_seconds")  # verify --only pretrain
INFO = [  # reported beside the claims, not judged
    ("pretrain_val_loss", "pre-training validation loss"),
    ("pretrain_seconds", "pre-training seconds"),
    ("retention_gap", "overshoot run: retention loss, final minus rewound along the path (nats)"),
    ("sft_rewound_step", "overshoot run: step rewound to along the path (300 = the final one)"),
    ("sft_degenerate", "SFT degenerate rate (test half, final weights)"),
    ("overshoot_rewound_alpha", "overshoot run: rewound alpha on the line pre-trained -> final"),
    ("dpo_rewound_step", "DPO rewound step"),
    ("dpo_style_loose", "DPO answers that end with the closing (loose)"),
    ("dpo_kl", "DPO KL(policy ‖ reference), nats per answer"),
]
# the overshoot run: the default SFT pushed harder (twice the learning rate), rewound along the
# line from the pre-trained to the final weights
OVERSHOOT = ["--lr", "4e-3", "--rewind", "interpolate"]
# a tiny configuration, for the test that runs verify end to end in seconds
TINY = {"pretrain.py": ["--max-iters", "20", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                        "--eval-interval", "20", "--vocab-size", "600"],
        "finetune.py": ["--max-iters", "4", "--eval-interval", "4", "--batch-size", "4", "--warmup", "1"],
        "dpo.py": ["--max-iters", "4", "--eval-interval", "4", "--batch-size", "4", "--warmup", "1"]}


def probe_reach(pre, threshold=0.90):
    """The first evaluated step at which the knowledge probe reached `threshold`, as a
    fraction of the run's steps (inf if it never did): a run that gets there only at its
    last step has stopped on the slope of its curve, not on the plateau."""
    hist = pre["history"]
    return next((s / pre["steps"] for s, p in zip(hist["step"], hist["probe"]) if p is not None and p >= threshold),
                math.inf)


def pretrain_values(pre):
    """The pre-training claims' values from one seed's pretrain.json."""
    return {"probe": pre["knowledge_probe_accuracy"], "probe_reach": probe_reach(pre),
            "pretrain_val_loss": pre["val_loss"], "pretrain_seconds": pre["seconds"]}


def seed_values(d):
    """The claims' values from one seed's JSON outputs (folder d)."""
    load = lambda *p: json.load(open(os.path.join(d, *p)))
    pre, sft, scratch, dpo = load("pretrain.json"), load("sft.json"), load("scratch", "sft.json"), load("dpo.json")
    over = load("overshoot", "sft.json")
    return {**pretrain_values(pre),
            "sft_heldout": sft["heldout_accuracy"],
            "scratch_over_chance": scratch["heldout_accuracy"] - scratch["chance_accuracy"],
            "rewound_minus_final": over["rewind_path"]["heldout"] - over["heldout_accuracy_final"],
            "retention_gap": over["retention_val_loss_final"] - over["rewind_path"]["retention"],
            "dpo_clean_style": dpo["clean_style_rate_after"], "dpo_degenerate": dpo["degenerate_rate_after"],
            "dpo_pref": dpo["pref_accuracy_heldout"],
            "dpo_task_change": dpo["heldout_accuracy_after"] - dpo["heldout_accuracy_before"],
            "pipeline_seconds": pre["seconds"] + sft["seconds"] + dpo["seconds"],
            "overshoot_peak": max(p["heldout"] for p in over["path"]),
            "overshoot_rewound_minus_final": over["heldout_accuracy_rewound"] - over["heldout_accuracy_final"],
            "overshoot_retention_gap": over["retention_val_loss_final"] - over["retention_val_loss_rewound"],
            "sft_degenerate": sft["degenerate_rate"], "sft_rewound_step": over["rewind_path"]["step"],
            "overshoot_rewound_alpha": over["rewound_alpha"],
            "dpo_rewound_step": dpo["rewound_step"], "dpo_style_loose": dpo["style_rate_after"],
            "dpo_kl": dpo["kl"]}


def judge(per_seed):
    """per_seed: {seed: {key: value}} -> one row per claim: values, min, max, mean, the worst
    seed and its value, PASS/FAIL. PASS only when every seed meets the threshold. Only the
    keys the seeds have are judged (verify --only pretrain has the pre-training ones)."""
    rows, seeds = [], list(per_seed)
    have = set.intersection(*(set(v) for v in per_seed.values())) if per_seed else set()
    for key, text, thr, op in CLAIMS:
        if key not in have:
            continue
        vals = [per_seed[s][key] for s in seeds]
        ok = all((x >= thr) if op == ">=" else (x <= thr) for x in vals) and bool(vals)
        worst = min(range(len(vals)), key=lambda i: vals[i] if op == ">=" else -vals[i])
        rows.append({"key": key, "claim": text, "threshold": f"{op} {thr:g}", "values": vals,
                     "min": min(vals), "max": max(vals), "mean": sum(vals) / len(vals),
                     "worst_seed": seeds[worst], "worst": vals[worst], "result": "PASS" if ok else "FAIL"})
    for key, text in INFO:
        if key not in have:
            continue
        vals = [per_seed[s][key] for s in seeds if per_seed[s][key] is not None] or [float("nan")]
        rows.append({"key": key, "claim": text, "threshold": "", "values": vals, "min": min(vals),
                     "max": max(vals), "mean": sum(vals) / len(vals), "result": "info"})
    return rows


def parse_seeds(text):
    """verify --seeds: N (1337, 2, ..., N, the seeds the defaults were tuned on), A-B (a range)
    or a comma-separated list."""
    try:
        if "," in text:
            seeds = [int(x) for x in text.split(",") if x.strip()]
        elif "-" in text.strip("-"):
            a, b = (int(x) for x in text.split("-"))
            seeds = list(range(a, b + 1))
        else:
            seeds = [1337] + list(range(2, int(text) + 1))
    except ValueError:
        raise SystemExit(f"experiments.py: error: --seeds {text!r}: expected N, A-B or a comma-separated list")
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"experiments.py: error: --seeds {text!r}: expected distinct seeds")
    return seeds


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in info]
        cpu += f" ({', '.join(flags)})"
    except (OSError, StopIteration):
        pass
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def exp_dpo(root, ckpt):
    """dpo.py's variants from one SFT checkpoint. -> a markdown table."""
    runs = {"defaults (IPO, beta 0.05)": [], "--seed 2": ["--seed", "2"],
            "--loss sigmoid --beta 0.1 (the DPO loss)": ["--loss", "sigmoid", "--beta", "0.1"],
            "--loss sigmoid --beta 0.1 --seed 2": ["--loss", "sigmoid", "--beta", "0.1", "--seed", "2"],
            "--beta 0.1": ["--beta", "0.1"], "--pairs all": ["--pairs", "all"],
            "--rpo-alpha 0.5": ["--rpo-alpha", "0.5"]}
    rows = []
    for name, extra in runs.items():
        out = os.path.join(root, re.sub(r"[^A-Za-z0-9.]+", "_", name.split(" (")[0]).strip("_"))
        run("dpo.py", "--ckpt", ckpt, "--out-dir", out, *extra)
        with open(os.path.join(out, "dpo.json")) as f:
            r = json.load(f)
        rows.append([name, fmt(r["pairs_train"]), fmt(r["pref_accuracy_heldout"]),
                     fmt(r["clean_style_rate_after"]), fmt(r["degenerate_rate_after"]),
                     fmt(r["heldout_accuracy_after"]), fmt(r["rewound_step"]), fmt(r["kl"], 2),
                     f"{r['seconds']:.0f}s"])
    md = table(["dpo.py run", "training pairs", "held-out pref. acc", "clean style after", "degenerate after",
                "held-out task acc after", "rewound step", "KL", "time"], rows)
    return md


def exp_sft(root, ckpt):
    """Every SFT method, each with its own default learning rate (finetune.LR): no hidden flags. -> a markdown table."""
    # every method with its own default learning rate (finetune.LR): no hidden flags
    runs = {"full SFT": [], "from scratch (no pre-training)": ["--init", "scratch"],
            "LoRA r=8 (attention)": ["--lora-rank", "8"],
            "LoRA r=8 (attention + MLP)": ["--lora-rank", "8", "--lora-on", "attn,mlp"],
            "prompt tuning, 16 tokens": ["--prompt-tokens", "16"],
            "full SFT + replay 1.0": ["--replay", "1.0"]}
    rows = [sft_row(n, sft(root, slug(n), ckpt, *a)) for n, a in runs.items()]
    md = table(SFT_HEADER, rows)
    return md


def exp_labels(root, ckpt):
    """SFT targets: gold, top-voted, or a random community answer. -> a markdown table."""
    rows = []
    for labels in ("gold", "top-voted", "random-community"):
        r = sft(root, labels, ckpt, "--labels", labels)
        rows.append([labels, fmt(r["heldout_accuracy"]), fmt(r["train_accuracy"]),
                     fmt(r["retention_val_loss_rewound"])])
    md = table(["SFT labels", "held-out acc", "training-people acc", "retention loss"], rows)
    return md


def exp_overshoot(root, ckpt):
    """A learning rate that overshoots, and what rewinding recovers. -> a markdown table."""
    r = sft(root, "lr4e-3", ckpt, *OVERSHOOT)
    peak, final, rewound = max(p["heldout"] for p in r["path"]), r["heldout_accuracy_final"], r["heldout_accuracy_rewound"]
    md = table(["", "held-out acc (test half)", "retention loss", "where"],
               [["peak along the path", fmt(peak), "", ""],
                ["final", fmt(final), fmt(r["retention_val_loss_final"]), f"step {r['steps']}"],
                ["rewound (out/overshoot/lr4e-3/sft.pt)", fmt(rewound), fmt(r["retention_val_loss_rewound"]),
                 r["rewound"]]])
    md += (f"\n\nrewinding saves {r['retention_val_loss_final'] - r['retention_val_loss_rewound']:.3f} nats of "
           f"retention loss at {100 * (rewound - final):+.1f} points of held-out accuracy.")
    return md


# Scale: where knowledge is the bottleneck. A world of SCALE_PEOPLE people (3.5 times the
# default's; a quarter held out, as there) and the same pre-training budget in tokens for every
# size (the pre-training defaults: 3,000 steps of 8 x 128 tokens, about five passes over its
# corpus), so that a small model cannot store the facts in that budget and a larger one stores
# more. Per seed: each size pre-trained with that seed, then SFT on three attributes' questions
# from its pre-trained weights and from random ones, with the same seed. The held-out people are
# also asked about the two attributes SFT never asked about (cross-domain: the facts are in the
# prose, only the question type is new). SCALE_SFT evaluates before and after SFT only (the
# training is finetune.py's default, at scale_lr). Why these numbers: docs/scale.md.
SCALE = {  # name: architecture (pretrain.py flags): two layers, heads of 64 dimensions, the width grows
    "L2 C64": ["--n-layer", "2", "--n-head", "1", "--n-embd", "64"],
    "L2 C128": ["--n-layer", "2", "--n-head", "2", "--n-embd", "128"],
    "L2 C256": ["--n-layer", "2", "--n-head", "4", "--n-embd", "256"],
    "L2 C640": ["--n-layer", "2", "--n-head", "10", "--n-embd", "640"],
}


def scale_lr(peak, flags, least=0.0):
    """A wider model takes smaller steps: the default peak (pre-training 6e-3, SFT 2e-3, both
    chosen at the default width, 128) x 128 / width, never more than the default and never
    less than `least` (SFT: SCALE_SFT_LEAST)."""
    width = int(flags[flags.index("--n-embd") + 1])
    return f"{max(least, peak * min(1.0, 128 / width)):.2g}"


SCALE_BUDGET = ["--max-iters", "3000", "--batch-size", "8", "--block-size", "128"]  # the same tokens for every size
SCALE_PEOPLE = 700
SCALE_SEEDS = (7, 8)  # never run before the cross-domain tests were designed (seeds 4, 5: the in-domain
# claims' acceptance; 1337, 3: chose the world, sizes, budget and rates; docs/scale.md)
SCALE_SFT_LEAST = 8e-4  # SFT's least peak rate, which only the widest model reaches: why, docs/scale.md
SCALE_ATTRIBUTES = ["city", "job", "food"]  # what SFT asks about; pet and hobby are cross-domain
SCALE_SFT = ["--sft-attributes", ",".join(SCALE_ATTRIBUTES), "--eval-interval", "300"]
IN_DOMAIN, CROSS_DOMAIN = "heldout_accuracy_in_domain", "heldout_accuracy_cross_domain"


def timed(what, fn, *a, **k):
    """fn(*a, **k), printing how long `what` took."""
    t = time.time()
    out = fn(*a, **k)
    print(f"  {what}: {time.time() - t:.0f}s", flush=True)
    return out


def stored_bits(accuracy, values, people):
    """Bits of the world's facts a model stores, from its knowledge probe per attribute: a
    model that knows a share k of an attribute's values and guesses the rest uniformly scores
    accuracy = k + (1 - k) / n among n values, so k = (accuracy - 1/n) / (1 - 1/n) (at least
    0); each known value is log2(n) bits, for every one of `people` people."""
    bits = 0.0
    for attr, acc in accuracy.items():
        n = len(values[attr])
        bits += max(0.0, (acc - 1 / n) / (1 - 1 / n)) * people * math.log2(n)
    return bits


def probe_by_attribute(ckpt, world_dir):
    """{attribute: knowledge probe accuracy} of a pre-trained checkpoint."""
    import nanosft
    from data import world_eval
    model, tok = nanosft.model_from_checkpoint(nanosft.load_checkpoint(ckpt), ckpt)
    world = world_eval.load_world(world_dir)
    return {a: world_eval.knowledge_probe(model, tok, world, attributes=[a]) for a in world["attributes"]}


OTHER = {  # the cross-domain tests (data/world.py cross_domain): split of world_eval.jsonl -> its name
    "other_people": "another hospital",
    "other_phrasing": "another way of asking",
}
SCALE_WORLD = ["--other-people", "176", "--other-phrasings"]  # (half of 176 people are asked)


def other_rows(world_dir, split):
    """The cross-domain questions of `split` about SCALE_ATTRIBUTES, on the test side: another
    hospital's people every other one by name (88 of 176); the held-out people of the test
    half (the dev half chooses nothing here, but it stays unread, as everywhere)."""
    from data import world_qa
    rows = [r for r in world_qa.load_eval_rows(split, world_dir) if r["attribute"] in SCALE_ATTRIBUTES]
    if split == "other_people":
        asked = set(sorted({r["person"] for r in rows})[1::2])
    else:
        asked = {r["person"] for r in world_qa.heldout_halves(world_dir)[1]}
    return [r for r in rows if r["person"] in asked]


def cross_domain(ckpt, world_dir):
    """{split: accuracy} of an SFT checkpoint on each cross-domain test (greedy, graded by the
    world's verifier), and five answers of each, to read."""
    import nanosft
    from data import world_eval, world_qa
    model, tok = nanosft.model_from_checkpoint(nanosft.load_checkpoint(ckpt), ckpt)
    world, out = world_eval.load_world(world_dir), {}
    for split in OTHER:
        rows = other_rows(world_dir, split)
        r = world_qa.qa_eval(model, tok, world, rows)
        out[split] = r["accuracy"]
        out[split + "_answers"] = [[row["prompt"], a] for row, a in list(zip(rows, r["answers"]))[:: max(1, len(rows) // 5)][:5]]
    return out


def record_probe(ckpt, world_dir):
    """The knowledge probe of another hospital's people in their own register: "Record: X.
    Born:" (and Job:, Food:) completed greedily and graded, over the people other_rows asks."""
    import nanosft
    from data import world as W, world_eval
    model, tok = nanosft.model_from_checkpoint(nanosft.load_checkpoint(ckpt), ckpt)
    world = world_eval.load_world(world_dir)
    asked = {r["person"] for r in other_rows(world_dir, "other_people")}
    rows = [(p["name"], a) for p in world["other_people"] if p["name"] in asked for a in SCALE_ATTRIBUTES]
    prompts = [[tok.endoftext] + tok.encode(f"Record: {n}. {W.RECORD[a]}:") for n, a in rows]
    outs = nanosft.generate_batch(model, prompts, 4, stop={tok.endoftext})
    hits = [world_eval.grade(world, n, a, tok.decode(o).split(".")[0]) for (n, a), o in zip(rows, outs)]
    return sum(hits) / len(hits)


def exp_scale(root, ckpt=None, seeds=SCALE_SEEDS, people=SCALE_PEOPLE, sizes=None, jobs=1, reuse=False,
              budget=SCALE_BUDGET):
    """The gain from pre-training (SFT from pre-trained minus SFT from scratch, held-out test
    half) against model size, with the knowledge probe and the bits stored per parameter ->
    out/scale.png and a markdown table with the claims judged per seed. Writes its world
    (data/world.py --people `people`) to root/world; pre-trains its own models (`ckpt` unused)."""
    world = os.path.join(root, "world")
    run(os.path.join("data", "world.py"), "--out-dir", world, "--people", str(people), "--heldout", str(people // 4),
        *SCALE_WORLD)
    with open(os.path.join(world, "world.json")) as f:
        facts = json.load(f)
    from concurrent.futures import ThreadPoolExecutor
    import finetune
    from data import world_eval
    t0, res, sizes = time.time(), {}, sizes or SCALE

    def pretrain(name, seed):  # one size and seed -> its pretrain.json, with the probe per attribute and the bits
        d = os.path.join(root, slug(name), f"seed{seed}")
        if not (reuse and os.path.isfile(os.path.join(d, "pretrain.json"))):
            timed(f"{name}: pretrain, seed {seed}", run, "pretrain.py", "--world", world, "--out-dir", d,
                  "--seed", str(seed), *budget, *sizes[name], "--lr", scale_lr(6e-3, sizes[name]),
                  threads=threads_for(jobs))
        with open(os.path.join(d, "pretrain.json")) as f:
            out = json.load(f)
        out["probe_by_attribute"] = probe_by_attribute(os.path.join(d, "pretrain.pt"), world)
        out["probe_in_domain"] = sum(out["probe_by_attribute"][a] for a in SCALE_ATTRIBUTES) / len(SCALE_ATTRIBUTES)
        out["probe_other_people"] = record_probe(os.path.join(d, "pretrain.pt"), world)
        out["bits"] = stored_bits(out["probe_by_attribute"], facts["values"], len(facts["people"]))
        return out
    for name in sizes:
        with ThreadPoolExecutor(jobs) as pool:
            res[name] = {"pretrain": list(pool.map(lambda seed: pretrain(name, seed), seeds)), "pre": [], "scratch": []}
        for seed in seeds:
            d = os.path.join(root, slug(name), f"seed{seed}")
            lr = scale_lr(2e-3, sizes[name], SCALE_SFT_LEAST)
            todo = {init: [init, "--world", world, "--seed", str(seed), *SCALE_SFT, "--lr", lr,
                           "--init", init.replace("pre", "pretrained")] for init in ("pre", "scratch")}
            done = sft_many(d, os.path.join(d, "pretrain.pt"), todo, jobs, reuse)
            for init in ("pre", "scratch"):
                done[init].update(cross_domain(os.path.join(d, init, "sft.pt"), world))
                res[name][init].append(done[init])
    plot_scale(os.path.join(os.path.dirname(root), "scale.png"), res)
    chance = finetune.chance_accuracy(world_eval.load_world(world), SCALE_ATTRIBUTES)
    claims = scale_claims(res, chance)
    with open(os.path.join(root, "scale.json"), "w") as f:
        json.dump({"results": res, "claims": claims, "seeds": list(seeds), "people": people, "machine": machine(),
                   "seconds": time.time() - t0}, f, indent=1)
    return (scale_table(res, sizes, seeds, people, budget) + "\n\n" +
            table(["claim", *[f"seed {s}" for s in seeds], "verdict"],
                  [[c["claim"], *map(fmt, c["values"]), "PASS" if c["pass"] else "FAIL"] for c in claims])
            + f"\n\nin-domain chance {chance:.3f}; wall time {time.time() - t0:.0f}s on {machine()['cpu']}.")


def scale_gains(r, key):
    """Per seed: (pre-trained, scratch, pre-trained minus scratch) of sft.json's `key`."""
    return [(p[key], s[key], p[key] - s[key]) for p, s in zip(r["pre"], r["scratch"])]


def scale_claims(res, chance):
    """The scale claims, judged on every seed (sizes in order of parameters): the in-domain gain
    rises from each size to the next; the largest model's gain is at least 10 points above the
    second-largest's; SFT from scratch stays within chance + 5 points at every size."""
    order = sorted(res, key=lambda n: res[n]["pretrain"][0]["params"])
    gains = [[g[2] for g in scale_gains(res[n], IN_DOMAIN)] for n in order]  # [size][seed]
    seeds = range(len(gains[0]))
    # rounded: accuracies are counts over the same questions, so equal gains must compare equal
    rise = [round(min(b[s] - a[s] for a, b in zip(gains, gains[1:])), 9) for s in seeds]
    top = [round(gains[-1][s] - gains[-2][s], 9) for s in seeds]
    scratch = [round(max(res[n]["scratch"][s][IN_DOMAIN] for n in order) - chance, 9) for s in seeds]
    claims = [{"claim": "gain rises size to size: smallest step", "values": rise, "pass": min(rise) > 0},
              {"claim": "largest gain minus second-largest's (>= 0.10)", "values": top, "pass": min(top) >= 0.10},
              {"claim": "scratch minus chance, worst size (<= 0.05)", "values": scratch, "pass": max(scratch) <= 0.05}]
    for split, name in OTHER.items():  # the same three, across a domain shift (5 points, as issued)
        if split not in res[order[0]]["pre"][0]:
            continue
        gains = [[g[2] for g in scale_gains(res[n], split)] for n in order]
        rise = [round(min(b[s] - a[s] for a, b in zip(gains, gains[1:])), 9) for s in seeds]
        top = [round(gains[-1][s] - gains[-2][s], 9) for s in seeds]
        scratch = [round(max(abs(res[n]["scratch"][s][split] - chance) for n in order), 9) for s in seeds]
        claims += [{"claim": f"{name}: gain rises size to size: smallest step", "values": rise, "pass": min(rise) > 0},
                   {"claim": f"{name}: largest gain minus second-largest's (>= 0.05)", "values": top,
                    "pass": min(top) >= 0.05},
                   {"claim": f"{name}: scratch off chance, worst size (<= 0.05)", "values": scratch,
                    "pass": max(scratch) <= 0.05}]
    return claims


def scale_table(res, sizes, seeds, people, budget):
    """One row per size: parameters, knowledge probe, bits stored and per parameter, in-domain
    held-out accuracy from scratch and from pre-trained weights and the gain, the cross-domain
    gain, pre-training time: mean [min–max] over seeds."""
    rows = []
    for name, r in res.items():
        params, bits = r["pretrain"][0]["params"], sum(p["bits"] for p in r["pretrain"]) / len(seeds)
        cells = [name, fmt(params), f"`{' '.join(sizes[name])}`",
                 f"{scale_lr(6e-3, sizes[name])}, {scale_lr(2e-3, sizes[name], SCALE_SFT_LEAST)}",
                 spread([p["knowledge_probe_accuracy"] for p in r["pretrain"]]),
                 f"{bits:,.0f}", f"{bits / params:.4f}"]
        g = scale_gains(r, IN_DOMAIN)
        cells += [spread([x[1] for x in g]), spread([x[0] for x in g]), spread([x[2] for x in g]),
                  spread([x[2] for x in scale_gains(r, CROSS_DOMAIN)]),
                  f"{sum(p['seconds'] for p in r['pretrain']) / len(seeds):.0f}s"]
        rows.append(cells)
    md = table(["model", "params", "pretrain.py flags", "peak lr: pretrain, SFT", "knowledge probe", "bits stored", "bits / param",
                "in-domain: scratch", "in-domain: pre-trained", "in-domain gain", "unasked attributes: gain",
                "pretrain time"], rows)
    if "other_people" in next(iter(res.values()))["pre"][0]:  # the cross-domain tests, beside the in-domain gain
        rows = []
        for name, r in res.items():
            cells = [name, spread([p["probe_in_domain"] for p in r["pretrain"]]),
                     spread([p["probe_other_people"] for p in r["pretrain"]]),
                     spread([x[2] for x in scale_gains(r, IN_DOMAIN)])]
            for split in OTHER:
                g = scale_gains(r, split)
                cells += [spread([x[1] for x in g]), spread([x[0] for x in g]), spread([x[2] for x in g])]
            rows.append(cells)
        md += "\n\n" + table(["model", "probe: held-out people (prose)", "probe: another hospital (records)",
                               "in-domain gain", *[f"{n}: {c}" for n in OTHER.values()
                                                   for c in ("scratch", "pre-trained", "gain")]], rows)
    return (md + f"\n\na world of {people:,} people ({people // 4:,} held out); every size pre-trained with "
            f"`{' '.join(budget)}`; SFT on {', '.join(SCALE_ATTRIBUTES)} questions (finetune.py "
            f"{' '.join(SCALE_SFT)}), seeds {', '.join(map(str, seeds))}; held-out test half, final weights; "
            "mean [min–max] over seeds.")


def plot_scale(png, res):
    """The knowledge probe and the gain over scratch (in-domain, cross-domain) against
    parameters (log x): each the mean over seeds with min–max bars."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    fig, ax = pyplot.subplots(figsize=(6.4, 4.2))
    params = [r["pretrain"][0]["params"] for r in res.values()]
    series = [("knowledge probe (pre-trained)", [[p["knowledge_probe_accuracy"] for p in r["pretrain"]]
                                                 for r in res.values()]),
              (f"SFT gain, in-domain ({', '.join(SCALE_ATTRIBUTES)})",
               [[g[2] for g in scale_gains(r, IN_DOMAIN)] for r in res.values()]),
              ("SFT gain, unasked attributes",
               [[g[2] for g in scale_gains(r, CROSS_DOMAIN)] for r in res.values()])]
    series += [(f"SFT gain, {name}", [[g[2] for g in scale_gains(r, split)] for r in res.values()])
               for split, name in OTHER.items() if split in next(iter(res.values()))["pre"][0]]
    for label, values in series:
        mean = [sum(v) / len(v) for v in values]
        bars = [[m - min(v) for m, v in zip(mean, values)], [max(v) - m for m, v in zip(mean, values)]]
        ax.errorbar(params, mean, yerr=bars, marker="o", capsize=3, label=label)
    ax.set(xscale="log", xlabel="parameters", ylabel="accuracy (held-out people)",
           title="Same pre-training tokens for every size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png + ".tmp.png", dpi=110)
    pyplot.close(fig)
    os.replace(png + ".tmp.png", png)


# ----------------------------------------------------------------------------------------
# the stability-plasticity plane: every SFT method, forgetting against held-out accuracy

# Each point is one finetune.py command, run once per seed (the SFT seed; one pre-trained
# model). --eval-interval 100 and --alphas 1 only thin what is evaluated along the way (the
# training is the same); the full-SFT run keeps every eval point and the whole line.
FAST = ["--eval-interval", "100", "--rewind", "path", "--alphas", "1"]
LINE = ["--rewind", "path", "--alphas", "0.5,0.6,0.7,0.75,0.8,0.85,0.9,0.95"]  # also the line pre-trained -> final
REWOUND = ("full SFT", "full SFT, lr 4e-3")  # the runs whose rewound points (by path, by line) are drawn
PLANE = {  # name: flags
    "full SFT": LINE,
    "full SFT, lr 4e-3": ["--lr", "4e-3"] + LINE,  # the overshoot run of verify: where rewinding pays
    "full SFT + replay 1.0": ["--replay", "1.0"] + FAST,
    "LoRA r=2 (attn)": ["--lora-rank", "2"] + FAST,
    "LoRA r=8 (attn)": ["--lora-rank", "8"] + FAST,
    "LoRA r=32 (attn)": ["--lora-rank", "32"] + FAST,
    "LoRA r=2 (attn+MLP)": ["--lora-rank", "2", "--lora-on", "attn,mlp"] + FAST,
    "LoRA r=8 (attn+MLP)": ["--lora-rank", "8", "--lora-on", "attn,mlp"] + FAST,
    "LoRA r=32 (attn+MLP)": ["--lora-rank", "32", "--lora-on", "attn,mlp"] + FAST,
    "OFT b=16 (attn)": ["--oft-block", "16"] + FAST,
    "OFT b=32 (attn)": ["--oft-block", "32"] + FAST,
    "OFT b=64 (attn)": ["--oft-block", "64"] + FAST,
    "prompt tuning, 16 tokens": ["--prompt-tokens", "16"] + FAST,
    "LoRA r=8 (attn), int8 base": ["--lora-rank", "8", "--quantize-base", "int8"] + FAST,
    "OFT b=32 (attn), int8 base": ["--oft-block", "32", "--quantize-base", "int8"] + FAST,
}


def spread(values):
    """mean [min–max] of a list of numbers."""
    return f"{sum(values) / len(values):.3f} [{min(values):.3f}–{max(values):.3f}]"


def pareto(points):
    """The points no other point beats on both axes (less forgetting AND more accuracy),
    points = [(forgetting, accuracy, name)], in order of forgetting."""
    front, best = [], -1.0
    for x, y, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y, name))
            best = y
    return front


def exp_plane(root, ckpt, seeds=3, runs=None, jobs=1, reuse=False):
    """Every SFT method on one picture: forgetting (retention loss up; knowledge probe down)
    against held-out accuracy, mean and min–max over `seeds` SFT seeds -> out/plane.png and
    a markdown table. reuse: runs whose sft.json is there are read, not run again."""
    seeds = [1337] + list(range(2, seeds + 1))
    t0 = time.time()
    todo = {f"{name}, seed {seed}": [f"{slug(name)}/seed{seed}", "--seed", str(seed), *flags]
            for name, flags in (runs or PLANE).items() for seed in seeds}
    done = sft_many(root, ckpt, todo, jobs, reuse)
    res = {name: [done[f"{name}, seed {seed}"] for seed in seeds] for name in (runs or PLANE)}
    points = plane_points(res)
    plot_plane(os.path.join(os.path.dirname(root), "plane.png"), points, res)
    rows = []
    for name, p in points.items():
        flags = (runs or PLANE).get(name.split(": ")[0], [])  # a rewound point: its run's flags
        rows.append([name, f"`{' '.join(flags)}`" if flags else "(defaults)", fmt(p["params"]), spread(p["acc"]),
                     spread(p["forget"]), spread(p["probe_drop"]), fmt(p["frozen_bytes"])])
    md = table(["point", "finetune.py --ckpt out/pretrain.pt --seed S ...", "trainable params",
                "held-out acc", "forgetting (retention loss up, nats)", "knowledge probe drop",
                "frozen projection bytes"], rows)
    mean = lambda v: sum(v) / len(v)
    fronts = []
    for key, what in (("forget", "retention loss"), ("probe_drop", "knowledge probe")):
        for label, keep in (("", lambda n: True), (", without replay", lambda n: "replay" not in n)):
            front = pareto([(mean(p[key]), mean(p["acc"]), n) for n, p in points.items() if keep(n)])
            fronts.append(f"Pareto frontier ({what}{label}): {'; '.join(n for *_, n in front)}.")
    return (md + f"\n\nseeds {', '.join(map(str, seeds))} (SFT seeds, one pre-trained model); mean [min–max]. "
            "Forgetting is measured from the pre-trained model (full precision, no prefix)."
            "\n\n" + "\n".join(fronts) + f"\n\nwall time {time.time() - t0:.0f}s, {jobs} run(s) at a time"
            + (" (--reuse: runs already there were read)." if reuse else "."))


def baseline(res):
    """The run whose step 0 is the pre-trained model itself: one with neither a prompt (its
    step 0 has a random prefix in front) nor an int8 base (its step 0 is already rounded)."""
    runs = [r for rs in res.values() for r in rs]
    return next((r for r in runs if not r.get("prompt_tokens") and r.get("quantize_base", "none") == "none"), runs[0])


def plane_points(res):
    """{point name: {"acc", "forget", "probe_drop": a list over seeds, "params", "frozen_bytes"}}:
    each run's final weights; for the REWOUND runs also their rewound points (by path, by line).
    Forgetting is counted from one baseline, the pre-trained model itself (`baseline`),
    from which every run starts."""
    base = baseline(res)
    ret0, probe0 = base["retention_val_loss_before"], base["knowledge_probe_before"]
    points = {}

    def add(name, r, acc, ret, probe):
        p = points.setdefault(name, {"acc": [], "forget": [], "probe_drop": [], "params": r["trainable_params"],
                                     "frozen_bytes": r.get("frozen_bytes")})
        p["acc"].append(acc)
        p["forget"].append(ret - ret0)
        p["probe_drop"].append(probe0 - probe)
    for name, rs in res.items():
        for r in rs:
            add(name, r, r["heldout_accuracy_final"], r["retention_val_loss_final"], r["knowledge_probe_final"])
            if name in REWOUND:
                for how in ("path", "interpolate"):
                    q = r[f"rewind_{how}"]
                    add(f"{name}: rewound by {'path' if how == 'path' else 'interpolation'}", r, q["heldout"],
                        q["retention"], q["probe"])
    return points


MARKERS = (("prompt", "*"), ("int8", "X"), ("OFT", "^"), ("attn+MLP", "D"), ("LoRA", "s"), ("replay", "P"), ("", "o"))


def plot_plane(png, points, res):
    """Two panels (forgetting as retention loss, and as knowledge-probe drop) against held-out
    accuracy: each point's mean with min–max bars, a marker per method (area ~ log trainable
    parameters), the Pareto frontier, and the full-SFT paths and lines of the first seed."""
    import math
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    mean = lambda v: sum(v) / len(v)
    b0 = baseline(res)
    fig, axes = pyplot.subplots(1, 2, figsize=(17, 7.5), constrained_layout=True)
    colors = pyplot.get_cmap("tab20").colors
    for ax, key, label in ((axes[0], "forget", "forgetting: retention loss, after minus pre-trained (nats)"),
                           (axes[1], "probe_drop", "forgetting: knowledge probe, pre-trained minus after")):
        fx = (lambda q: q["retention"] - b0["retention_val_loss_before"]) if key == "forget" else \
            (lambda q: b0["knowledge_probe_before"] - q["probe"])
        # finetune.py measures the knowledge probe at the ends and the rewound points only: the
        # probe panel draws the path and the line through those
        measured = (lambda qs: qs) if key == "forget" else (lambda qs: [q for q in qs if q.get("probe") is not None])
        for name, grey in zip(REWOUND, ("0.65", "0.35")):
            full = res.get(name, [None])[0]
            if not full:
                continue
            path, line = measured(full["path"]), measured(full["interpolation"] or [])
            ax.plot([fx(q) for q in path], [q["heldout"] for q in path], "-", color=grey, lw=1,
                    label=f"{name}: path (seed 1337)")
            if line:
                ax.plot([fx(q) for q in line], [q["heldout"] for q in line], ":",
                        color=grey, lw=1.2, label=f"{name}: line pre-trained -> final (seed 1337)")
        for i, (name, p) in enumerate(points.items()):
            x, y = mean(p[key]), mean(p["acc"])
            marker = next(m for word, m in MARKERS if word in name)
            ax.errorbar(x, y, xerr=[[x - min(p[key])], [max(p[key]) - x]], yerr=[[y - min(p["acc"])], [max(p["acc"]) - y]],
                        fmt=marker, ms=3 + 2 * math.log10(max(10, p["params"])), color=colors[i % 20], alpha=0.9,
                        label=f"{name} ({p['params']:,} trainable)")
            ax.annotate(str(i + 1), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        front = pareto([(mean(p[key]), mean(p["acc"]), n) for n, p in points.items()])
        ax.plot([f[0] for f in front], [f[1] for f in front], "--", color="k", lw=1.2, label="Pareto frontier")
        ax.set(xlabel=label, ylabel="held-out accuracy (test half)", ylim=(0.6, 1.01))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # the lines first, then the points in order
    n_lines = len(labels) - len(points)
    labels = labels[:n_lines] + [f"{i + 1}. {t}" for i, t in enumerate(labels[n_lines:])]
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    fig.suptitle("stability (x: less forgetting to the left) vs plasticity (y): mean over seeds, min–max bars")
    fig.savefig(png + ".tmp.png", dpi=110)
    pyplot.close(fig)
    os.replace(png + ".tmp.png", png)


PROMPT = {  # prompt tuning's remedies, one at a time from the default (16 tokens, lr 3e-2)
    "full SFT (for the time)": FAST,
    "16 tokens, prefix only (new rows frozen)": ["--prompt-tokens", "16", "--new-rows", "freeze"] + FAST,
    "16 tokens (new rows train)": ["--prompt-tokens", "16"] + FAST,
    "64 tokens": ["--prompt-tokens", "64"] + FAST,
    "16 tokens from task words": ["--prompt-tokens", "16", "--prompt-init", "task"] + FAST,
    "16 tokens through an MLP (256)": ["--prompt-tokens", "16", "--prompt-mlp", "256"] + FAST,
    "16 tokens, lr 1e-2": ["--prompt-tokens", "16", "--lr", "1e-2"] + FAST,
    "16 tokens, 900 steps": ["--prompt-tokens", "16", "--max-iters", "900"] + FAST,
}


def exp_prompt(root, ckpt, jobs=1):
    """Prompt tuning's known remedies, each alone, against full SFT's accuracy and time."""
    done = sft_many(root, ckpt, {name: [slug(name), *flags] for name, flags in PROMPT.items()}, jobs)
    rows, base = [], None
    for name, flags in PROMPT.items():
        r = done[name]
        base = base or r
        rows.append([name, f"`{' '.join(flags[:len(flags) - len(FAST)]) or '(defaults)'}`", fmt(r["trainable_params"]),
                     fmt(r["heldout_accuracy_final"]), fmt(r["degenerate_rate_final"]),
                     f"{r['train_seconds']:.0f}s ({r['train_seconds'] / base['train_seconds']:.1f}x)"])
    return table(["prompt tuning", "flags", "trainable params", "held-out acc (final)", "degenerate answers",
                  "train time (x full SFT)"], rows)


EXPERIMENTS = {"plane": exp_plane, "prompt": exp_prompt, "sft": exp_sft, "labels": exp_labels,
               "overshoot": exp_overshoot, "scale": exp_scale, "dpo": exp_dpo}


def verify(out_dir, seeds, dtype, tiny=False, reuse=False, only=None, jobs=1):
    """Every claim on every seed -> out/verify.md, out/verify.json; 1 when a claim fails.
    only="pretrain": pre-train each seed and judge only the pre-training claims (a cheap
    sweep over many seeds), `jobs` seeds side by side on cores/jobs threads each."""
    sys.path.insert(0, HERE)
    import nanosft  # (imported here: it sets the OpenMP wait policy of this process)
    dtype = nanosft.pick_dtype(nanosft.pick_device("auto"), dtype)
    root = os.path.join(out_dir, "verify", dtype)
    common = ["--dtype", dtype] + (["--device", "cpu"] if tiny else [])
    extra = lambda script: TINY[script] if tiny else []
    threads = threads_for(jobs)
    print(f"verify: seeds {', '.join(map(str, seeds))} | dtype {dtype}" + (f" | only {only}" if only else ""),
          flush=True)

    def one_seed(seed):
        d = os.path.join(root, f"seed{seed}")
        s = ["--seed", str(seed), "--out-dir"]
        t0 = time.time()
        log = os.path.join(d, "log.txt")

        def stage(script, out, done, *a):  # --reuse: a stage whose JSON is there is not run again
            if reuse and os.path.isfile(os.path.join(out, done)):
                print(f"reusing {os.path.join(out, done)}", flush=True)
            else:
                run(script, *a, *s, out, *common, *extra(script), log=log, threads=threads)
        stage("pretrain.py", d, "pretrain.json")
        if only == "pretrain":
            with open(os.path.join(d, "pretrain.json")) as f:
                values = pretrain_values(json.load(f))
            print(f"seed {seed}: probe {values['probe']:.3f} | reaches 0.90 at {values['probe_reach']:.2f} of "
                  f"the steps | {time.time() - t0:.0f}s", flush=True)
            return seed, values
        pre = os.path.join(d, "pretrain.pt")
        stage("finetune.py", d, "sft.json", "--ckpt", pre)
        stage("dpo.py", d, "dpo.json", "--ckpt", os.path.join(d, "sft.pt"))
        wall = time.time() - t0
        stage("finetune.py", os.path.join(d, "scratch"), "sft.json", "--ckpt", pre, "--init", "scratch")
        stage("finetune.py", os.path.join(d, "overshoot"), "sft.json", "--ckpt", pre, *OVERSHOOT)
        values = seed_values(d)
        print(f"seed {seed}: pipeline {wall:.0f}s wall ({values['pipeline_seconds']:.0f}s in the stages)", flush=True)
        return seed, values
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(jobs) as pool:
        per_seed = dict(pool.map(one_seed, seeds))
    rows = judge(per_seed)
    m = machine()
    head = (f"CPU: {m['cpu']}, {m['cores']} cores | torch {m['torch']} | python {m['python']} | dtype {dtype}"
            f" | seeds {', '.join(map(str, seeds))}" + (f" | only {only}, {jobs} at a time" if only else ""))
    num = lambda v: "never" if v == math.inf else f"{v:.0f}" if abs(v) >= 100 else f"{v:.3f}"
    md = table(["claim", "threshold", *[f"seed {s}" for s in seeds], "min–max", "mean", "worst seed", "result"],
               [[r["claim"], r["threshold"], *[num(v) for v in r["values"]], f"{num(r['min'])}–{num(r['max'])}",
                 num(r["mean"]), f"{r['worst_seed']}: {num(r['worst'])}" if "worst" in r else "",
                 f"**{r['result']}**" if r["result"] == "FAIL" else r["result"]] for r in rows])
    for r in rows:
        print(f"{r['result']:4}  {r['claim']} {r['threshold']}: " + " ".join(num(v) for v in r["values"])
              + f" | min-max {num(r['min'])}-{num(r['max'])} | mean {num(r['mean'])}"
              + (f" | worst seed {r['worst_seed']}: {num(r['worst'])}" if "worst" in r else ""))
    judged = [r for r in rows if r["result"] != "info"]
    failed = [r["claim"] for r in judged if r["result"] == "FAIL"]
    print(head)
    print(f"{len(failed)} of {len(judged)} claims FAIL" if failed else f"all {len(judged)} claims PASS on every seed")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "verify.md"), "w") as f:
        f.write(head + "\n\n" + md + "\n")
    with open(os.path.join(out_dir, "verify.json"), "w") as f:
        json.dump({"machine": m, "dtype": dtype, "seeds": seeds, "only": only, "claims": rows,
                   "per_seed": per_seed}, f, indent=1)
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["sft", "labels", "overshoot", "scale", "dpo", "plane", "prompt", "verify"])
    ap.add_argument("--seeds", default=None, help="plane: how many seeds (1337, 2, 3, ...; default 3); verify: "
                    "that, or a range A-B or a list A,B,C (one seed: A,); seeds 101-110 were kept out of tuning; "
                    "scale: a range or list (default SCALE_SEEDS)")
    ap.add_argument("--only", choices=["pretrain"], default=None,
                    help="verify: only pre-train each seed and judge the pre-training claims (a cheap sweep)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="verify: the stages' --dtype (auto: bf16 where the CPU runs it natively)")
    ap.add_argument("--tiny", action="store_true", help="verify: a tiny configuration (for the tests)")
    ap.add_argument("--reuse", action="store_true",
                    help="verify, plane, scale: keep the runs whose output JSON is already in out/ (to finish "
                    "an interrupted run, or to rerun one after deleting its JSON)")
    ap.add_argument("--ckpt", default=None, help="start checkpoint (default out/pretrain.pt; dpo: out/sft.pt)")
    ap.add_argument("--jobs", type=int, default=1, help="plane, prompt, scale, verify --only pretrain: runs side by side, each on "
                    "cores/jobs threads (2 on 2 cores: sooner; their train times then count a shared machine)")
    ap.add_argument("--people", type=int, default=SCALE_PEOPLE, help="scale: the people of its world "
                    "(data/world.py --people, a quarter held out; written under out/scale/world)")
    ap.add_argument("--out-dir", default="out")
    args = ap.parse_args()
    args.seeds_given, args.seeds = args.seeds is not None, args.seeds or "3"
    if args.which == "verify":
        if args.jobs > 1 and args.only != "pretrain":
            ap.error("verify --jobs applies to --only pretrain (the full pipeline's time claim needs the whole machine)")
        sys.exit(verify(args.out_dir, parse_seeds(args.seeds), args.dtype, args.tiny, args.reuse, args.only,
                        args.jobs))
    if args.which == "plane":
        args.seeds = int(args.seeds)
    md = EXPERIMENTS[args.which](os.path.join(args.out_dir, args.which),
                                 args.ckpt or ("out/sft.pt" if args.which == "dpo" else "out/pretrain.pt"),
                                 **({"seeds": args.seeds, "reuse": args.reuse} if args.which == "plane" else {}),
                                 **({"jobs": args.jobs} if args.which in ("plane", "prompt", "scale") else {}),
                                 **({"people": args.people, "reuse": args.reuse,
                                     "seeds": parse_seeds(args.seeds) if args.seeds_given else SCALE_SEEDS}
                                    if args.which == "scale" else {}))
    print(md)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"{args.which}.md"), "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    main()
