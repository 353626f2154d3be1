"""
Generate text from any nanosft checkpoint.

    python sample.py --ckpt out/pretrain.pt --prompt "Ada Stone was born in"
    python sample.py --ckpt out/sft.pt --prompt "Where was Ada Stone born?"   # chat format
    python sample.py --ckpt out/dpo.pt --prompt "What is Ada Stone's hobby?" --temperature 0
    python sample.py --ckpt out/dpo.pt --chat                                # a conversation

Pre-trained checkpoints continue the text. Fine-tuned ones (sft, dpo) get the prompt as a
user turn and answer as the assistant, stopping at <|end|>.

--chat (fine-tuned checkpoints only) reads one user turn per line and prints the answer as
it is generated; every answer stays in the history, so later turns can refer to earlier
ones. /reset starts a new conversation, /quit (or Ctrl-D) exits, Ctrl-C stops an answer.
When the conversation outgrows the model's context, its oldest exchanges are dropped.
With input piped in (not a terminal) it prints only the answers, one for each line of input,
and exits at the end of the input; notices go to stderr.
"""
import math
import sys
from contextlib import contextmanager

import nanosft
import torch


def main(argv=None):
    ap = nanosft.ArgumentParser(__doc__)
    ap.add_argument("--ckpt", default="out/sft.pt")
    ap.add_argument("--prompt", default="")
    ap.add_argument("--chat", action="store_true", help="multi-turn conversation, one user turn per line")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--num-samples", type=int, default=1, help="for --prompt (--chat answers once)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise nanosft.UserError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise nanosft.UserError(f"--top-k must be >= 0 (0 = no limit), got {args.top_k}")
    if args.chat and args.prompt:
        raise nanosft.UserError("--chat reads the user's turns from the input; leave out --prompt")
    checkpoint = nanosft.load_checkpoint(args.ckpt)
    if args.chat and checkpoint["kind"] not in ("sft", "dpo"):
        raise nanosft.UserError(f"{args.ckpt}: --chat needs a fine-tuned checkpoint (sft or dpo); "
                           f"this one is '{checkpoint['kind']}', which only continues text (use --prompt)")
    model, tok = nanosft.model_from_checkpoint(checkpoint, args.ckpt)
    model.to(nanosft.pick_device(args.device))
    g = torch.Generator().manual_seed(args.seed)
    if args.chat:
        chat = Chat(model, tok, generator=g, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k)
        return repl(chat, f"{args.ckpt} ({checkpoint['kind']})")
    chat = checkpoint["kind"] in ("sft", "dpo")
    if chat:
        ids = nanosft.chat_prompt(tok, [{"role": "user", "content": args.prompt}])
        stop = {tok.end, tok.endoftext}
    else:
        ids = [tok.endoftext] + tok.encode(args.prompt)
        stop = {tok.endoftext}
    for i in range(args.num_samples):
        out = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, stop=stop, generator=g)
        text = tok.decode(out)
        print(text.strip() if chat else args.prompt + text)
        if i + 1 < args.num_samples:
            print("-" * 40)


# ----------------------------------------------------------------------------------------
# decoding one sequence with a KV cache (the stages' evaluations use nanosft.generate_batch)


SMALL_WIDTH = 512  # up to this n_embd, one-token decoding is faster on one CPU thread (bench.py)


@contextmanager
def one_thread_if_small(model, device):
    """Decoding one sequence, each step is a handful of (1 x C) @ (C x k) products: for a
    model of this project's sizes they are too small to split across threads, and the
    threads' hand-offs cost more than they save (bench.py measures it: kv_cache_speedup).
    Large models (or GPUs) keep their threads."""
    one = device.type == "cpu" and model.config.n_embd <= SMALL_WIDTH and torch.get_num_threads() > 1
    n = torch.get_num_threads()
    if one:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if one:
            torch.set_num_threads(n)


def generate(model, ids, max_new_tokens, temperature=1.0, top_k=None, stop=(), generator=None):
    """Decode one sequence with a KV cache (see `stream`). temperature 0 = greedy. Returns
    the new token ids (the stop token not included)."""
    return list(stream(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, stop=stop,
                       generator=generator))


@torch.no_grad()
def stream(model, ids, max_new_tokens, temperature=1.0, top_k=None, stop=(), generator=None):
    """Decode one sequence with a KV cache: the prompt is read once, then each new token
    costs a single position. Yields each new id as soon as it is drawn (a chat prints it
    while the next one is computed); the stop token is not yielded."""
    model.eval()
    device = next(model.parameters()).device
    limit = model.config.block_size
    ids = list(ids)[-limit:]
    cache = nanosft.KVCache(model.config.n_layer)
    logits = model.lm_head(model.hidden(torch.tensor([ids], device=device), cache)[:, -1:])  # (1, 1, V)
    with one_thread_if_small(model, device):
        for n in range(1, max_new_tokens + 1):
            nxt = sample_next(logits[:, -1, :], temperature, top_k, generator)
            if nxt in stop:
                return
            yield nxt
            if len(ids) + n >= limit:  # the context is full
                return
            logits, _ = model(torch.tensor([[nxt]], device=device), cache=cache)


def sample_next(logits, temperature, top_k, generator=None):
    logits = logits[0].float()
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


# ----------------------------------------------------------------------------------------
# chat: streaming one answer


class StreamDecoder:
    """Token ids in, printable text out, as soon as it is complete.

    A BPE token is a string of bytes, and a character of several UTF-8 bytes (é, ü, an
    emoji) may be split across two or more tokens. The first part alone decodes to U+FFFD,
    the replacement character. So while the text not yet printed ends in one, hold it back:
    the next token may complete the character."""

    def __init__(self, tok):
        self.tok = tok
        self.pending = []  # ids drawn but not yet printed

    def push(self, token_id):
        """The text that token_id completes ("" while a character is still unfinished)."""
        self.pending.append(token_id)
        text = self.tok.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self):
        """Whatever is still held back, at the end of the answer. A character that the
        answer's last token left unfinished stays U+FFFD: it never got its other bytes."""
        text = self.tok.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


# ----------------------------------------------------------------------------------------
# chat: keeping the conversation inside the context


def fit_context(tok, history, block_size, reserve):
    """Trim a conversation so its prompt leaves `reserve` of the model's block_size
    positions free for the answer.

    history is a list of {"role", "content"} turns, user and assistant in turn, ending with
    the new user turn. The oldest exchanges (a user turn with its answer) go first, whole,
    never half of one. If the new turn alone is still too long, its beginning is cut (the
    end of a message usually says what is asked).
    Returns (prompt ids, trimmed history, exchanges dropped, tokens cut from the user turn)."""
    budget = block_size - reserve
    history = list(history)
    dropped = 0
    while len(history) > 1 and len(nanosft.chat_prompt(tok, history)) > budget:
        history = history[2:]
        dropped += 1
    cut = 0
    if len(nanosft.chat_prompt(tok, history)) > budget:
        history[-1], cut = cut_turn(tok, history[-1]["content"], budget)
    return nanosft.chat_prompt(tok, history), history, dropped, cut


def cut_turn(tok, text, budget):
    """A lone user turn, cut from the left until its prompt fits in `budget` tokens.
    Returns the shortened turn and how many of its tokens were cut."""
    full = len(nanosft.encode_content(tok, text))
    keep, turn = full, {"role": "user", "content": text}
    # Decoding the last `keep` tokens and encoding the result again may not give exactly
    # `keep` tokens (the cut may fall inside a word), so shrink until the prompt fits.
    while keep > 0 and len(nanosft.chat_prompt(tok, [turn])) > budget:
        keep -= max(1, len(nanosft.chat_prompt(tok, [turn])) - budget)
        turn = {"role": "user", "content": last_tokens(tok, text, keep)}
    return turn, full - len(nanosft.encode_content(tok, turn["content"]))


def last_tokens(tok, text, n):
    """The end of text that its last n tokens spell (a character split by the cut is dropped)."""
    ids = nanosft.encode_content(tok, text)
    tail = ids[len(ids) - n:] if n > 0 else []
    return tok.decode(tail).lstrip("\ufffd").strip()


# ----------------------------------------------------------------------------------------
# chat: the conversation and the read-answer loop


def say(text):
    """Answer text on stdout, shown at once (stdout to a pipe would otherwise wait)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def notice(text):
    """Messages about the conversation go to stderr, so piped stdout holds only answers."""
    sys.stdout.flush()
    print(f"[{text}]", file=sys.stderr, flush=True)


class Chat:
    """One conversation with a fine-tuned model: the turns so far and how to answer a new one."""

    def __init__(self, model, tok, generator, max_new_tokens, temperature, top_k):
        self.model, self.tok, self.generator = model, tok, generator
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
        self.block_size = model.config.block_size
        # room kept free for the answer: all of --max-new-tokens, but never more than half
        # the context (a long answer must not push out the whole conversation)
        self.reserve = min(max_new_tokens, self.block_size // 2)
        self.history = []  # {"role": "user" | "assistant", "content": text}, oldest first

    def reset(self):
        self.history = []

    def ask(self, text):
        """Answer one user turn: fit the conversation into the context, print the answer
        as it is generated, keep it in the history. Returns the answer's text."""
        turns = self.history + [{"role": "user", "content": text}]
        ids, self.history, dropped, cut = fit_context(self.tok, turns, self.block_size, self.reserve)
        if dropped:
            what = "oldest exchange" if dropped == 1 else f"{dropped} oldest exchanges"
            notice(f"dropped the {what} to fit the {self.block_size}-token context")
        if cut:
            notice(f"your message is too long for the {self.block_size}-token context: "
                   f"cut its first {cut} tokens")
        # Every answer reads its whole prompt again, in one forward pass. Keeping the KV
        # cache from the last answer would save that pass, but not once old turns are
        # dropped: every position after the cut moves.
        answer = self.stream(ids)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def stream(self, ids):
        """Print the answer to the prompt `ids` token by token; return its text."""
        tok = self.tok
        tokens = stream(self.model, ids, **self.sampling, stop={tok.end, tok.endoftext}, generator=self.generator)
        decoder, drawn, stopped = StreamDecoder(tok), [], False
        started = False  # has any of the answer's text been printed yet?

        def show(text):
            nonlocal started
            if not started:  # an answer starts with a space (see nanosft.encode_content): skip it
                text = text.lstrip()
                started = bool(text)
            say(text)

        try:
            for t in tokens:
                drawn.append(t)
                show(decoder.push(t))
        except KeyboardInterrupt:
            # Ctrl-C stops this answer, not the program. What was generated so far stays
            # in the history as the assistant's turn: the history then holds exactly what
            # the user saw on the screen.
            stopped = True
        finally:
            tokens.close()  # ends the decoder, which restores the thread count
        show(decoder.flush())
        say("\n")
        if stopped:
            notice("answer stopped")
        return tok.decode(drawn).strip()


def read_turn(interactive):
    """The next line of input, or None at the end of input (or Ctrl-C at the prompt)."""
    try:
        return input("> " if interactive else "")
    except (EOFError, KeyboardInterrupt):
        if interactive:
            print()  # leave the terminal on a fresh line
        return None


def repl(chat, name):
    """Read a line, answer it, repeat. Exits (status 0) at /quit or the end of input."""
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (arrow keys and history for input())
        except ImportError:
            pass
        print(f"chatting with {name}, {chat.block_size}-token context. "
              "/reset starts over, /quit or Ctrl-D exits, Ctrl-C stops an answer.")
    while True:
        line = read_turn(interactive)
        if line is None or line.strip() == "/quit":
            return
        if line.strip() == "/reset":
            chat.reset()
            notice("history cleared")
        elif line.strip():  # a blank line is not a turn
            chat.ask(line.strip())


if __name__ == "__main__":
    nanosft.cli(main)  # bad input is one line and exit code 2, never a traceback
