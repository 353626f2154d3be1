"""
The comparisons the README reports, each a set of ordinary stage-script runs whose JSON
outputs are collected into a markdown table (printed and written to out/<name>.md).

    python experiments.py sft        # full SFT vs scratch vs LoRA vs prompt tuning vs replay (~12 min)
    python experiments.py labels     # gold vs top-voted vs random-community labels (~8 min)
    python experiments.py overshoot  # SFT at 1.5x the learning rate, rewound along the pre-trained -> final line
    python experiments.py scale      # three model sizes, each pre-trained, SFT'd and vs scratch (~25 min)
    python experiments.py dpo        # DPO: loss, beta, pair construction, NLL weight, seed (~8 min)
    python experiments.py verify --seeds 3 [--dtype float32]
                                     # the whole default pipeline + a scratch SFT per seed: one
                                     # PASS/FAIL line per README headline (~8 min a seed in fp32)

All start from out/pretrain.pt (run `python pretrain.py` first) except `scale`, which
pre-trains its own models into out/scale/, `dpo`, which starts from out/sft.pt, and `verify`,
which runs everything itself into out/verify/.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run(script, *args, log=None):
    """Run a stage script; its output goes to the file `log` (appended) or nowhere."""
    cmd = [sys.executable, os.path.join(HERE, script), *args]
    print("$ " + " ".join(["python", script, *args]), flush=True)
    if log:
        os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    with open(log, "a") if log else open(os.devnull, "w") as out:
        subprocess.run(cmd, check=True, stdout=out)


def sft(out_root, name, ckpt, *extra):
    out = os.path.join(out_root, name)
    run("finetune.py", "--ckpt", ckpt, "--out-dir", out, *extra)
    with open(os.path.join(out, "sft.json")) as f:
        return json.load(f)


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
    ("sft_heldout", "SFT held-out accuracy, test half, rewound checkpoint", 0.90, ">="),
    ("scratch_over_chance", "SFT from scratch minus chance (best of rewound and final)", 0.05, "<="),
    ("rewound_minus_final", "SFT rewound minus final held-out accuracy", -0.01, ">="),
    ("overshoot_peak", "overshoot run: peak held-out accuracy along its path", 0.90, ">="),
    ("overshoot_rewound_minus_final", "overshoot run: rewound minus final held-out accuracy", -0.01, ">="),
    ("overshoot_retention_gap", "overshoot run: retention loss, final minus rewound (nats)", 0.10, ">="),
    ("dpo_clean_style", "DPO clean style rate (test half)", 0.90, ">="),
    ("dpo_degenerate", "DPO degenerate rate (test half)", 0.01, "<="),
    ("dpo_pref", "DPO preference accuracy, pairs of people never trained on", 0.90, ">="),
    ("dpo_task_change", "DPO held-out task accuracy, after minus before", -0.01, ">="),
    ("pipeline_seconds", "default pipeline seconds (pretrain + finetune + dpo)", 600, "<="),
]
INFO = [  # reported beside the claims, not judged
    ("retention_gap", "SFT default run: retention loss, final minus rewound (nats)"),
    ("sft_rewound_step", "SFT default run: rewound step (300 = the final one)"),
    ("sft_degenerate", "SFT degenerate rate (test half, rewound)"),
    ("overshoot_rewound_alpha", "overshoot run: rewound alpha on the line pre-trained -> final"),
    ("dpo_rewound_step", "DPO rewound step"),
    ("dpo_style_loose", "DPO answers that end with the closing (loose)"),
    ("dpo_kl", "DPO KL(policy ‖ reference), nats per answer"),
]
# the overshoot run: the default SFT pushed harder (a 1.5x learning rate), rewound along the
# line from the pre-trained to the final weights
OVERSHOOT = ["--lr", "1.5e-3", "--rewind", "interpolate"]
# a tiny configuration, for the test that runs verify end to end in seconds
TINY = {"pretrain.py": ["--max-iters", "20", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                        "--eval-interval", "20", "--vocab-size", "600"],
        "finetune.py": ["--max-iters", "4", "--eval-interval", "4", "--batch-size", "4", "--warmup", "1",
                        "--alphas", "0.8"],
        "dpo.py": ["--max-iters", "4", "--eval-interval", "4", "--batch-size", "4", "--warmup", "1"]}


def seed_values(d):
    """The claims' values from one seed's JSON outputs (folder d)."""
    load = lambda *p: json.load(open(os.path.join(d, *p)))
    pre, sft, scratch, dpo = load("pretrain.json"), load("sft.json"), load("scratch", "sft.json"), load("dpo.json")
    over = load("overshoot", "sft.json")
    return {"probe": pre["knowledge_probe_accuracy"],
            "sft_heldout": sft["heldout_accuracy"],
            "scratch_over_chance": max(scratch["heldout_accuracy"], scratch["heldout_accuracy_final"])
            - scratch["chance_accuracy"],
            "rewound_minus_final": sft["heldout_accuracy_rewound"] - sft["heldout_accuracy_final"],
            "retention_gap": sft["retention_val_loss_final"] - sft["retention_val_loss_rewound"],
            "dpo_clean_style": dpo["clean_style_rate_after"], "dpo_degenerate": dpo["degenerate_rate_after"],
            "dpo_pref": dpo["pref_accuracy_heldout"],
            "dpo_task_change": dpo["heldout_accuracy_after"] - dpo["heldout_accuracy_before"],
            "pipeline_seconds": pre["seconds"] + sft["seconds"] + dpo["seconds"],
            "overshoot_peak": max(p["heldout"] for p in over["path"]),
            "overshoot_rewound_minus_final": over["heldout_accuracy_rewound"] - over["heldout_accuracy_final"],
            "overshoot_retention_gap": over["retention_val_loss_final"] - over["retention_val_loss_rewound"],
            "sft_degenerate": sft["degenerate_rate"], "sft_rewound_step": sft["rewound_step"],
            "overshoot_rewound_alpha": over["rewound_alpha"],
            "dpo_rewound_step": dpo["rewound_step"], "dpo_style_loose": dpo["style_rate_after"],
            "dpo_kl": dpo["kl"]}


def judge(per_seed):
    """per_seed: {seed: {key: value}} -> one row per claim: values, min, max, mean, PASS/FAIL.
    PASS only when every seed meets the threshold."""
    rows = []
    for key, text, thr, op in CLAIMS:
        vals = [v[key] for v in per_seed.values()]
        ok = all((x >= thr) if op == ">=" else (x <= thr) for x in vals) and bool(vals)
        rows.append({"key": key, "claim": text, "threshold": f"{op} {thr:g}", "values": vals,
                     "min": min(vals), "max": max(vals), "mean": sum(vals) / len(vals),
                     "result": "PASS" if ok else "FAIL"})
    for key, text in INFO:
        vals = [v[key] for v in per_seed.values() if v[key] is not None] or [float("nan")]
        rows.append({"key": key, "claim": text, "threshold": "", "values": vals, "min": min(vals),
                     "max": max(vals), "mean": sum(vals) / len(vals), "result": "info"})
    return rows


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
    slug = lambda n: re.sub(r"[^A-Za-z0-9]+", "_", n).strip("_")
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
    r = sft(root, "lr1.5e-3", ckpt, *OVERSHOOT)
    peak, final, rew = max(p["heldout"] for p in r["path"]), r["heldout_accuracy_final"], r["heldout_accuracy_rewound"]
    md = table(["", "held-out acc (test half)", "retention loss", "where"],
               [["peak along the path", fmt(peak), "", ""],
                ["final", fmt(final), fmt(r["retention_val_loss_final"]), f"step {r['steps']}"],
                ["rewound (out/overshoot/lr1.5e-3/sft.pt)", fmt(rew), fmt(r["retention_val_loss_rewound"]),
                 r["rewound"]]])
    md += (f"\n\nrewinding saves {r['retention_val_loss_final'] - r['retention_val_loss_rewound']:.3f} nats of "
           f"retention loss at {100 * (rew - final):+.1f} points of held-out accuracy.")
    return md


def exp_scale(root, ckpt):
    """Three model sizes, each pre-trained, then fine-tuned from its weights and from scratch. -> a markdown table."""
    rows = []
    sizes = {"tiny (L1 C64)": ["--n-layer", "1", "--n-head", "2", "--n-embd", "64"],
             "small (L2 C128)": ["--n-layer", "2", "--n-head", "2", "--n-embd", "128"],
             "default (L4 C256)": ["--n-layer", "4", "--n-head", "4", "--n-embd", "256"]}
    for name, arch in sizes.items():
        tag = name.split()[0]
        pre_dir = os.path.join(root, tag)
        run("pretrain.py", "--out-dir", pre_dir, *arch)
        with open(os.path.join(pre_dir, "pretrain.json")) as f:
            probe = json.load(f)["knowledge_probe_accuracy"]
        ck = os.path.join(pre_dir, "pretrain.pt")
        pre = sft(pre_dir, "sft", ck)
        scratch = sft(pre_dir, "scratch", ck, "--init", "scratch")
        rows.append([name, fmt(pre["total_params"]), fmt(probe), fmt(scratch["heldout_accuracy"]),
                     fmt(pre["heldout_accuracy"]), fmt(pre["heldout_accuracy"] - scratch["heldout_accuracy"])])
    md = table(["model", "params", "knowledge probe", "held-out acc, SFT from scratch",
                "held-out acc, SFT from pre-trained", "gain from pre-training"], rows)
    return md


EXPERIMENTS = {"sft": exp_sft, "labels": exp_labels, "overshoot": exp_overshoot, "scale": exp_scale, "dpo": exp_dpo}


def verify(out_dir, n_seeds, dtype, tiny=False, reuse=False):
    """Every claim on every seed -> out/verify.md, out/verify.json; 1 when a claim fails."""
    sys.path.insert(0, HERE)
    import nanosft as ns
    dtype = ns.pick_dtype(ns.pick_device("auto"), dtype)
    seeds = [1337] + list(range(2, n_seeds + 1))
    root = os.path.join(out_dir, "verify", dtype)
    common = ["--dtype", dtype] + (["--device", "cpu"] if tiny else [])
    extra = lambda script: TINY[script] if tiny else []
    per_seed = {}
    for seed in seeds:
        d = os.path.join(root, f"seed{seed}")
        s = ["--seed", str(seed), "--out-dir"]
        t0 = time.time()
        log = os.path.join(d, "log.txt")

        def stage(script, out, done, *a):  # --reuse: a stage whose JSON is there is not run again
            if reuse and os.path.isfile(os.path.join(out, done)):
                print(f"reusing {os.path.join(out, done)}", flush=True)
            else:
                run(script, *a, *s, out, *common, *extra(script), log=log)
        pre = os.path.join(d, "pretrain.pt")
        stage("pretrain.py", d, "pretrain.json")
        stage("finetune.py", d, "sft.json", "--ckpt", pre)
        stage("dpo.py", d, "dpo.json", "--ckpt", os.path.join(d, "sft.pt"))
        wall = time.time() - t0
        stage("finetune.py", os.path.join(d, "scratch"), "sft.json", "--ckpt", pre, "--init", "scratch")
        stage("finetune.py", os.path.join(d, "overshoot"), "sft.json", "--ckpt", pre, *OVERSHOOT)
        per_seed[seed] = seed_values(d)
        print(f"seed {seed}: pipeline {wall:.0f}s wall ({per_seed[seed]['pipeline_seconds']:.0f}s in the stages)",
              flush=True)
    rows = judge(per_seed)
    m = machine()
    head = (f"CPU: {m['cpu']}, {m['cores']} cores | torch {m['torch']} | python {m['python']} | dtype {dtype}"
            f" | seeds {', '.join(map(str, seeds))}")
    num = lambda v: f"{v:.0f}" if abs(v) >= 100 else f"{v:.3f}"
    md = table(["claim", "threshold", *[f"seed {s}" for s in seeds], "min–max", "mean", "result"],
               [[r["claim"], r["threshold"], *[num(v) for v in r["values"]], f"{num(r['min'])}–{num(r['max'])}",
                 num(r["mean"]), f"**{r['result']}**" if r["result"] == "FAIL" else r["result"]] for r in rows])
    for r in rows:
        print(f"{r['result']:4}  {r['claim']} {r['threshold']}: " + " ".join(num(v) for v in r["values"])
              + f" | min-max {num(r['min'])}-{num(r['max'])} | mean {num(r['mean'])}")
    failed = [r["claim"] for r in rows if r["result"] == "FAIL"]
    print(head)
    print(f"{len(failed)} of {len(CLAIMS)} claims FAIL" if failed else f"all {len(CLAIMS)} claims PASS on every seed")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "verify.md"), "w") as f:
        f.write(head + "\n\n" + md + "\n")
    with open(os.path.join(out_dir, "verify.json"), "w") as f:
        json.dump({"machine": m, "dtype": dtype, "seeds": seeds, "claims": rows, "per_seed": per_seed}, f, indent=1)
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["sft", "labels", "overshoot", "scale", "dpo", "verify"])
    ap.add_argument("--seeds", type=int, default=3, help="verify: how many seeds (1337, 2, 3, ...)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="verify: the stages' --dtype (auto: bf16 where the CPU runs it natively)")
    ap.add_argument("--tiny", action="store_true", help="verify: a tiny configuration (for the tests)")
    ap.add_argument("--reuse", action="store_true",
                    help="verify: keep the stages whose output JSON is already in out/verify/ (to finish "
                    "an interrupted run, or to rerun one stage after deleting its JSON)")
    ap.add_argument("--ckpt", default=None, help="start checkpoint (default out/pretrain.pt; dpo: out/sft.pt)")
    ap.add_argument("--out-dir", default="out")
    args = ap.parse_args()
    if args.which == "verify":
        sys.exit(verify(args.out_dir, args.seeds, args.dtype, args.tiny, args.reuse))
    md = EXPERIMENTS[args.which](os.path.join(args.out_dir, args.which),
                                 args.ckpt or ("out/sft.pt" if args.which == "dpo" else "out/pretrain.pt"))
    print(md)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"{args.which}.md"), "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    main()
