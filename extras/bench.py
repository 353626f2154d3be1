"""
Throughput and efficiency figures, each measured as a ratio inside one run.

    python -m extras.bench --quick --json bench.json   # 2-5 minutes
    python -m extras.bench                             # more rounds, plus the whole pipeline end to end
    python -m extras.bench --nanogpt /tmp/nanoGPT      # also time karpathy/nanoGPT's model.py (a checkout)
    python -m extras.bench --compile                   # also time the training step under torch.compile

What it measures (targets in TARGETS below):
  mfu_fp32           a training step (forward, backward, clip, AdamW) of a GPT with 6 layers,
                     6 heads, 384 channels, 256 tokens x 16 rows, vocab 4096, in fp32: model
                     FLOPs per second over this CPU's fp32 matmul peak, which is a 1024x1024
                     matmul timed in the same run. FLOPs per token = 6 N + 12 L C T (N: the
                     parameters without the position table; the second term is attention,
                     counted as in nanoGPT's estimate_mfu).
  bf16_speedup       tokens/s of the same step under bf16 autocast over fp32; only where the
                     CPU multiplies bf16 in hardware (elsewhere bf16 is emulated and slow).
  kv_cache_speedup   256 new tokens after a 64-token prompt, greedy, decoded with the KV cache
                     vs re-running the whole prefix for every token (the same GPT, block 320).
  dpo_step_ratio     a DPO step over an SFT step on the same tokens (reference log-probs cached,
                     as dpo.py does), on packed rows (dpo.py --pack); dpo_step_ratio_unpacked
                     the same with one row per sequence (a default run), pack_speedup the
                     default DPO step's time over the packed one's.
  pad_efficiency     real tokens over computed tokens in the SFT and DPO batches of the world data.
  bpe_train_seconds_1mb  nanosft.train_tokenizer to 4096 tokens (specials included) on 1 MB of
                     English: the help topics of the Python reference manual that ship with
                     every Python (pydoc_data.topics), then docstrings of the standard
                     library's modules, classes and functions.
  tiktoken_speedup   tiktoken's encoder over the readable Python encoder, same merges, same text.
  pipeline_seconds   pretrain.py -> finetune.py -> dpo.py with their defaults (not with --quick).

Timing on a shared machine: things compared are run in alternation, round after round, and
each keeps its fastest round. Other work on the machine only ever adds time, so the fastest
round is the closest to the code's own cost, and both sides of a ratio saw the same machine.
"""
# CPU settings: nanosft is imported before torch, so OpenMP's threads sleep while they wait, as
# in the stage scripts (export OMP_WAIT_POLICY=ACTIVE to measure OpenMP's default instead); the
# heap keeps freed memory (extras/cpu.py).
import nanosft  # noqa: I001 (first: it sets OMP_WAIT_POLICY before torch loads)
import argparse
import ast
import contextlib
import copy
import importlib.util
import io
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import regex
import torch

from data import corpus, formats, preferences
from data import world_eval, world_qa
from extras import packing
from extras.cpu import keep_freed_memory
from nanosft import cpu_has_native_bf16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's top level

TARGETS = {  # name: (comparison, value)
    "mfu_fp32": (">=", 0.85), "bf16_speedup": (">=", 1.6), "kv_cache_speedup": (">=", 5.0),
    "dpo_step_ratio": ("<=", 1.15), "pad_efficiency": (">=", 0.90),
    "bpe_train_seconds_1mb": ("<=", 5.0), "tiktoken_speedup": (">=", 10.0),
    "pipeline_seconds": ("<=", 600.0),
}
BENCH_MODEL = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=4096)
BENCH_BATCH = 16


def best_times(fns, rounds):
    """Run every function once per round, in alternation; return each one's fastest time."""
    best = [math.inf] * len(fns)
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def matmul_peak(n=1024, reps=8, dtype=torch.float32):
    """fp32 (or dtype) matmul FLOPs/s of this CPU with torch's own threads: an n x n by n x n
    product."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b

    def run():
        for _ in range(reps):
            a @ b
    return run, 2 * n ** 3 * reps


def bench_peak(res, rounds):
    """The vector unit torch dispatches to and the fp32 and bf16 matmul peaks: under the
    AVX2 emulation of docs/performance.md the capability reads AVX2, the fp32 peak drops
    and bf16 is no longer faster than fp32 (no native bf16 below AVX-512)."""
    res["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    (f32, flops), (b16, flops16) = matmul_peak(), matmul_peak(reps=1, dtype=torch.bfloat16)
    t32, t16 = best_times([f32, b16], rounds)
    res["matmul_peak_gflops"] = round(flops / t32 / 1e9, 1)
    res["matmul_peak_bf16_gflops"] = round(flops16 / t16 / 1e9, 1)
    res["native_bf16"] = cpu_has_native_bf16()


def cpu_name():
    """The CPU's name, family/model and the vector units that matter here (Linux), e.g.
    'AMD EPYC (family 25 model 17; avx2 avx512f avx512_bf16)'."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return platform.processor() or platform.machine()
    info = {k.strip(): v.strip() for k, v in info.items()}
    units = [u for u in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if u in info.get("flags", "").split()]
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}; {' '.join(units)})"


# ----------------------------------------------------------------------------------------
# training step: MFU, bf16, nanoGPT, torch.compile


def train_step(model, optimizer, x, y, dtype="float32"):
    """One optimizer step as the stages take it: forward, backward, clip, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with nanosft.autocast(torch.device("cpu"), dtype):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step()  # warm-up: the first step allocates the optimizer state and the buffers
    return step


def load_nanogpt(path):
    """karpathy/nanoGPT's model.py from a checkout (or the file itself), imported by path."""
    file = os.path.join(path, "model.py") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no nanoGPT model.py there")
    spec = importlib.util.spec_from_file_location("nanogpt_model", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_training(res, rounds, nanogpt=None, compile_too=False):
    torch.manual_seed(0)
    cfg = nanosft.GPTConfig(**BENCH_MODEL)
    B, T, L, C = BENCH_BATCH, cfg.block_size, cfg.n_layer, cfg.n_embd
    x = torch.randint(0, cfg.vocab_size, (B, T))
    y = torch.randint(0, cfg.vocab_size, (B, T))
    model = nanosft.GPT(cfg)
    n = model.num_params() - model.wpe.weight.numel()
    flops = (6 * n + 12 * L * C * T) * B * T  # per step
    peak_fn, peak_flops = matmul_peak()
    names, fns = ["fp32"], [train_step(model, nanosft.configure_optimizer(model, 1e-4), x, y)]
    native_bf16 = cpu_has_native_bf16()
    if native_bf16:
        m16 = copy.deepcopy(model)
        names.append("bf16")
        fns.append(train_step(m16, nanosft.configure_optimizer(m16, 1e-4), x, y, "bfloat16"))
    else:
        res["bf16_speedup"] = None
        res["bf16_speedup_reason"] = "this CPU has no native bf16 matmul (AVX512-BF16/AMX): bf16 is emulated"
    if nanogpt:
        try:
            mod = load_nanogpt(nanogpt)
            with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts
                torch.manual_seed(0)
                ng = mod.GPT(mod.GPTConfig(**BENCH_MODEL, dropout=0.0, bias=False))
                ng_opt = ng.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")
            names.append("nanogpt")
            fns.append(train_step(ng, ng_opt, x, y))
        except Exception as e:
            res["nanogpt_error"] = f"{type(e).__name__}: {e}"
    if compile_too:
        mc = copy.deepcopy(model)
        t = time.perf_counter()
        step = train_step(torch.compile(mc), nanosft.configure_optimizer(mc, 1e-4), x, y)
        step()  # compiles forward and backward on the first calls
        res["compile_warmup_seconds"] = round(time.perf_counter() - t, 1)
        names.append("compiled")
        fns.append(step)
    # the peak is timed again before every contestant: it is short, and more chances to
    # catch a quiet moment keep a busy machine from understating it (and inflating MFU)
    times = best_times([f for g in fns for f in (peak_fn, g)], rounds)
    best = dict(zip(names, times[1::2]))
    best["peak"] = min(times[0::2])
    peak = peak_flops / best["peak"]
    res["matmul_peak_gflops"] = round(peak / 1e9, 1)
    res["train_flops_per_step"] = flops
    res["train_params"] = n
    res["step_seconds_fp32"] = round(best["fp32"], 3)
    res["tokens_per_s_fp32"] = round(B * T / best["fp32"])
    res["mfu_fp32"] = round(flops / best["fp32"] / peak, 3)
    if "bf16" in best:
        res["tokens_per_s_bf16"] = round(B * T / best["bf16"])
        res["bf16_speedup"] = round(best["fp32"] / best["bf16"], 2)
    if "nanogpt" in best:
        res["mfu_fp32_nanogpt"] = round(flops / best["nanogpt"] / peak, 3)
        res["tokens_per_s_fp32_nanogpt"] = round(B * T / best["nanogpt"])
    if "compiled" in best:
        res["mfu_fp32_compiled"] = round(flops / best["compiled"] / peak, 3)


# ----------------------------------------------------------------------------------------
# generation with and without the KV cache


def bench_kv_cache(res, rounds, new_tokens=256):
    """Greedy decoding with the bench's GPT, its block long enough for a 64-token prompt and
    256 new tokens."""
    torch.manual_seed(0)
    cfg = nanosft.GPTConfig(**dict(BENCH_MODEL, block_size=64 + new_tokens))
    model = nanosft.GPT(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (64,)).tolist()
    outs, generate = {}, load_script("sample").generate

    def cached():
        outs["cached"] = generate(model, prompt, new_tokens, temperature=0)

    @torch.no_grad()
    def full():  # what decoding costs without a cache: the whole prefix again for every token
        ids = list(prompt)
        for _ in range(new_tokens):
            logits = model.lm_head(model.hidden(torch.tensor([ids]))[:, -1:])  # (1, 1, V)
            ids.append(int(logits[0, -1].argmax()))
        outs["full"] = ids[len(prompt):]
    t_cached, t_full = best_times([cached, full], rounds)
    if outs["cached"] != outs["full"]:
        raise AssertionError("cached and full decoding disagree")
    res["kv_cache_tokens_per_s"] = round(new_tokens / t_cached)
    res["no_cache_tokens_per_s"] = round(new_tokens / t_full)
    res["kv_cache_speedup"] = round(t_full / t_cached, 1)


# ----------------------------------------------------------------------------------------
# tokenizer: BPE training time and tiktoken vs Python encode


def english_text(n_bytes=1_000_000):
    """About n_bytes of English prose available offline on every machine with Python: the
    help topics of the language reference (pydoc_data.topics, ~0.47 MB), then docstrings of
    the standard library's modules, classes and functions (files in sorted order)."""
    from pydoc_data.topics import topics
    parts = [topics[k] for k in sorted(topics)]
    size = sum(len(p.encode()) for p in parts)
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}
    for root, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(d for d in dirs if d not in skip)  # sorted: the same text every run
        if size >= n_bytes:
            break
        for f in sorted(files):
            if size >= n_bytes:
                break
            if not f.endswith(".py"):
                continue
            try:
                with open(os.path.join(root, f), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 80:  # skip one-liners: mostly names, little prose
                        parts.append(doc)
                        size += len(doc.encode())
    return "\n\n".join(parts).encode()[:n_bytes].decode("utf-8", "ignore")


def encode_python(tok, text):
    """tok.encode in readable Python (slow): split with the regex, then inside each chunk
    repeatedly merge the adjacent pair whose merged bytes have the lowest rank, leftmost
    first -- exactly the rule tiktoken applies."""
    ids = []
    for chunk in regex.findall(tok.pattern, text):
        parts = [bytes([b]) for b in chunk.encode("utf-8")]
        while len(parts) > 1:
            ranks = [tok.ranks.get(parts[i] + parts[i + 1], math.inf) for i in range(len(parts) - 1)]
            i = min(range(len(ranks)), key=ranks.__getitem__)
            if ranks[i] == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [tok.ranks[p] for p in parts]
    return ids


def bench_tokenizer(res, rounds):
    text = english_text()
    res["bpe_text"] = "pydoc_data.topics + stdlib docstrings, Python " + platform.python_version()
    res["bpe_text_bytes"] = len(text.encode())
    best = math.inf
    for _ in range(max(1, rounds // 2)):
        t = time.perf_counter()
        tok = nanosft.train_tokenizer(text, 4096)
        best = min(best, time.perf_counter() - t)
    res["bpe_train_seconds_1mb"] = round(best, 2)
    sample = text[:100_000]  # the Python encoder is slow; 100 kB is plenty for a rate
    out = {}
    t_py, t_tk = best_times([lambda: out.update(py=encode_python(tok, sample)),
                             lambda: out.update(tk=tok.encode(sample))], max(2, rounds // 2))
    if out["py"] != out["tk"]:
        raise AssertionError("tiktoken and the Python encoder disagree")
    res["encode_python_mb_per_s"] = round(len(sample.encode()) / t_py / 1e6, 3)
    res["encode_tiktoken_mb_per_s"] = round(len(sample.encode()) / t_tk / 1e6, 2)
    res["tiktoken_speedup"] = round(t_py / t_tk, 1)


# ----------------------------------------------------------------------------------------
# SFT and DPO batches: padding and the DPO step's cost


def load_script(name):
    """A stage script as a module (imported only when its figure is measured)."""
    if not os.path.isfile(os.path.join(ROOT, f"{name}.py")):
        raise FileNotFoundError(f"{name}.py does not exist yet")
    sys.path.insert(0, ROOT)
    return __import__(name)


SEED = 1337  # the stage scripts' default --seed


def world_tokenizer():
    """The default world's tokenizer, as pretrain.py trains it, and the default GPT config."""
    pretrain = load_script("pretrain")
    tok = nanosft.train_tokenizer(corpus.read_text(world_eval.CORPUS), pretrain.WORLD_VOCAB)
    return tok, nanosft.GPTConfig(vocab_size=tok.vocab_size)


def world_pairs(tok, cfg):
    """The default DPO run's training pair examples and its defaults."""
    dpo = load_script("dpo")
    d = dpo.DEFAULTS
    (_, ex), _, _ = preferences.load_pairs(world_qa.THREADS, world_qa.EVAL_THREADS, tok, cfg.block_size,
                                       d["min_margin"], d["pairs"] == "top", False, lambda line: None,
                                       dpo.EVAL_PAIRS)
    return dpo, d, ex


def bench_padding(res, tok, cfg):
    """Real (non-pad) tokens over all tokens the model computes, over one epoch of batches."""
    try:
        finetune = load_script("finetune")
        B = finetune.DEFAULTS["batch_size"]
        ex = finetune.render_all(tok, list(enumerate(finetune.world_conversations("top-voted", SEED), 1)), cfg.block_size,
                                formats.DataReport("world"))
        lengths = [len(x) for x, _ in ex]
        r = t = 0
        for it in range(max(1, len(ex) // B)):
            X, _ = nanosft.collate([ex[i] for i in finetune.step_order(len(ex), B, SEED, it, lengths)], tok.pad)
            r, t = r + int((X != tok.pad).sum()), t + X.numel()
        res["pad_efficiency_sft"] = round(r / t, 3)
    except Exception as e:
        res["pad_efficiency_sft"] = None
        res["pad_efficiency_sft_reason"] = f"{type(e).__name__}: {e}"
    try:
        dpo, d, ex = world_pairs(tok, cfg)
        r = t = 0
        for it in range(max(1, len(ex) // d["batch_size"])):
            X, _, _ = dpo.collate_pairs([ex[i] for i in dpo.step_pair_ids(SEED, it, d["batch_size"], len(ex))], tok.pad)
            r, t = r + int((X != tok.pad).sum()), t + X.numel()
        res["pad_efficiency_dpo"] = round(r / t, 3)
    except Exception as e:
        res["pad_efficiency_dpo"] = None
        res["pad_efficiency_dpo_reason"] = f"{type(e).__name__}: {e}"
    parts = [res.get("pad_efficiency_sft"), res.get("pad_efficiency_dpo")]
    # the headline is the worse of the two stages: each must waste little on its own
    res["pad_efficiency"] = min(parts) if None not in parts else None
    if res["pad_efficiency"] is None:
        res["pad_efficiency_reason"] = "needs finetune.py and dpo.py (see the stage reasons)"


def bench_dpo_step(res, tok, cfg, rounds, n_batches=4):
    """A DPO step and an SFT step on the same rows: chosen and rejected answers of world
    preference pairs, the SFT loss on the same response tokens; the reference log-probs are
    computed once beforehand, as dpo.py caches them. Both layouts: packed rows (dpo.py --pack,
    `dpo_step_ratio`) and one row per sequence (the default run, `dpo_step_ratio_unpacked`);
    `pack_speedup`: the default DPO step's time over the packed one's."""
    try:
        dpo, d, ex = world_pairs(tok, cfg)
    except Exception as e:
        res["dpo_step_ratio"] = None
        res["dpo_step_ratio_reason"] = f"dpo.py not usable yet ({type(e).__name__}: {e})"
        return
    torch.manual_seed(0)
    model = nanosft.GPT(cfg)
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    sft_m, dpo_m = copy.deepcopy(model), copy.deepcopy(model)
    sft_opt, dpo_opt = nanosft.configure_optimizer(sft_m, 1e-5), nanosft.configure_optimizer(dpo_m, 1e-5)

    def step(m, opt, loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sft_loss(X, Y, S):  # the SFT loss of the rows: a mean over their supervised tokens
        if S is None:
            return sft_m(X, Y)[1]
        logits = packing.packed_logits(sft_m, X, packing.packed_layout(S, cfg.block_size))
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), Y.flatten(), ignore_index=-1,
                                                 reduction="none").sum() / (Y != -1).sum()

    def sft(X, Y, S, rc, rr):
        return lambda: step(sft_m, sft_opt, sft_loss(X, Y, S))

    def dpo_step(X, Y, S, rc, rr):
        return lambda: step(dpo_m, dpo_opt, dpo.pair_loss(dpo_m, X, Y, rc, rr, d["beta"], d["loss"], d["label_smoothing"],
                                                               d["rpo_alpha"], S)[0] / len(rc))
    times = {}
    for packed in (True, False):
        batches = []
        for it in range(n_batches):
            ids = dpo.step_pair_ids(SEED, it, d["batch_size"], len(ex))
            X, Y, S = dpo.collate_pairs([ex[i] for i in ids], tok.pad, packed)
            with torch.no_grad():
                rc, rr = dpo.concatenated_logprobs(ref, X, Y, S)
            batches.append((X, Y, S, rc, rr))
        fns = [f(*b) for b in batches for f in (sft, dpo_step)]  # SFT, DPO, SFT, DPO, ... per batch
        for f in fns:  # warm-up
            f()
        best = best_times(fns, 3 * rounds)  # short steps: more rounds are cheap
        times[packed] = sum(best[0::2]), sum(best[1::2])
    (t_sft, t_dpo), (u_sft, u_dpo) = times[True], times[False]
    res["sft_step_seconds"] = round(t_sft / n_batches, 4)
    res["dpo_step_seconds"] = round(t_dpo / n_batches, 4)
    res["dpo_step_ratio"] = round(t_dpo / t_sft, 3)
    res["dpo_step_seconds_unpacked"] = round(u_dpo / n_batches, 4)
    res["dpo_step_ratio_unpacked"] = round(u_dpo / u_sft, 3)
    res["pack_speedup"] = round(u_dpo / t_dpo, 3)


# ----------------------------------------------------------------------------------------
# the whole pipeline


def bench_pipeline(res, dtype):
    """The README's default pipeline, each stage with --dtype `dtype` (float32 by default:
    the ten-minute goal is set for a CPU without fast bf16)."""
    stages = [("pretrain", ["pretrain.py"]), ("finetune", ["finetune.py", "--ckpt", "{d}/pretrain.pt"]),
              ("dpo", ["dpo.py", "--ckpt", "{d}/sft.pt"])]
    res["pipeline_dtype"] = dtype
    missing = [s for s, a in stages if not os.path.isfile(os.path.join(ROOT, a[0]))]
    if missing:
        res["pipeline_seconds"] = None
        res["pipeline_reason"] = f"missing {', '.join(missing)}"
        return
    d = tempfile.mkdtemp(prefix="nanosft_bench_")
    total = 0.0
    try:
        for name, argv in stages:
            t = time.perf_counter()
            p = subprocess.run([sys.executable] + [a.format(d=d) for a in argv] + ["--out-dir", d, "--dtype", dtype],
                               cwd=ROOT, capture_output=True, text=True)
            res[f"pipeline_{name}_seconds"] = round(time.perf_counter() - t, 1)
            total += time.perf_counter() - t
            if p.returncode != 0:
                res["pipeline_seconds"] = None
                res["pipeline_reason"] = f"{name} failed (exit {p.returncode}): {p.stderr.strip()[-300:]}"
                return
        res["pipeline_seconds"] = round(total, 1)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------


def verdict(name, value):
    if name not in TARGETS:
        return ""
    if value is None:
        return "n/a"
    op, target = TARGETS[name]
    ok = value >= target if op == ">=" else value <= target
    return f"{'ok' if ok else 'MISS'} ({op} {target:g})"


def print_table(res):
    rows = [(k, v) for k, v in res.items() if not isinstance(v, (dict, list))]
    width = max(len(k) for k, _ in rows)
    print(f"\n{'figure':<{width}}  {'value':>12}  target")
    print("-" * (width + 30))
    for k, v in rows:
        shown = "null" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))
        if isinstance(v, str) and len(v) > 60:
            shown = v[:57] + "..."
        print(f"{k:<{width}}  {shown:>12}  {verdict(k, v)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and no pipeline run (2-5 minutes)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--nanogpt", default=None, help="a karpathy/nanoGPT checkout (or its model.py) to time alongside")
    ap.add_argument("--compile", action="store_true", help="also time the training step under torch.compile")
    ap.add_argument("--pipeline-dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                    help="--dtype of the pipeline's stages (default float32, the ten-minute goal's setting)")
    ap.add_argument("--rounds", type=int, default=None, help="alternation rounds per timing (default 3 quick, 6 full)")
    ap.add_argument("--only", nargs="+", metavar="SECTION",
                    help="run only these: peak training kv-cache tokenizer sft-dpo pipeline")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 6)
    res = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "torch": torch.__version__, "python": platform.python_version(),
           "load_average_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    t0 = time.perf_counter()
    def sft_dpo():
        tok, cfg = world_tokenizer()
        bench_padding(res, tok, cfg)
        bench_dpo_step(res, tok, cfg, rounds=rounds)
    # the training steps are the noisiest figure and a round costs seconds: twice the rounds
    sections = {"peak": lambda: bench_peak(res, rounds),
                "training": lambda: bench_training(res, 2 * rounds, args.nanogpt, args.compile),
                "kv-cache": lambda: bench_kv_cache(res, rounds),
                "tokenizer": lambda: bench_tokenizer(res, rounds),
                "sft-dpo": sft_dpo}
    if not args.quick:
        sections["pipeline"] = lambda: bench_pipeline(res, args.pipeline_dtype)
    for name in args.only or []:
        if name not in sections:
            raise nanosft.UserError(f"--only {name}: expected some of {', '.join(sections)}")
    for name, fn in sections.items():
        if args.only and name not in args.only:
            continue
        t = time.perf_counter()
        print(f"{name} ...", end=" ", flush=True)
        fn()
        print(f"{time.perf_counter() - t:.0f}s", flush=True)
    res["load_average_at_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    res["bench_seconds"] = round(time.perf_counter() - t0, 1)
    res["targets"] = {k: {"op": op, "value": v, "met": None if res.get(k) is None else
                          (res[k] >= v if op == ">=" else res[k] <= v)} for k, (op, v) in TARGETS.items()}
    print_table(res)
    if args.json:
        nanosft.write_json(args.json, res)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    keep_freed_memory()  # the heap setting: see extras/cpu.py
    nanosft.cli(main)
