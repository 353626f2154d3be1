"""
Stage 1: next-token pre-training on plain text.

    python pretrain.py                          # the embedded world corpus -> out/pretrain.pt
    python pretrain.py --data book.txt          # any UTF-8 text file
    torchrun --nproc_per_node 2 pretrain.py     # several processes (DDP)

Trains a BPE tokenizer on the text (unless resuming), holds out the last 10% of the tokens
for validation, and on the world corpus measures the knowledge probe: how many facts
("<name> was born in ...") the model can complete. Writes out/pretrain.pt (model, config,
tokenizer, optimizer, step, RNG: everything a later stage or --resume needs),
out/pretrain.json and out/pretrain_loss.png.
"""
import os
import time

import nanosft as ns  # first: it sets how OpenMP threads wait, read when torch loads
import torch

WORLD_CORPUS = os.path.join(ns.HERE, "data", "world_corpus.txt")


def parse_args(argv=None):
    ap = ns.ArgumentParser(__doc__)
    ap.add_argument("--data", default=WORLD_CORPUS, help="UTF-8 text file to train on")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="BPE vocabulary incl. special tokens (default: 2048 for the world, else "
                    "picked from the text's size, see vocab_size_for)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.0,
                    help="AdamW decay on matrices; 0 by default: decay erases memorised facts")
    ap.add_argument("--log-interval", type=int, default=50)
    ns.add_common_args(ap)
    ap.set_defaults(max_iters=1200, batch_size=8, lr=6e-3, eval_interval=200)
    args = ap.parse_args(argv)
    ns.check_args(args)
    return args


def vocab_size_for(text):
    """A BPE vocabulary that suits a corpus of this size: about 4 x sqrt(characters), in
    steps of 256, between 512 and 16,384 (a 1 MB book gets 4,096). Too small a vocabulary
    and English splits into many tokens, so a block holds little text; too large and most
    tokens are seen too rarely in a small corpus to learn their embeddings."""
    return int(min(16384, max(512, 256 * round(4 * len(text) ** 0.5 / 256))))


def main(argv=None):
    args = parse_args(argv)
    rt = ns.setup_runtime(args)
    ckpt_path = os.path.join(args.out_dir, "pretrain.pt")
    t_start = time.time()

    # ---- data and model (everything is validated before anything is written)
    text = ns.read_text(args.data)
    if args.resume:
        ck = ns.load_checkpoint(ckpt_path, expect_kind=("pretrain",))
        model, tok = ns.model_from_checkpoint(ck, ckpt_path)
        start_iter = ck["iter"]
        torch.set_rng_state(ck["rng"]["torch"])
    else:
        if len(text) < 1000:
            raise ns.UserError(f"{args.data}: only {len(text)} characters; need at least 1,000 to train on")
        torch.manual_seed(args.seed)
        t0 = time.time()
        if args.vocab_size is None:
            is_world = os.path.abspath(args.data) == os.path.abspath(WORLD_CORPUS)
            args.vocab_size = 2048 if is_world else vocab_size_for(text)
            rt.log(f"--vocab-size {args.vocab_size} (picked for {len(text):,} characters of text; "
                   "set --vocab-size to choose)")
        tok = ns.Tokenizer.train(text, args.vocab_size)
        rt.log(f"trained BPE: {tok.vocab_size} tokens in {time.time() - t0:.1f}s")
        cfg = ns.GPTConfig(block_size=args.block_size, vocab_size=tok.vocab_size, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd)
        model, start_iter, ck = ns.GPT(cfg), 0, None
    cfg = model.config
    data = ns.encode_corpus(tok, text)
    train_data, val_data = ns.split_corpus(data, cfg.block_size)
    if len(train_data) <= cfg.block_size + 1:
        raise ns.UserError(f"{args.data}: {len(data)} tokens is too short for block size {cfg.block_size}")
    rt.log(f"{len(data):,} tokens ({len(train_data):,} train / {len(val_data):,} val) | "
           f"{model.num_params():,} parameters | {rt.device} {rt.dtype}")
    model.to(rt.device)
    optimizer = ns.configure_optimizer(model, args.lr, args.weight_decay, device_type=rt.device.type)
    if ck is not None and ck.get("optimizer"):
        optimizer.load_state_dict(ck["optimizer"])
    ddp_model = ns.wrap_ddp(torch.compile(model) if args.compile else model, rt)
    is_world = os.path.abspath(args.data) == os.path.abspath(WORLD_CORPUS)
    world = ns.load_world() if is_world else None

    # ---- batches: step `it` draws its windows from a generator seeded by (seed, it), so
    # the data order is a pure function of the step: resuming continues it exactly.
    B, T = args.batch_size, cfg.block_size
    if B % (rt.world * args.grad_accum):
        raise ns.UserError(f"--batch-size {B} must be divisible by processes x --grad-accum "
                           f"({rt.world} x {args.grad_accum})")

    def get_batch(it):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + it)  # a stream per (seed, step); 1,000,003 is prime
        starts = torch.randint(len(train_data) - T - 1, (B,), generator=g)
        starts = starts[rt.rank::rt.world]  # this process's shard of the global batch
        windows = torch.stack([train_data[s:s + T + 1] for s in starts.tolist()])
        micro = [(w[:, :-1].to(rt.device), w[:, 1:].to(rt.device))
                 for w in windows.chunk(args.grad_accum)]
        return micro, B * T

    def loss_fn(m, mb):
        return m(mb[0], mb[1], reduction="sum")[1]

    val_batches = ns.fixed_windows(val_data, T)
    history = {"step": [], "val_loss": [], "probe": []}

    def evaluate(it):
        if not rt.master:
            return
        history["step"].append(it)
        history["val_loss"].append(ns.mean_loss(model, val_batches, rt))
        history["probe"].append(ns.knowledge_probe(model, tok, world) if world else None)
        probe = f" | probe {history['probe'][-1]:.3f}" if world else ""
        rt.log(f"eval step {it}: val loss {history['val_loss'][-1]:.4f}{probe}")
        ns.save_checkpoint(ckpt_path, ns.checkpoint_dict("pretrain", model, tok, optimizer, it, args,
                                                         {"val_loss": history["val_loss"][-1]}))

    def on_eval(it):
        evaluate(it)
        ns.barrier(rt)

    # ---- train
    model.train()
    it, seconds, tok_per_s = ns.train_loop(rt, ddp_model, optimizer, ns.Loop.of(args), start_iter,
                                           get_batch, loss_fn, on_eval)

    # ---- report
    if rt.master:
        result = {"val_loss": history["val_loss"][-1], "knowledge_probe_accuracy": history["probe"][-1],
                  "tokens_per_sec": tok_per_s, "seconds": time.time() - t_start,
                  "train_seconds": seconds, "steps": it, "params": model.num_params(),
                  "device": str(rt.device), "dtype": rt.dtype, "history": history}
        ns.write_json(os.path.join(args.out_dir, "pretrain.json"), result)
        series = {"val loss": (history["step"], history["val_loss"])}
        if world:
            series["knowledge probe accuracy"] = (history["step"], history["probe"])
        ns.plot(os.path.join(args.out_dir, "pretrain_loss.png"), "pre-training", "step", "value", series)
        rt.log(f"done: val loss {result['val_loss']:.4f}"
               + (f" | knowledge probe {result['knowledge_probe_accuracy']:.3f}" if world else "")
               + f" | {tok_per_s:,.0f} tok/s | {result['seconds']:.0f}s -> {ckpt_path}")


if __name__ == "__main__":
    ns.cli(main)
