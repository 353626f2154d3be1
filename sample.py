"""
Generate text from any nanosft checkpoint.

    python sample.py --ckpt out/pretrain.pt --prompt "Ada Stone was born in"
    python sample.py --ckpt out/sft.pt --prompt "Where was Ada Stone born?"   # chat format
    python sample.py --ckpt out/dpo.pt --prompt "What is Ada Stone's hobby?" --temperature 0

Pre-trained checkpoints continue the text. Fine-tuned ones (sft, dpo) get the prompt as a
user turn and answer as the assistant, stopping at <|end|>.
"""
import math

import nanosft as ns  # first: it sets OpenMP's wait policy before torch loads
import torch



def main(argv=None):
    ap = ns.ArgumentParser(__doc__)
    ap.add_argument("--ckpt", default="out/sft.pt")
    ap.add_argument("--prompt", default="")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    ns.check_args(args)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ns.UserError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise ns.UserError(f"--top-k must be >= 0 (0 = no limit), got {args.top_k}")
    ck = ns.load_checkpoint(args.ckpt)
    model, tok = ns.model_from_checkpoint(ck, args.ckpt)
    model.to(ns.pick_device(args.device))
    chat = ck["kind"] in ("sft", "dpo")
    if chat:
        ids = ns.chat_prompt(tok, [{"role": "user", "content": args.prompt}])
        stop = {tok.end, tok.endoftext}
    else:
        ids = [tok.endoftext] + tok.encode(args.prompt)
        stop = {tok.endoftext}
    g = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_samples):
        out = ns.generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, stop, g)
        text = tok.decode(out)
        print(text.strip() if chat else args.prompt + text)
        if i + 1 < args.num_samples:
            print("-" * 40)


if __name__ == "__main__":
    ns.cli(main)
