"""
Stage 1: next-token pre-training on plain text.

    python pretrain.py                          # the embedded world corpus -> out/pretrain.pt
    python pretrain.py --data book.txt          # any UTF-8 text file
    python pretrain.py --world out/world_hard   # another world (python data/world.py --out-dir DIR)
    torchrun --nproc_per_node 2 pretrain.py     # several processes (DDP)

Trains a BPE tokenizer on the text (a world ships its own, world_tokenizer.json), holds out
the last 10% of the tokens for validation, and on the world corpus measures the knowledge
probe: how many facts ("<name> was born in ...") the model can complete. Writes
out/pretrain.pt (what a later stage needs), out/pretrain_last.pt at every evaluation (what
--resume needs), out/pretrain.json and out/pretrain_loss.png.
"""

import dataclasses
import json
import os
import time

import nanosft
import torch
from data import corpus, world_eval

# Every default of this stage in one place (the architecture's are GPTConfig's, in nanosft.py).
DEFAULTS = dict(
    max_iters=3000,
    batch_size=8,
    lr=6e-3,
    eval_interval=200,
    warmup=50,
    log_interval=50,
    weight_decay=0.0,  # AdamW's on matrices: 0, decay erases memorised facts (--weight-decay)
    vocab_size=None,  # picked for the text: vocab_size_for (--vocab-size)
    world=None,  # the world directory whose knowledge probe is measured (--world)
)
WORLD_VOCAB = 2048  # the world's vocabulary: its prose has few distinct words


def parse_args(argv=None):
    ap = nanosft.ArgumentParser(__doc__, stage="pretrain")  # more flags: extras/flags.py
    lesson = ap.add_argument_group("pre-training: the data and the model")
    lesson.add_argument(
        "--data", default=None, help="UTF-8 text file to train on (default: the world's corpus)"
    )
    arch = nanosft.GPTConfig()  # the architecture's defaults live in one place: GPTConfig
    for name in ("block_size", "n_layer", "n_head", "n_embd"):
        lesson.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(arch, name))
    nanosft.add_common_args(ap)
    ap.set_defaults(**DEFAULTS)
    args = ap.parse_args(argv)
    if args.n_embd % args.n_head:
        raise nanosft.UserError(
            f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})"
        )
    if args.data is None or world_eval.is_default(args.data, world_eval.CORPUS):  # the world's
        args.data, args.world = world_eval.CORPUS, world_eval.HERE
    return args


def vocab_size_for(text):
    """A BPE vocabulary that suits a corpus of this size: about 4 x sqrt(characters), in
    steps of 256, between 512 and 16,384 (a 1 MB book gets 4,096). Too small a vocabulary
    and English splits into many tokens, so a block holds little text; too large and most
    tokens are seen too rarely in a small corpus to learn their embeddings."""
    return int(min(16384, max(512, 256 * round(4 * len(text) ** 0.5 / 256))))


def new_model(text, source, vocab_size, world_dir, cfg, log):
    """A GPT of config `cfg` and its tokenizer: a world's own BPE (world_tokenizer.json, what
    nanosft.train_tokenizer learns from its corpus, shipped beside it: tests/test_core.py checks
    that they are equal), or one trained on the text."""
    if len(text) < 1000:
        raise nanosft.UserError(
            f"{source}: only {len(text)} characters; need at least 1,000 to train on"
        )
    shipped = world_dir and world_eval.path("world_tokenizer.json", world_dir)
    if shipped and vocab_size is None and os.path.isfile(shipped):
        with open(shipped, encoding="utf-8") as f:
            tok = nanosft.Tokenizer(json.load(f)["merges"])
        log(f"BPE of {tok.vocab_size} tokens: {shipped}")
    else:
        if vocab_size is None:
            vocab_size = WORLD_VOCAB if world_dir else vocab_size_for(text)
            log(
                f"--vocab-size {vocab_size} (picked for {len(text):,} characters of text; "
                "set --vocab-size to choose)"
            )
        t0 = time.time()
        tok = nanosft.train_tokenizer(text, vocab_size)
        log(f"trained BPE: {tok.vocab_size} tokens in {time.time() - t0:.1f}s")
    return nanosft.GPT(dataclasses.replace(cfg, vocab_size=tok.vocab_size)), tok


def window_batch(data, it, seed, batch_size, block_size, process, grad_accum):
    """Step `it`'s windows, from a generator seeded by (seed, it): the data order is a pure
    function of the step, so resuming continues it exactly. -> this rank's micro-batches."""
    g = torch.Generator().manual_seed(
        seed * 1_000_003 + it
    )  # a stream per (seed, step); 1,000,003 is prime
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g)
    starts = starts[process.rank :: process.world]  # this process's shard of the global batch
    windows = torch.stack([data[s : s + block_size + 1] for s in starts.tolist()])
    return [
        (w[:, :-1].to(process.device), w[:, 1:].to(process.device))
        for w in windows.chunk(grad_accum)
    ]


def main(argv=None):
    args = parse_args(argv)
    process, t_start = nanosft.setup(args.device, args.dtype), time.time()
    if args.resume or args.time_budget or process.world > 1:
        from extras import runtime  # --resume, --time-budget, torchrun's processes

    # ---- data and model (everything is validated before anything is written)
    text = corpus.read_text(args.data)
    if args.resume:  # the tokenizer and config of the run being continued
        model, tok = nanosft.model_from_checkpoint(
            nanosft.load_checkpoint(os.path.join(args.out_dir, "pretrain_last.pt"))
        )
    else:
        torch.manual_seed(args.seed)
        arch = nanosft.GPTConfig(
            block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd
        )
        model, tok = new_model(
            text,
            source=args.data,
            vocab_size=args.vocab_size,
            world_dir=args.world,
            cfg=arch,
            log=process.log,
        )
    cfg = model.config
    data = corpus.encode_corpus(tok, text)
    train_data, val_data = corpus.split_corpus(data, cfg.block_size)
    if len(train_data) <= cfg.block_size + 1:
        raise nanosft.UserError(
            f"{args.data}: {len(data)} tokens is too short for block size {cfg.block_size}"
        )
    process.log(
        f"{len(data):,} tokens ({len(train_data):,} train / {len(val_data):,} val) | "
        f"{model.num_params():,} parameters | {process.device} {process.dtype}"
    )
    model.to(process.device)
    optimizer = nanosft.configure_optimizer(
        model, args.lr, args.weight_decay, device_type=process.device.type
    )
    start_iter, history = (
        runtime.resume(args.out_dir, "pretrain", model, tok=tok, optimizer=optimizer)
        if args.resume
        else (0, {"step": [], "val_loss": [], "probe": []})
    )
    ddp_model = torch.compile(model) if args.compile else model
    if process.world > 1:
        ddp_model = runtime.wrap_ddp(ddp_model, process)
    world = world_eval.load_world(args.world) if args.world else None
    # ---- evaluate (validation loss, knowledge probe) and keep the resume file
    val_batches = corpus.fixed_windows(val_data, cfg.block_size)

    def on_eval(it):
        if process.master:
            history["step"].append(it)
            history["val_loss"].append(nanosft.mean_loss(model, val_batches, process))
            history["probe"].append(
                world_eval.knowledge_probe(model, tok, world) if world else None
            )
            process.log(
                f"eval step {it}: val loss {history['val_loss'][-1]:.4f}"
                + (f" | probe {history['probe'][-1]:.3f}" if world else "")
            )
            keep(it)
        if process.world > 1:
            runtime.barrier(process)

    def keep(it):  # pretrain_last.pt: what --resume needs to continue after step `it`
        nanosft.save_checkpoint(
            os.path.join(args.out_dir, "pretrain_last.pt"),
            nanosft.checkpoint_dict(
                "pretrain", model, tok, optimizer=optimizer, it=it, flags=vars(args), state=history
            ),
        )

    # ---- train: every token of a window is a target; the loss is their mean over the whole step
    model.train()
    n_targets = args.batch_size * cfg.block_size  # in the step, over every process and micro-batch
    if process.dtype == "float16":  # the loss scaled, so small gradients do not underflow
        from extras import fp16

        fp16.LossScaling(model, optimizer)
    step, tokens, t0 = start_iter, 0, time.time()  # step: the steps taken
    with nanosft.finish_step_on_interrupt(process) as interrupted:
        for it in range(start_iter, args.max_iters):
            if interrupted():  # Ctrl-C: the steps taken are kept for --resume, then exit 130
                keep(step)
                raise KeyboardInterrupt(f"step {step} kept in pretrain_last.pt; --resume continues")
            if args.time_budget and runtime.out_of_time(t0, args.time_budget, process, it):
                break
            # warmup, then cosine decay
            lr = nanosft.lr_at(it, args.lr, args.warmup, args.max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = window_batch(
                train_data,
                it,
                seed=args.seed,
                batch_size=args.batch_size,
                block_size=cfg.block_size,
                process=process,
                grad_accum=args.grad_accum,
            )
            step_loss = 0.0
            for i, (X, Y) in enumerate(micro_batches):
                # DDP averages the gradients over the processes after the last micro-batch
                if process.world > 1:
                    ddp_model.require_backward_grad_sync = i == len(micro_batches) - 1
                with nanosft.autocast(process.device, process.dtype):
                    # summed next-token cross-entropy
                    _, loss_sum = ddp_model(X, Y, reduction="sum")
                # x world: DDP averages
                (loss_sum * (process.world / n_targets)).backward()
                step_loss += loss_sum.item()
                tokens += X.numel()
            if process.world > 1:  # the whole step's, every process's
                step_loss = runtime.all_reduce(step_loss, process)
            nanosft.check_finite(step_loss, it, lr)  # a NaN or inf stops the run before the step
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step = it + 1
            if step % args.log_interval == 0 or step == args.max_iters:
                nanosft.log_step(
                    process,
                    step,
                    args.max_iters,
                    loss=step_loss / n_targets,
                    lr=lr,
                    seconds=time.time() - t0,
                    tokens=tokens,
                )
            if step % args.eval_interval == 0 and step < args.max_iters:
                on_eval(step)
    train_seconds = time.time() - t0
    on_eval(step)
    # ---- save and report
    if process.master:
        nanosft.save_checkpoint(
            os.path.join(args.out_dir, "pretrain.pt"),
            nanosft.checkpoint_dict(
                "pretrain",
                model,
                tok,
                it=step,
                flags=vars(args),
                metrics={"val_loss": history["val_loss"][-1]},
            ),
        )
        tok_per_s = tokens * process.world / max(train_seconds, 1e-9)
        result = {  # out/pretrain.json
            "val_loss": history["val_loss"][-1],
            "knowledge_probe_accuracy": history["probe"][-1],
            "tokens_per_sec": tok_per_s,
            "seconds": time.time() - t_start,
            "train_seconds": train_seconds,
            "steps": step,
            "params": model.num_params(),
            "device": str(process.device),
            "dtype": process.dtype,
            "history": history,
        }
        nanosft.write_json(os.path.join(args.out_dir, "pretrain.json"), result)
        if args.plot:  # out/pretrain_loss.png
            from extras import charts

            charts.plot_pretrain(os.path.join(args.out_dir, "pretrain_loss.png"), history, world)
        process.log(
            f"done: val loss {result['val_loss']:.4f}"
            + (f" | knowledge probe {result['knowledge_probe_accuracy']:.3f}" if world else "")
            + f" | {tok_per_s:,.0f} tok/s | {result['seconds']:.0f}s -> "
            + os.path.join(args.out_dir, "pretrain.pt")
        )


if __name__ == "__main__":
    nanosft.cli(main)  # bad input is one line and exit code 2, never a traceback
