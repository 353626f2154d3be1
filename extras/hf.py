"""
Hugging Face GPT-2 directories, both ways: the stage scripts fine-tune a real GPT-2, and
`transformers` loads any of our checkpoints.

    load_dir(path)          HF GPT-2 directory -> checkpoint dict (importing this module
                            lets nanosft.load_checkpoint, so every --ckpt, read one)
    save_dir(checkpoint, out)       checkpoint dict -> HF GPT-2 directory (export.py)

Our GPT is GPT-2's architecture (pre-LayerNorm, learned positions, tied output layer, the
same module names) but for three things, all handled here:
  - GPT-2's Conv1D stores a weight as (in, out), nn.Linear as (out, in): transposed.
  - GPT-2 has a bias on every linear layer, ours none: imported with GPTConfig(bias=True),
    exported as zeros.
  - GPT-2 uses the tanh approximation of GELU ("gelu_new"), ours the exact one: imported
    with GPTConfig(gelu="tanh"); exported as activation_function "gelu" (exact), which GPT-2's
    config offers. So every checkpoint of ours is exactly a GPT-2 (tests: logits to 1e-4).
"""
import json
import os
from dataclasses import asdict

import nanosft
import torch

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # HF name -> F.gelu's


def byte_chars():
    """GPT-2's files spell each byte as a printable character: printable Latin-1 bytes as
    themselves, the others (controls, space, ...) as chr(256 + n), n counting them in order.
    So a token's bytes are a string without spaces or newlines ("Ġthe" is b" the")."""
    keep = {*range(33, 127), *range(161, 173), *range(174, 256)}
    out, n = [], 0
    for b in range(256):
        out.append(chr(b) if b in keep else chr(256 + n))
        n += b not in keep
    return out


BYTE_CHARS = byte_chars()

# ----------------------------------------------------------------------------------------
# import


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise nanosft.UserError(f"{path}: no such file")
    except (ValueError, OSError) as e:
        raise nanosft.UserError(f"{path}: not readable JSON ({type(e).__name__}: {str(e)[:80]})")


def read_safetensors(path):
    """The safetensors format: 8 bytes (the header's length, little-endian), a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw tensors. Read by these few lines, not
    the `safetensors` package, so that fine-tuning a GPT-2 needs only the training packages."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    try:
        with open(path, "rb") as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)  # writable: torch.frombuffer shares it
            f.readinto(buf)
        n = int.from_bytes(buf[:8], "little")
        header = json.loads(buf[8:8 + n])
        out = {}
        for name, t in header.items():
            if name == "__metadata__":
                continue
            start, end = (8 + n + o for o in t["data_offsets"])
            dtype, shape = dtypes[t["dtype"]], t["shape"]
            count = (end - start) // dtype.itemsize
            if end > len(buf) or count != torch.Size(shape).numel():
                raise ValueError(f"tensor {name} lies outside the file or does not fill its shape")
            out[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=start).view(shape)
        return out
    except (ValueError, KeyError, TypeError, OSError, RuntimeError) as e:
        raise nanosft.UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:80]})")


def read_weights(path):
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        return read_safetensors(st)
    if not os.path.isfile(pt):
        raise nanosft.UserError(f"{st}: no such file (nor {os.path.basename(pt)}); expected the model weights")
    try:  # weights_only: tensors and plain containers, a pickle that would run code is refused
        sd = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise nanosft.UserError(f"{pt}: not a readable weights file ({type(e).__name__}: {str(e).strip()[:80]})")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise nanosft.UserError(f"{pt}: expected a dict of tensors")
    return sd


def read_bpe(path):
    """The byte-level BPE of an HF directory: vocab.json + merges.txt (GPT-2's own files), or
    else tokenizer.json. Returns (vocab {token string: id}, merges [(left, right)], split
    pattern, the file named in errors)."""
    vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    tok_file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(vocab_file) and os.path.isfile(merges_file):
        vocab = read_json(vocab_file)
        with open(merges_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
        merges = [tuple(ln.split(" ")) for ln in lines if ln and not ln.startswith("#version")]
        return vocab, merges, nanosft.SPLIT_PATTERN, merges_file
    if not os.path.isfile(tok_file):
        missing = merges_file if os.path.isfile(vocab_file) else vocab_file
        raise nanosft.UserError(f"{missing}: no such file (nor tokenizer.json); expected the tokenizer")
    t = read_json(tok_file)
    try:
        pre = t["pre_tokenizer"] or {}
        steps = pre.get("pretokenizers", [pre])
        if t["model"]["type"] != "BPE" or not any(p["type"] == "ByteLevel" for p in steps):
            raise nanosft.UserError(f"{tok_file}: not a byte-level BPE tokenizer (GPT-2's kind)")
        vocab = dict(t["model"]["vocab"], **{a["content"]: a["id"] for a in t.get("added_tokens") or []})
        merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in t["model"]["merges"]]
        # a Split step carries the pattern (our exports); GPT-2's ByteLevel has it built in
        split = [p["pattern"]["Regex"] for p in steps if p["type"] == "Split"]
    except (KeyError, TypeError, AttributeError) as e:
        raise nanosft.UserError(f"{tok_file}: not a tokenizer.json of `tokenizers` ({type(e).__name__}: {str(e)[:60]})")
    return vocab, merges, split[0] if split else nanosft.SPLIT_PATTERN, tok_file


def bpe_tokenizer(vocab, merges, pattern, n_rows, where):
    """A tiktoken-served Tokenizer from GPT-2-style files, with our chat tokens added.

    tiktoken needs each token's bytes and a rank per token, and it merges the pair whose
    merged token has the lowest rank; the files give merge ORDER. So the ids serve as ranks,
    which is right when the ids grow with the merge order (GPT-2's do: 256 bytes, then one id
    per merge). Vocabulary entries that are neither a byte nor made by a merge (GPT-2's
    <|endoftext|>) are special tokens. The chat tokens the files lack get new ids, after the
    model's embedding rows (n_rows)."""
    try:
        byte_ids = [vocab[c] for c in BYTE_CHARS]
        made = [(vocab[a + b], vocab[a], vocab[b]) for a, b in merges]
    except (KeyError, ValueError, TypeError) as e:
        raise nanosft.UserError(f"{where}: not GPT-2's byte-level BPE (no token {str(e)[:40]})")
    if any(y[0] < x[0] for x, y in zip(made, made[1:])):
        raise nanosft.UserError(f"{where}: token ids do not follow the merge order, so tiktoken cannot rank them")
    # one merge per token tells its bytes: the first whose two parts are known by then (our
    # exports list every split of a token into two, some with a part made later)
    first, known = {}, set(byte_ids)
    for k, a, b in made:
        if k not in first and a in known and b in known:
            first[k] = (a, b)
            known.add(k)
    if len(first) != len({k for k, _, _ in made}):
        raise nanosft.UserError(f"{where}: a merge uses a token that no earlier merge makes (corrupt tokenizer)")
    specials = {s: i for s, i in vocab.items() if i not in known}
    if max(vocab.values()) >= n_rows:
        raise nanosft.UserError(f"{where}: token id {max(vocab.values())} beyond the model's {n_rows} embedding rows")
    for s in nanosft.SPECIALS:
        if s not in specials:
            specials[s] = max([n_rows - 1, *specials.values()]) + 1
    ids = {"bytes": byte_ids, "merges": list(first), "specials": list(specials.values())}
    return nanosft.Tokenizer(list(first.values()), pattern, tuple(specials), ids)


def gpt_config(c, path):
    """Our GPTConfig for an HF GPT-2 config.json; anything our GPT cannot compute is an error."""
    if not isinstance(c, dict) or c.get("model_type") != "gpt2":
        got = c.get("model_type") if isinstance(c, dict) else None
        raise nanosft.UserError(f"{path}: model_type {got!r}, only 'gpt2' can be imported")
    act = c.get("activation_function", "gelu_new")
    odd = [k for k, bad in (("activation_function", act not in GELU),
                            ("n_inner", c.get("n_inner") not in (None, 4 * c.get("n_embd", 0))),
                            ("tie_word_embeddings", c.get("tie_word_embeddings") is False),
                            ("scale_attn_weights", c.get("scale_attn_weights") is False),
                            ("scale_attn_by_inverse_layer_idx", c.get("scale_attn_by_inverse_layer_idx")),
                            ("layer_norm_epsilon", abs(c.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12)) if bad]
    if odd:
        raise nanosft.UserError(f"{path}: {odd[0]}={c.get(odd[0])!r} is not something this GPT computes")
    try:
        return nanosft.GPTConfig(block_size=c["n_positions"], vocab_size=c["vocab_size"], n_layer=c["n_layer"],
                            n_head=c["n_head"], n_embd=c["n_embd"], bias=True, gelu=GELU[act])
    except KeyError as e:
        raise nanosft.UserError(f"{path}: missing {e}")


def load_dir(path, expect_kind=None):
    """An HF GPT-2 directory as a checkpoint dict (what load_checkpoint returns). Reads only
    local files: nothing is ever downloaded."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise nanosft.UserError(f"{path}: is a directory, expected a checkpoint file or a Hugging Face GPT-2 "
                           f"directory ({cfg_file}: no such file)")
    c = read_json(cfg_file)
    cfg = gpt_config(c, cfg_file)
    sd = {k.removeprefix("transformer."): v for k, v in read_weights(path).items()}
    wte = sd.get("wte.weight")
    if wte is None or wte.dim() != 2:
        raise nanosft.UserError(f"{path}: the weights lack wte.weight, the token embedding")
    vocab, merges, pattern, where = read_bpe(path)
    tok = bpe_tokenizer(vocab, merges, pattern, wte.size(0), where)
    model = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        if k == "lm_head.weight" and not torch.equal(v, wte):
            raise nanosft.UserError(f"{path}: lm_head.weight differs from wte.weight; our GPT ties them")
        model[k] = (v.t() if k.endswith(CONV1D) else v).float()  # Conv1D (in, out) -> Linear (out, in)
    # The chat tokens GPT-2 lacks start as the MEAN of the existing embedding rows: a typical
    # input vector, and (tied) an output row whose logit is the average one, so adding them
    # neither disturbs the model nor makes it favour writing them before fine-tuning.
    new = tok.vocab_size - wte.size(0)
    model["wte.weight"] = torch.cat([model["wte.weight"], model["wte.weight"].mean(0).expand(new, -1)])
    model["lm_head.weight"] = model["wte.weight"]
    cfg.vocab_size = tok.vocab_size
    kind = c.get("nanosft_kind", "pretrain")  # written by our export; any other GPT-2 is a base model
    if expect_kind and kind not in expect_kind:
        raise nanosft.UserError(f"{path}: a '{kind}' model, expected one of {', '.join(expect_kind)}")
    return {"kind": kind, "model": model, "config": asdict(cfg), "tokenizer": tok.state(), "optimizer": None,
            "iter": 0, "rng": {"torch": torch.get_rng_state()}, "args": {}, "metrics": {}}




# ----------------------------------------------------------------------------------------
# export


# Our chat format (nanosft.render_chat, nanosft.chat_prompt) in Jinja: <|endoftext|>, then per message
# its role token, a space, the content and <|end|>; the generation prompt is <|assistant|>.
# Role tokens are whole literals (never '<|' + role + '|>'), so that
# apply_chat_template(..., sanitize_control_tokens=True) can tell them from typed text.
CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% else %}{{ raise_exception('role must be system, user or assistant') }}{% endif %}"
    "{{ ' ' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def spell(b):
    """A token's bytes as GPT-2's files write them (BYTE_CHARS): b" the" -> "Ġthe"."""
    return "".join(BYTE_CHARS[x] for x in b)


def merge_list(tok):
    """Our tiktoken ranks as GPT-2-style merges [left, right] (spelled), for a tokenizer that
    merges by merge order: tokenizer.json here, a GGUF in extras/gguf_export.py. tiktoken
    merges the adjacent pair whose merged token has the lowest rank, whichever two tokens it
    is made of; a merge list gives one rank per pair. So the list holds EVERY split of a token
    into two tokens, ordered by the token's id: the pairs that make a token come together, in
    the token's place."""
    return [[spell(b[:k]), spell(b[k:])] for b, _ in sorted(tok.ranks.items(), key=lambda x: x[1])
            for k in range(1, len(b)) if b[:k] in tok.ranks and b[k:] in tok.ranks]


def tokenizer_json(tok):
    """tokenizer.json (HF `tokenizers`) that gives exactly our tiktoken ids: our split regex
    as a Split pre-tokenizer, then bytes as GPT-2's characters, then merge_list. tiktoken
    also takes a chunk that is itself a token whole; `tokenizers` does that with
    ignore_merges. (Not covered: a chunk where two overlapping pairs make the same token;
    tiktoken takes the left one, HF the split listed first. Tests check whole texts in
    several scripts.)"""
    vocab = {spell(b): i for b, i in tok.ranks.items()}
    vocab.update(tok.special)  # also here, or `tokenizers` renumbers specials that follow a gap in the ids
    merges = merge_list(tok)
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in sorted(tok.special.items(), key=lambda x: x[1])]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
                byte_level]},
            "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": True, "vocab": vocab, "merges": merges}}


def model_card(checkpoint, model, tok, source):
    """README.md: what the model is, how to chat with it, and the training figures the
    checkpoint holds (its "metrics")."""
    cfg, a = model.config, checkpoint.get("args") or {}
    figures = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in (checkpoint.get("metrics") or {}).items()
               if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    table = "\n".join(["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in figures])
    run = ", ".join(f"`--{k.replace('_', '-')} {a[k]}`" for k in ("data", "max_iters", "batch_size", "lr", "seed")
                    if a.get(k) is not None)
    return f"""---
library_name: transformers
tags: [gpt2, nanosft]
---
# nanosft {checkpoint['kind']} model

Exported by nanosft's `export.py` from `{source}`, a `{checkpoint['kind']}` checkpoint after
{checkpoint.get('iter', 0)} steps{' (' + run + ')' if run else ''}. GPT-2 architecture: {cfg.n_layer} layers,
{cfg.n_head} heads, width {cfg.n_embd}, {cfg.block_size} positions, {model.num_params():,} parameters,
{tok.vocab_size:,} tokens, activation `{'gelu_new' if cfg.gelu == 'tanh' else 'gelu'}`.

## Chat format

```
<|endoftext|><|user|> question<|end|><|assistant|> answer<|end|>
```

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tok.apply_chat_template([{{"role": "user", "content": "Hi"}}], add_generation_prompt=True,
                              sanitize_control_tokens=True, return_tensors="pt", return_dict=False)
out = model.generate(ids, max_new_tokens=48,
                     eos_token_id=[tok.convert_tokens_to_ids("<|end|>"), tok.bos_token_id])
```

Special-token strings typed in a message (a literal `<|assistant|>`) are plain text in
nanosft. `apply_chat_template` keeps them as text only with `sanitize_control_tokens=True`;
without it they become the role tokens. `tok(text, split_special_tokens=True)` encodes
plain text the way nanosft does.

## Training figures

{table if figures else "The checkpoint holds none."}
"""


def save_dir(checkpoint, out, source="checkpoint"):
    """A checkpoint dict as an HF GPT-2 directory: config.json, model.safetensors (written by
    the `safetensors` package, the reference writer), tokenizer.json and tokenizer_config.json
    with the chat template, and a README.md model card."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise nanosft.UserError("export needs the safetensors package: pip install -r extras/requirements-dev.txt")
    model, tok = nanosft.model_from_checkpoint(checkpoint, source)
    cfg = model.config
    if cfg.n_prefix:
        raise nanosft.UserError(f"{source}: a prompt-tuned model ({cfg.n_prefix} prefix vectors); "
                           "GPT-2 has no place for them")
    if os.path.exists(out) and not os.path.isdir(out):
        raise nanosft.UserError(f"--out {out}: exists and is not a directory")
    tensors = {}
    for k, v in model.state_dict().items():
        if k != "lm_head.weight":  # tied: transformers restores it from wte
            tensors["transformer." + k] = (v.t() if k.endswith(CONV1D) else v).contiguous()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.bias is None and name != "lm_head":  # GPT-2 has them all
            tensors[f"transformer.{name}.bias"] = torch.zeros(m.out_features)
    chat = checkpoint["kind"] in ("sft", "dpo")
    eos = "<|end|>" if chat else "<|endoftext|>"
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
              "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
              "n_inner": None, "activation_function": "gelu_new" if cfg.gelu == "tanh" else "gelu",
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,  # nanosft trains without dropout
              "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True,
              "tie_word_embeddings": True, "use_cache": True, "bos_token_id": tok.endoftext,
              "eos_token_id": tok.special[eos], "pad_token_id": tok.pad, "dtype": "float32",
              "nanosft_kind": checkpoint["kind"]}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": eos,
                  "pad_token": "<|pad|>", "unk_token": None, "model_max_length": cfg.block_size,
                  "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, f".model.safetensors.tmp{os.getpid()}")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out, "model.safetensors"))
    nanosft.write_json(os.path.join(out, "config.json"), config)
    nanosft.write_json(os.path.join(out, "tokenizer.json"), tokenizer_json(tok))
    nanosft.write_json(os.path.join(out, "tokenizer_config.json"), tok_config)
    nanosft.save_checkpoint(os.path.join(out, "README.md"), model_card(checkpoint, model, tok, source))
    return model, tok
