"""
Export a checkpoint as a Hugging Face GPT-2 directory, for `transformers`:

    python -m extras.export --ckpt out/dpo.pt --out hf/

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("hf/")
    tok = AutoTokenizer.from_pretrained("hf/")

Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the chat
template) and a README.md model card with the checkpoint's training figures. Needs the
`safetensors` package (extras/requirements-dev.txt); the training scripts do not.

Or as one GGUF file, for llama.cpp and Ollama (extras/gguf_export.py; docs/gguf.md):

    python -m extras.export --ckpt out/sft.pt --gguf out/model.gguf [--gguf-type f32|f16|q8_0]
    llama-cli -m out/model.gguf --jinja -c 128   # chat (its template; -c: the block_size)

llama.cpp's "gpt2" architecture, tokenizer and chat template included; f32 by default, f16
and q8_0 convert the matrices only. llama.cpp computes GELU with GPT-2's tanh approximation,
our models were trained with the exact one: their logits there differ slightly (docs/gguf.md).
Needs the `gguf` package (extras/requirements-dev.txt). Both work for an HF GPT-2 directory too.
"""
import nanosft
from extras import hf


def main(argv=None):
    ap = nanosft.ArgumentParser(__doc__)
    ap.add_argument("--ckpt", default="out/dpo.pt", help="checkpoint (or HF GPT-2 directory) to export")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--out", help="directory to write (Hugging Face; default hf)")
    where.add_argument("--gguf", help="GGUF file to write instead (llama.cpp, Ollama)")
    ap.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], help="GGUF tensor type (default f32)")
    args = ap.parse_args(argv)
    if args.gguf_type and not args.gguf:
        raise nanosft.UserError("--gguf-type needs --gguf FILE")
    checkpoint = nanosft.load_checkpoint(args.ckpt)
    if args.gguf:
        from extras import gguf_export

        model, tok, counts = gguf_export.save_gguf(checkpoint, args.gguf, args.gguf_type or "f32", args.ckpt)
        types = ", ".join(f"{n} {k}" for k, n in counts.items())
        print(f"{args.ckpt} ({checkpoint['kind']}, {model.num_params():,} parameters, {tok.vocab_size:,} tokens) -> "
              f"{args.gguf} (gpt2; tensors: {types})")
        if model.config.gelu == "none":
            print("note: llama.cpp's gpt2 uses tanh-approximated GELU, this model the exact one (docs/gguf.md)")
        return
    out = args.out or "hf"
    model, tok = hf.save_dir(checkpoint, out, args.ckpt)
    print(f"{args.ckpt} ({checkpoint['kind']}, {model.num_params():,} parameters, {tok.vocab_size:,} tokens) -> {out}")


if __name__ == "__main__":
    nanosft.cli(main)  # bad input is one line and exit code 2, never a traceback
