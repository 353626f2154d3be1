"""
The comparisons the README reports, each a set of ordinary stage-script runs whose JSON
outputs are collected into a markdown table (printed and written to out/<name>.md).

    python experiments.py sft        # full SFT vs scratch vs LoRA vs prompt tuning vs replay (~12 min)
    python experiments.py labels     # gold vs top-voted vs random-community labels (~8 min)
    python experiments.py overshoot  # embeddings trained, lr 2e-3, 600 steps: accuracy peaks, then falls
    python experiments.py scale      # three model sizes, each pre-trained, SFT'd and vs scratch (~25 min)
    python experiments.py dpo        # DPO: loss, beta, pair construction, NLL weight, seed (~8 min)

All start from out/pretrain.pt (run `python pretrain.py` first) except `scale`, which
pre-trains its own models into out/scale/, and `dpo`, which starts from out/sft.pt.
"""
import argparse
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(script, *args):
    cmd = [sys.executable, os.path.join(HERE, script), *args]
    print("$ " + " ".join(["python", script, *args]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["sft", "labels", "overshoot", "scale", "dpo"])
    ap.add_argument("--ckpt", default=None, help="start checkpoint (default out/pretrain.pt; dpo: out/sft.pt)")
    ap.add_argument("--out-dir", default="out")
    args = ap.parse_args()
    root = os.path.join(args.out_dir, args.which)
    args.ckpt = args.ckpt or ("out/sft.pt" if args.which == "dpo" else "out/pretrain.pt")
    if args.which == "dpo":
        runs = {"defaults (IPO, beta 0.05)": [], "--seed 2": ["--seed", "2"],
                "--loss sigmoid --beta 0.1 (the DPO loss)": ["--loss", "sigmoid", "--beta", "0.1"],
                "--loss sigmoid --beta 0.1 --seed 2": ["--loss", "sigmoid", "--beta", "0.1", "--seed", "2"],
                "--beta 0.1": ["--beta", "0.1"], "--pairs all": ["--pairs", "all"],
                "--rpo-alpha 0.5": ["--rpo-alpha", "0.5"]}
        rows = []
        for name, extra in runs.items():
            out = os.path.join(root, re.sub(r"[^A-Za-z0-9.]+", "_", name.split(" (")[0]).strip("_"))
            run("dpo.py", "--ckpt", args.ckpt, "--out-dir", out, *extra)
            with open(os.path.join(out, "dpo.json")) as f:
                r = json.load(f)
            rows.append([name, fmt(r["pairs_train"]), fmt(r["pref_accuracy_heldout"]), fmt(r["style_rate_after"]),
                         fmt(r["heldout_accuracy_after"]), fmt(r["kl"], 2), f"{r['seconds']:.0f}s"])
        md = table(["dpo.py run", "training pairs", "held-out pref. acc", "style rate after",
                    "held-out task acc after", "KL", "time"], rows)
    elif args.which == "sft":
        runs = {"full SFT": [], "from scratch (no pre-training)": ["--init", "scratch", "--lr", "1e-3"],
                "LoRA r=8 (attention)": ["--lora-rank", "8", "--lr", "3e-3"],
                "LoRA r=8 (attention + MLP)": ["--lora-rank", "8", "--lora-on", "attn,mlp", "--lr", "3e-3"],
                "prompt tuning, 16 tokens": ["--prompt-tokens", "16", "--lr", "3e-2"],
                "full SFT + replay 1.0": ["--replay", "1.0"]}
        slug = lambda n: re.sub(r"[^A-Za-z0-9]+", "_", n).strip("_")
        rows = [sft_row(n, sft(root, slug(n), args.ckpt, *a)) for n, a in runs.items()]
        md = table(SFT_HEADER, rows)
    elif args.which == "labels":
        rows = []
        for labels in ("gold", "top-voted", "random-community"):
            r = sft(root, labels, args.ckpt, "--labels", labels)
            rows.append([labels, fmt(r["heldout_accuracy"]), fmt(r["train_accuracy"]),
                         fmt(r["retention_val_loss_rewound"])])
        md = table(["SFT labels", "held-out acc", "training-people acc", "retention loss"], rows)
    elif args.which == "overshoot":
        r = sft(root, "emb_lr2e-3", args.ckpt, "--train-embeddings", "--lr", "2e-3", "--max-iters", "600",
                "--eval-interval", "50")
        peak, final, rew = r["heldout_accuracy_peak"], r["heldout_accuracy_final"], r["heldout_accuracy_rewound"]
        recovered = (rew - final) / (peak - final) if peak > final else float("nan")
        md = table(["", "held-out acc", "retention loss", "step"],
                   [["peak along the path", fmt(peak), "", ""],
                    ["final", fmt(final), fmt(r["retention_val_loss_final"]), fmt(r["steps"])],
                    ["rewound (out/overshoot/emb_lr2e-3/sft.pt)", fmt(rew), fmt(r["retention_val_loss_rewound"]),
                     fmt(r["rewound_step"])]])
        md += f"\n\nrewinding recovers {100 * recovered:.0f}% of the accuracy lost between the peak and the final step."
    else:
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
            scratch = sft(pre_dir, "scratch", ck, "--init", "scratch", "--lr", "1e-3")
            rows.append([name, fmt(pre["total_params"]), fmt(probe), fmt(scratch["heldout_accuracy"]),
                         fmt(pre["heldout_accuracy"]), fmt(pre["heldout_accuracy"] - scratch["heldout_accuracy"])])
        md = table(["model", "params", "knowledge probe", "held-out acc, SFT from scratch",
                    "held-out acc, SFT from pre-trained", "gain from pre-training"], rows)
    print(md)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"{args.which}.md"), "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    main()
