"""
Export a checkpoint as a Hugging Face GPT-2 directory, for `transformers`:

    python -m extras.export --ckpt out/dpo.pt --out hf/

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("hf/")
    tok = AutoTokenizer.from_pretrained("hf/")

Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the chat
template) and a README.md model card with the checkpoint's training figures. Needs the
`safetensors` package (extras/requirements-dev.txt); the training scripts do not.
"""
import nanosft
from extras import hf


def main(argv=None):
    ap = nanosft.ArgumentParser(__doc__)
    ap.add_argument("--ckpt", default="out/dpo.pt", help="checkpoint (or HF GPT-2 directory) to export")
    ap.add_argument("--out", default="hf", help="directory to write")
    args = ap.parse_args(argv)
    checkpoint = nanosft.load_checkpoint(args.ckpt)
    model, tok = hf.save_dir(checkpoint, args.out, args.ckpt)
    print(f"{args.ckpt} ({checkpoint['kind']}, {model.num_params():,} parameters, {tok.vocab_size:,} tokens) -> {args.out}")


if __name__ == "__main__":
    nanosft.cli(main)  # bad input is one line and exit code 2, never a traceback
