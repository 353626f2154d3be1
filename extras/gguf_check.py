"""
Does a GGUF export run in llama.cpp as the model runs here? Checked in llama.cpp itself: the
prebuilt llama.cpp of the npm package node-llama-cpp (nothing to compile), driven by a small
Node script this file writes to a temporary folder.

    mkdir -p /tmp/llama && cd /tmp/llama && npm init -y && npm install node-llama-cpp@3   # once
    python -m extras.gguf_check --ckpt out/sft.pt --node-dir /tmp/llama

Exports the checkpoint (ours, or an HF GPT-2 directory) as f32, f16 and q8_0 GGUFs
(extras/gguf_export.py), then reports:
  (a) token ids: llama.cpp's tokenizer against ours on every held-out question of the world
      and on multilingual and edge-case text; and the GGUF's chat template, rendered by
      llama.cpp's own Jinja engine (llama-cli --jinja's) and by @huggingface/jinja, then
      tokenized with its special tokens, against nanosft.chat_prompt
  (b) next-token probabilities of the f32 file against ours at every position of the
      questions' prompts and our answers (max abs difference), with an f32 KV cache and
      with llama.cpp's default f16 one; and, to tell where a difference comes from, against
      ours run with tanh GELU (what llama.cpp's gpt2 computes) and with llama.cpp's CPU GELU
      (tanh looked up in an fp16 table)
  (c) greedy answers (sample.py --temperature 0) to --questions held-out questions, llama.cpp
      against ours; each difference with the probabilities where the answers part
  (d) the same for the f16 and q8_0 files
Exit code 1 if the token ids differ, else 0: differences in (b)-(d) are reported, not failed.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from types import SimpleNamespace

import nanosft
import numpy as np
import torch
from extras import gguf_export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# beyond the world's questions: several scripts, digits, whitespace runs, typed special tokens
TEXTS = ["Café déjà vu, naïve façade, Ærø, Łódź, Straße.", "Привет, как дела? Москва — столица России.",
         "日本語のテキスト、中文字符和한국어。", "Ελληνικά και العربية و עברית ו हिन्दी.",
         "emoji 🎉👍🏽🇺🇳 and   spaces\n\n\ttabs  ", "Don't stop; it's 12,345 or 3.14! I'LL we've",
         "typed <|assistant|> and <|endoftext|><|end|> stay <|pad|>plain text",
         "line one\nline two\r\n  indented", "", " ", "a\u00a0b\u200bc", "x" * 40]

# The Node side. It loads each file, then: tokenizes the texts (first file only), renders the
# chat template the file holds, writes the probabilities and logits of every position of every
# sequence to <name>.probs / <name>.logits (float32, one row per position), and decodes each
# prompt greedily until a stop token, the token budget or the context's end.
NODE_SCRIPT = r"""
import {createRequire} from "node:module";
import {pathToFileURL} from "node:url";
import fs from "node:fs";
import path from "node:path";

const job = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const entry = createRequire(path.join(job.node_dir, "index.js")).resolve("node-llama-cpp");
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(entry).href);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: job.threads});
const pkg = JSON.parse(fs.readFileSync(path.join(path.dirname(entry), "..", "package.json"), "utf8"));
const out = {node_llama_cpp: pkg.version, llama_cpp: llama.llamaCppRelease, models: {}};
for (const m of job.models) {
  const model = await llama.loadModel({modelPath: m.path});
  const r = {};
  if (m.tokenize) {
    r.tokens = job.texts.map((t) => Array.from(model.tokenize(t, false)));
    // the chat template the file holds, rendered by llama.cpp's own Jinja engine (llama-cli
    // --jinja's) and by @huggingface/jinja (node-llama-cpp's), then tokenized with its specials
    const source = model.fileInfo.metadata.tokenizer.chat_template;
    const engines = {
      "llama.cpp": async () => new llama._bindings.AddonJinjaRenderer(source),
      "@huggingface/jinja": async () => {
        const {Template} = await import(pathToFileURL(createRequire(entry).resolve("@huggingface/jinja")).href);
        return new Template(source);
      },
    };
    r.chat = {};
    for (const [name, make] of Object.entries(engines)) {
      try {
        const engine = await make();
        r.chat[name] = job.chats.map((messages) => {
          const text = engine.render({messages, add_generation_prompt: true});
          return {text, ids: Array.from(model.tokenize(text, true))};
        });
      } catch (e) {
        r.chat[name] = String(e);
      }
    }
  }
  const options = {contextSize: job.block_size, batchSize: job.block_size, threads: job.threads,
                   flashAttention: false};
  if (m.kv) {
    options.experimentalKvCacheKeyType = m.kv;
    options.experimentalKvCacheValueType = m.kv;
  }
  const context = await model.createContext(options);
  const seq = context.getSequence();
  const V = job.vocab_size;
  const probs = new Float32Array(job.positions * V), logits = new Float32Array(job.positions * V);
  let row = 0;
  for (const s of job.seqs) {
    await seq.clearHistory();
    const res = await seq.controlledEvaluate(s.map((t) => [t, {generateNext: {probabilities: true, logits: true}}]));
    for (const item of res) {
      for (const [t, p] of item.next.probabilities) probs[row * V + t] = p;
      for (const [t, l] of item.next.logits) logits[row * V + t] = l;
      row++;
    }
  }
  fs.writeFileSync(path.join(job.out_dir, m.name + ".probs"), Buffer.from(probs.buffer));
  fs.writeFileSync(path.join(job.out_dir, m.name + ".logits"), Buffer.from(logits.buffer));
  r.greedy = [];
  for (const prompt of job.prompts) {
    await seq.clearHistory();
    const got = [], budget = Math.min(job.max_new_tokens, job.block_size - prompt.length);
    if (budget > 0) {
      for await (const t of seq.evaluate(prompt, {temperature: 0, yieldEogToken: true})) {
        got.push(t);
        if (job.stop.includes(t) || got.length >= budget) break;
      }
    }
    r.greedy.push(got);
  }
  await context.dispose();
  await model.dispose();
  out.models[m.name] = r;
}
fs.writeFileSync(path.join(job.out_dir, "result.json"), JSON.stringify(out));
"""


def find_node_llama(node_dir):
    """The node binary and node-llama-cpp's folder, or None where either is missing."""
    node = shutil.which("node")
    pkg = os.path.join(node_dir, "node_modules", "node-llama-cpp")
    return (node, pkg) if node and os.path.isfile(os.path.join(pkg, "package.json")) else None


def heldout_questions(world_dir):
    """The world's held-out questions (data/world_eval.jsonl, split "heldout"), in file order."""
    name = os.path.join(world_dir, "world_eval.jsonl")
    if not os.path.isfile(name):
        raise nanosft.UserError(f"{name}: no such file (--world: a world directory)")
    with open(name, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["prompt"] for r in rows if r.get("split") == "heldout"]


def spread(items, n):
    """n items spread evenly over the list (all of them when it has fewer)."""
    step = max(1, len(items) // max(n, 1))
    return items[::step][:n]


def prompt_ids(tok, chat, question):
    """What sample.py feeds the model: the chat prompt, or <|endoftext|> + the text for a base model."""
    if chat:
        return nanosft.chat_prompt(tok, [{"role": "user", "content": question}])
    return [tok.endoftext] + tok.encode(question)


@torch.no_grad()
def our_rows(model, seqs):
    """(probabilities, logits) of every position of every sequence, one row per position."""
    logits = torch.cat([model(torch.tensor([s]))[0][0] for s in seqs]).double()
    return torch.softmax(logits, -1).numpy(), logits.numpy()


def with_tanh_gelu(model):
    """The same weights with GPT-2's tanh GELU: what llama.cpp's gpt2 computes."""
    twin = nanosft.GPT(dataclasses.replace(model.config, gelu="tanh"))
    twin.load_state_dict(model.state_dict())
    return twin.eval()


class TableGELU(torch.nn.Module):
    """An MLP whose GELU is computed as ggml's CPU code does (ggml_vec_gelu_f32): the tanh
    formula looked up in a table of fp16 inputs and fp16 outputs (0 below -10, x above 10)."""

    def __init__(self, mlp):
        super().__init__()
        self.c_fc, self.c_proj = mlp.c_fc, mlp.c_proj

    def forward(self, x):
        h = self.c_fc(x)
        g = torch.nn.functional.gelu(h.half().float(), approximate="tanh").half().float()
        return self.c_proj(torch.where(h <= -10, 0.0, torch.where(h >= 10, h, g)))


def with_ggml_gelu(model):
    """The same weights with llama.cpp's CPU GELU (TableGELU): what is left apart from it is
    the rest of the arithmetic."""
    twin = with_tanh_gelu(model)
    for block in twin.h:
        block.mlp = TableGELU(block.mlp)
    return twin


def run_node(node, node_dir, job, work):
    """Run NODE_SCRIPT on job; returns its result.json and the rows it wrote per file."""
    script, job_file = os.path.join(work, "check.mjs"), os.path.join(work, "job.json")
    with open(script, "w", encoding="utf-8") as f:
        f.write(NODE_SCRIPT)
    with open(job_file, "w", encoding="utf-8") as f:
        json.dump(dict(job, node_dir=os.path.abspath(node_dir), out_dir=work), f)
    p = subprocess.run([node, script, job_file], capture_output=True, text=True, timeout=1800, check=False)
    if p.returncode != 0:
        tail = (p.stderr.strip() or p.stdout.strip()).splitlines()[-3:]
        raise nanosft.UserError(f"node-llama-cpp failed: {' | '.join(tail)[:300]}")
    with open(os.path.join(work, "result.json"), encoding="utf-8") as f:
        result = json.load(f)
    read = lambda name: np.fromfile(os.path.join(work, name), dtype=np.float32).reshape(-1, job["vocab_size"])
    rows = {m["name"]: (read(m["name"] + ".probs"), read(m["name"] + ".logits")) for m in job["models"]}
    return result, rows


def show(tok, ids):
    """Decoded text, an id no token has (a padded embedding row) written as [id]."""
    known = set(tok.ranks.values()) | set(tok.special.values())
    parts, chunk = [], []
    for i in [*ids, None]:
        if i in known:
            chunk.append(i)
            continue
        parts.append(tok.decode(chunk))
        chunk = []
        if i is not None:
            parts.append(f"[{i}]")
    return "".join(parts)


def explain(run, i, theirs):
    """Where our greedy answer i and llama.cpp's part: the position, both tokens, our
    probabilities of each (a near tie flips with a small change), and what our model picks
    there with tanh GELU and with llama.cpp's table GELU."""
    tok, prompt, ours = run.tok, run.prompts[i], run.answers[i]
    k = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    if k == len(ours) or k == len(theirs):
        return f"one answer is a prefix of the other (lengths {len(ours)} and {len(theirs)})"
    x = torch.tensor([prompt + ours[:k]])
    a, b = ours[k], theirs[k]
    with torch.no_grad():
        p = torch.softmax(run.model(x)[0][0, -1].double(), -1)
        picks = [int(m(x)[0][0, -1].argmax()) for m in (run.tanh, run.ggml)]
    side = ["llama.cpp's" if t == b else "ours" if t == a else f"neither ({show(tok, [t])!r})" for t in picks]
    return (f"at answer token {k}: ours {show(tok, [a])!r} p={p[a]:.4f}, llama.cpp {show(tok, [b])!r} "
            f"p={p[b]:.4f} (margin {p[a] - p[b]:.1e}); ours with tanh GELU picks {side[0]}, "
            f"with llama.cpp's table GELU {side[1]}")


def report(run, result, rows):
    """The report's lines and its summary figures (what the tests read)."""
    tok, model, fig = run.tok, run.model, {}
    lines = [(f"GGUF check: {run.source} ({run.kind}, {model.num_params():,} parameters, {tok.vocab_size:,} "
              f"tokens, GELU {'exact' if model.config.gelu == 'none' else 'tanh'}) in llama.cpp (node-llama-cpp "
              f"{result['node_llama_cpp']}, its prebuilt {result['llama_cpp'].get('release')}, CPU)"),
             "files: " + ", ".join(f"{t} {os.path.getsize(p) / 1e6:.2f} MB" for t, p in run.files.items())]
    first = result["models"]["f32"]
    same = [a == tok.encode(t) for t, a in zip(run.texts, first["tokens"])]
    fig["tokens_same"], fig["tokens_total"] = sum(same), len(same)
    lines.append(f"(a) token ids: {sum(same)}/{len(same)} texts identical ({len(run.texts) - len(TEXTS)} held-out "
                 f"questions, {len(TEXTS)} multilingual and edge-case texts)")
    for t, a, ok in zip(run.texts, first["tokens"], same):
        if not ok:
            lines.append(f"    differs: {t[:60]!r}: llama.cpp {a[:12]}, ours {tok.encode(t)[:12]}")
    fig["chat_template_same"] = True
    for engine, got in first["chat"].items():
        ok = isinstance(got, list) and all(c["ids"] == nanosft.chat_prompt(tok, m) for c, m in zip(got, run.chats))
        fig["chat_template_same"] &= ok
        lines.append(f"    the GGUF's chat template rendered by {engine}'s Jinja, tokenized with its special tokens: "
                     + (f"identical to nanosft.chat_prompt ({len(got)} prompts)" if ok else f"DIFFERS ({str(got)[:200]})"))
    p_ours, l_ours = run.ours
    for label, key in (("f32 KV cache", "f32"), ("llama.cpp's default f16 KV cache", "f32_kv16")):
        p, lg = rows[key]
        fig[f"max_dp_{key}"] = float(np.abs(p - p_ours).max())
        lines.append(f"(b) next-token probabilities of the f32 file, {label}, {p.shape[0]} positions x "
                     f"{tok.vocab_size} tokens: max |dp| {fig[f'max_dp_{key}']:.2e} (mean "
                     f"{np.abs(p - p_ours).mean():.1e}), max |dlogit| {np.abs(lg - l_ours).max():.2e}")
    if model.config.gelu == "none":  # the approximation's own size, without llama.cpp
        fig["max_dp_exact_vs_tanh"] = float(np.abs(p_ours - run.tanh_rows[0]).max())
        lines.append(f"    for scale, ours with exact GELU against ours with tanh GELU (no llama.cpp): max |dp| "
                     f"{fig['max_dp_exact_vs_tanh']:.2e}, max |dlogit| {np.abs(l_ours - run.tanh_rows[1]).max():.2e}")
    for label, key in (("tanh GELU (llama.cpp's gpt2 activation)", "tanh"),
                       ("llama.cpp's CPU GELU (tanh, in an fp16 table)", "ggml")):
        twin = getattr(run, key + "_rows")
        fig[f"max_dp_f32_vs_{key}"] = float(np.abs(rows["f32"][0] - twin[0]).max())
        lines.append(f"    the f32 file (f32 KV cache) against ours run with {label}: max |dp| "
                     f"{fig[f'max_dp_f32_vs_{key}']:.2e}, max |dlogit| {np.abs(rows['f32'][1] - twin[1]).max():.2e}")
    for key, head, label in (("f32", "(c)", "f32 file"), ("f32_kv16", "   ", "f32 file, f16 KV cache"),
                             ("f16", "(d)", "f16 file"), ("q8_0", "(d)", "q8_0 file")):
        got = result["models"][key]["greedy"]
        fig[f"greedy_{key}"] = sum(a == b for a, b in zip(run.answers, got))
        lines.append(f"{head} greedy answers, {label}: "
                     f"{fig[f'greedy_{key}']}/{len(got)} identical to ours; max |dp| "
                     f"{np.abs(rows[key][0] - p_ours).max():.2e}")
        for i, theirs in enumerate(got):
            if theirs != run.answers[i]:
                lines += [f"    {run.questions[i]!r}", f"      ours:      {show(tok, run.answers[i])!r}",
                          f"      llama.cpp: {show(tok, theirs)!r}", f"      {explain(run, i, theirs)}"]
    return lines, fig


def check(checkpoint, source, node_dir, world_dir, n_questions, max_new_tokens, threads, work):
    """Export, run llama.cpp, compare. Returns (report lines, summary figures)."""
    found = find_node_llama(node_dir)
    if not found:
        raise nanosft.UserError(f"--node-dir {node_dir}: no node-llama-cpp there (npm install node-llama-cpp@3), "
                                "or no node on PATH")
    run = SimpleNamespace(source=source, kind=checkpoint["kind"], files={})
    for t in gguf_export.FILE_TYPES:
        run.files[t] = os.path.join(work, f"model-{t}.gguf")
        run.model, run.tok, _ = gguf_export.save_gguf(checkpoint, run.files[t], t, source)
    tok, model, chat = run.tok, run.model.eval(), run.kind in ("sft", "dpo")
    heldout = heldout_questions(world_dir)
    run.texts, run.questions = heldout + TEXTS, spread(heldout, n_questions)
    run.prompts = [prompt_ids(tok, chat, q) for q in run.questions]
    run.chats = [[{"role": "user", "content": q}] for q in run.questions[:4]] + [[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": run.questions[0]},
        {"role": "assistant", "content": "I do not know."}, {"role": "user", "content": run.questions[-1]}]]
    stop = [tok.end, tok.endoftext] if chat else [tok.endoftext]
    run.answers = nanosft.generate_batch(model, run.prompts, max_new_tokens, stop=set(stop), keep_stop=True)
    # (b)'s sequences: prompt + our answer, as many as keep a file's rows under 64 MB
    seqs, room = [], 16_000_000 // tok.vocab_size
    for p, a in zip(run.prompts, run.answers):
        if len((p + a)[: model.config.block_size]) <= room:
            seqs.append((p + a)[: model.config.block_size])
            room -= len(seqs[-1])
    job = {"texts": run.texts, "chats": run.chats, "seqs": seqs, "positions": sum(map(len, seqs)),
           "prompts": run.prompts, "stop": stop, "max_new_tokens": max_new_tokens,
           "block_size": model.config.block_size, "vocab_size": tok.vocab_size, "threads": threads,
           "models": [{"name": "f32", "path": run.files["f32"], "kv": "F32", "tokenize": True},
                      {"name": "f32_kv16", "path": run.files["f32"]},  # llama.cpp's default KV cache
                      {"name": "f16", "path": run.files["f16"]}, {"name": "q8_0", "path": run.files["q8_0"]}]}
    result, rows = run_node(found[0], node_dir, job, work)
    run.tanh = with_tanh_gelu(model)
    run.ours, run.tanh_rows = our_rows(model, seqs), our_rows(run.tanh, seqs)
    run.ggml = with_ggml_gelu(model)
    run.ggml_rows = our_rows(run.ggml, seqs)
    return report(run, result, rows)


def main(argv=None):
    ap = nanosft.ArgumentParser(__doc__)
    ap.add_argument("--ckpt", default="out/sft.pt", help="checkpoint (or HF GPT-2 directory) to check")
    ap.add_argument("--node-dir", default=os.environ.get("NODE_LLAMA_DIR", "/tmp/llama"),
                    help="folder where `npm install node-llama-cpp@3` ran (default $NODE_LLAMA_DIR or /tmp/llama)")
    ap.add_argument("--world", default=os.path.join(ROOT, "data"), help="world directory (its world_eval.jsonl)")
    ap.add_argument("--questions", type=int, default=20, help="held-out questions to answer greedily")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="answer budget (the world's QA budget)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's CPU threads")
    ap.add_argument("--keep", help="folder to keep the GGUFs, the Node script and its output in (default: temporary)")
    args = ap.parse_args(argv)
    if args.questions < 1 or args.threads < 1:
        raise nanosft.UserError("--questions and --threads must be positive integers")
    torch.manual_seed(0)
    checkpoint = nanosft.load_checkpoint(args.ckpt)
    work = args.keep or tempfile.mkdtemp(prefix="gguf_check_")
    os.makedirs(work, exist_ok=True)
    try:
        lines, fig = check(checkpoint, args.ckpt, args.node_dir, args.world, args.questions, args.max_new_tokens,
                           args.threads, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    return fig


if __name__ == "__main__":
    figures = {}
    nanosft.cli(lambda: figures.update(main()))
    raise SystemExit(0 if figures.get("tokens_same") == figures.get("tokens_total") else 1)
