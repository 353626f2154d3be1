"""
Stage 1: next-token pre-training on plain text.

    python pretrain.py                          # the embedded world corpus -> out/pretrain.pt
    python pretrain.py --data book.txt          # any UTF-8 text file
    python pretrain.py --world out/world_hard   # another world (python data/world.py --out-dir DIR)
    torchrun --nproc_per_node 2 pretrain.py     # several processes (DDP)

Trains a BPE tokenizer on the text (unless resuming), holds out the last 10% of the tokens
for validation, and on the world corpus measures the knowledge probe: how many facts
("<name> was born in ...") the model can complete. Writes out/pretrain.pt (model, config,
tokenizer: what a later stage needs), out/pretrain_last.pt at every evaluation (also the
optimizer, step, RNG and history: what --resume needs), out/pretrain.json and
out/pretrain_loss.png.
"""
import dataclasses
import math
import os
import time

import nanosft as ns
import regex  # installed with tiktoken; needed for \p{L} in the GPT-2 split pattern
import torch
from data import formats, world_eval
from extras import charts

# Every default of this stage in one place (the architecture's are GPTConfig's, in nanosft.py).
DEFAULTS = dict(max_iters=3000, batch_size=8, lr=6e-3, eval_interval=200, warmup=50, log_interval=50,
                weight_decay=0.0)
WORLD_VOCAB = 2048  # the world's vocabulary: its prose has few distinct words


# ----------------------------------------------------------------------------------------
# the tokenizer: a byte-level BPE trained here, in readable Python (nanosft.Tokenizer hands
# its merges to tiktoken, which encodes and decodes fast)


def train_bpe(text, vocab_size, pattern=ns.SPLIT_PATTERN):
    """Byte-level BPE: start from the 256 bytes and repeatedly merge the most frequent
    adjacent pair into a new token. Returns the merges as (left_id, right_id) pairs; merge
    k creates token 256 + k.

    Fast enough for megabytes in pure Python because (a) identical chunks are counted once
    and (b) pair counts are updated incrementally, only for the chunks that contain the
    merged pair, with a max-heap (lazy deletion) to find the next best pair."""
    import heapq
    from collections import Counter, defaultdict
    if vocab_size < 256:
        raise ns.UserError(f"--vocab-size must be at least 256 (the byte alphabet), got {vocab_size}")
    chunk_counts = Counter(regex.findall(pattern, text))
    words = [list(c.encode("utf-8")) for c in chunk_counts]
    counts = list(chunk_counts.values())
    pairs, where = Counter(), defaultdict(set)
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pairs[p] += counts[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in pairs.items()]
    heapq.heapify(heap)
    token_bytes = [bytes([i]) for i in range(256)]
    known = {b: i for i, b in enumerate(token_bytes)}
    merges = []
    while len(token_bytes) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -neg or neg == 0:
            continue  # stale heap entry
        a, b = pair
        new_bytes = token_bytes[a] + token_bytes[b]
        if new_bytes in known:   # same bytes reached by another merge path: reuse that id
            new_id = known[new_bytes]
        else:
            new_id = len(token_bytes)
            token_bytes.append(new_bytes)
            known[new_bytes] = new_id
            merges.append(pair)
        changed = set()
        for i in list(where[pair]):
            w, c = words[i], counts[i]
            merged, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    merged.append(new_id)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            if len(merged) == len(w):
                continue
            for p in zip(w, w[1:]):
                pairs[p] -= c
                changed.add(p)
            for p in zip(merged, merged[1:]):
                pairs[p] += c
                where[p].add(i)
                changed.add(p)
            words[i] = merged
        del where[pair]
        pairs.pop(pair, None)
        for p in changed:
            if pairs.get(p, 0) > 0:
                heapq.heappush(heap, (-pairs[p], p))
    return merges


def train_tokenizer(text, vocab_size):
    """A BPE of vocab_size tokens in all: 256 bytes, merges, then the special tokens."""
    if vocab_size < 256 + len(ns.SPECIALS):  # checked here so the message quotes the flag's value
        raise ns.UserError(f"--vocab-size must be at least {256 + len(ns.SPECIALS)} (256 bytes + "
                           f"{len(ns.SPECIALS)} special tokens), got {vocab_size}")
    return ns.Tokenizer(train_bpe(text, vocab_size - len(ns.SPECIALS)))


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


# ----------------------------------------------------------------------------------------
# the stage


def parse_args(argv=None):
    ap = ns.ArgumentParser(__doc__)
    ap.add_argument("--data", default=None, help="UTF-8 text file to train on (default: the world's corpus)")
    ap.add_argument("--world", default=None, help="a world directory (python data/world.py --out-dir DIR): "
                    "train on its corpus and measure its knowledge probe (default: data/, unless --data)")
    arch = ns.GPTConfig()  # the architecture's defaults live in one place: GPTConfig
    for name in ("block_size", "n_layer", "n_head", "n_embd"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(arch, name))
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="BPE vocabulary incl. special tokens (default: 2048 for the world, else "
                    "picked from the text's size, see vocab_size_for)")
    ap.add_argument("--weight-decay", type=float,
                    help="AdamW decay on matrices; 0 by default: decay erases memorised facts")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--log-interval", type=int)
    ns.add_common_args(ap)
    ap.set_defaults(**DEFAULTS)
    args = ap.parse_args(argv)
    if args.world and args.data:
        raise ns.UserError("--world DIR trains on DIR/world_corpus.txt: give --world or --data, not both")
    if args.world:
        args.data = world_eval.path("world_corpus.txt", world_eval.check_world_dir(args.world))
    elif args.data is None or world_eval.is_default(args.data, world_eval.CORPUS):  # the default world
        args.data, args.world = world_eval.CORPUS, world_eval.HERE
    return args


def vocab_size_for(text):
    """A BPE vocabulary that suits a corpus of this size: about 4 x sqrt(characters), in
    steps of 256, between 512 and 16,384 (a 1 MB book gets 4,096). Too small a vocabulary
    and English splits into many tokens, so a block holds little text; too large and most
    tokens are seen too rarely in a small corpus to learn their embeddings."""
    return int(min(16384, max(512, 256 * round(4 * len(text) ** 0.5 / 256))))


def new_model(text, source, vocab_size, is_world, cfg, log):
    """A BPE trained on the text, and a GPT of config `cfg` with that vocabulary."""
    if len(text) < 1000:
        raise ns.UserError(f"{source}: only {len(text)} characters; need at least 1,000 to train on")
    if vocab_size is None:
        vocab_size = WORLD_VOCAB if is_world else vocab_size_for(text)
        log(f"--vocab-size {vocab_size} (picked for {len(text):,} characters of text; set --vocab-size to choose)")
    t0 = time.time()
    tok = train_tokenizer(text, vocab_size)
    log(f"trained BPE: {tok.vocab_size} tokens in {time.time() - t0:.1f}s")
    return ns.GPT(dataclasses.replace(cfg, vocab_size=tok.vocab_size)), tok


def window_batch(data, it, seed, batch_size, block_size, rt, grad_accum):
    """Step `it`'s windows, from a generator seeded by (seed, it): the data order is a pure
    function of the step, so resuming continues it exactly. -> this rank's micro-batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + it)  # a stream per (seed, step); 1,000,003 is prime
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g)
    starts = starts[rt.rank::rt.world]  # this process's shard of the global batch
    windows = torch.stack([data[s:s + block_size + 1] for s in starts.tolist()])
    return [(w[:, :-1].to(rt.device), w[:, 1:].to(rt.device)) for w in windows.chunk(grad_accum)]


def main(argv=None):
    args = parse_args(argv)
    rt = ns.setup_runtime(args.device, args.dtype)
    t_start = time.time()

    # ---- data and model (everything is validated before anything is written)
    text = formats.read_text(args.data)
    is_world = args.world is not None
    if args.resume:  # the tokenizer and config of the run being continued
        model, tok = ns.model_from_checkpoint(ns.load_checkpoint(ns.last_path(args.out_dir, "pretrain")))
    else:
        torch.manual_seed(args.seed)
        arch = ns.GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
        model, tok = new_model(text, args.data, args.vocab_size, is_world, arch, rt.log)
    cfg = model.config
    data = formats.encode_corpus(tok, text)
    train_data, val_data = formats.split_corpus(data, cfg.block_size)
    if len(train_data) <= cfg.block_size + 1:
        raise ns.UserError(f"{args.data}: {len(data)} tokens is too short for block size {cfg.block_size}")
    rt.log(f"{len(data):,} tokens ({len(train_data):,} train / {len(val_data):,} val) | "
           f"{model.num_params():,} parameters | {rt.device} {rt.dtype}")
    model.to(rt.device)
    optimizer = ns.configure_optimizer(model, args.lr, args.weight_decay, device_type=rt.device.type)
    start_iter, history = 0, {"step": [], "val_loss": [], "probe": []}
    if args.resume:
        start_iter, history = ns.resume(args.out_dir, "pretrain", model, tok, optimizer)
    ddp_model = ns.wrap_ddp(torch.compile(model) if args.compile else model, rt)
    world = world_eval.load_world(args.world) if is_world else None

    # ---- batches and loss: every token of a window is a target
    get_batch = lambda it: (window_batch(train_data, it, args.seed, args.batch_size, cfg.block_size, rt,
                                         args.grad_accum), args.batch_size * cfg.block_size)
    loss_fn = lambda m, mb: m(mb[0], mb[1], reduction="sum")[1]

    # ---- evaluate (validation loss, knowledge probe) and keep the resume file
    val_batches = formats.fixed_windows(val_data, cfg.block_size)

    def on_eval(it):
        if rt.master:
            history["step"].append(it)
            history["val_loss"].append(ns.mean_loss(model, val_batches, rt))
            history["probe"].append(world_eval.knowledge_probe(model, tok, world) if world else None)
            rt.log(f"eval step {it}: val loss {history['val_loss'][-1]:.4f}"
                   + (f" | probe {history['probe'][-1]:.3f}" if world else ""))
            ns.save_checkpoint(ns.last_path(args.out_dir, "pretrain"), ns.checkpoint_dict(
                "pretrain", model, tok, optimizer, it, vars(args), {"val_loss": history["val_loss"][-1]}, history))
        ns.barrier(rt)

    # ---- train
    model.train()
    it, seconds, tok_per_s = ns.train_loop(rt, ddp_model, optimizer, ns.Loop.of(vars(args)), start_iter,
                                           get_batch, loss_fn, on_eval)

    # ---- save and report
    if rt.master:
        ckpt_path = os.path.join(args.out_dir, "pretrain.pt")
        ns.save_checkpoint(ckpt_path, ns.checkpoint_dict("pretrain", model, tok, None, it, vars(args),
                                                         {"val_loss": history["val_loss"][-1]}))
        report(args.out_dir, history, model, rt, tok_per_s, time.time() - t_start, seconds, it, world is not None)


def report(out_dir, history, model, rt, tok_per_s, total_seconds, train_seconds, steps, world):
    """out/pretrain.json, out/pretrain_loss.png and the closing line."""
    result = {"val_loss": history["val_loss"][-1], "knowledge_probe_accuracy": history["probe"][-1],
              "tokens_per_sec": tok_per_s, "seconds": total_seconds, "train_seconds": train_seconds,
              "steps": steps, "params": model.num_params(), "device": str(rt.device), "dtype": rt.dtype,
              "history": history}
    ns.write_json(os.path.join(out_dir, "pretrain.json"), result)
    series = {"val loss": (history["step"], history["val_loss"])}
    if world:
        series["knowledge probe accuracy"] = (history["step"], history["probe"])
    png = os.path.join(out_dir, "pretrain_loss.png")
    charts.plot(png, "pre-training", xlabel="step", ylabel="value", series=series)
    rt.log(f"done: val loss {result['val_loss']:.4f}"
           + (f" | knowledge probe {result['knowledge_probe_accuracy']:.3f}" if world else "")
           + f" | {tok_per_s:,.0f} tok/s | {total_seconds:.0f}s -> {os.path.join(out_dir, 'pretrain.pt')}")


if __name__ == "__main__":
    from extras.cpu import tune_cpu
    tune_cpu()  # OpenMP wait policy, heap settings: see extras/cpu.py
    ns.cli(main)
