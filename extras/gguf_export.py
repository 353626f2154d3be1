"""
A checkpoint as a GGUF file, the format llama.cpp and Ollama run (extras/export.py --gguf):

    save_gguf(checkpoint, path, file_type)   checkpoint dict -> one .gguf file

Our GPT is GPT-2's architecture, so the file is llama.cpp's "gpt2" architecture, written as
llama.cpp's own converter (convert_hf_to_gguf.py, GPT2Model) writes a GPT-2:
  - tensor names from the `gguf` package's own map (wte -> token_embd, h.N.attn.c_attn ->
    blk.N.attn_qkv, ln_f -> output_norm, ...); no output.weight: the output layer is tied,
    and llama.cpp's gpt2 loader then uses token_embd for it (as the converter's files do).
  - every weight in nn.Linear's (out, in) layout, which is what the converter gets after it
    transposes GPT-2's Conv1D weights; GGUF lists the dims innermost first: {in, out}.
  - every bias llama.cpp's gpt2 requires: ours are zeros (GPTConfig(bias=False)), an
    imported GPT-2's are its own.
  - f16 and q8_0 convert the matrices only; 1-D tensors (LayerNorm gains, biases) and the
    position embeddings stay f32, and a matrix whose rows q8_0's blocks of 32 do not divide
    falls back to f16, the converter's rules.

The tokenizer is GPT-2's kind ("gpt2": byte-level BPE with GPT-2's pre-tokenizer, "gpt-2"),
spelled in GPT-2's byte characters, with hf.merge_list's merges; our special tokens are
CONTROL tokens, so text typed as "<|end|>" stays text when text is tokenized as text (a
rendered chat template is tokenized with its special tokens: docs/gguf.md); the chat template
is the Jinja one of the Hugging Face export.

One difference is not the file's to fix: llama.cpp's gpt2 computes GELU with the tanh
approximation (GPT-2's), while our models use the exact one (GPTConfig gelu="none"). A model
of ours therefore runs there with a slightly different activation (docs/gguf.md has the size);
an imported GPT-2 (gelu="tanh") runs with its own (up to the rounding of llama.cpp's fp16
GELU table, which every model has).
"""
import os

import nanosft
import torch
from extras import hf

# --gguf-type -> (the matrices' tensor type, the file's type), as the `gguf` package names them
FILE_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise nanosft.UserError("GGUF export needs the gguf package: pip install -r extras/requirements-dev.txt")
    return gguf


def gguf_tensors(model, gguf):
    """(GGUF name, float32 numpy array) of every tensor llama.cpp's gpt2 loads, zero biases
    added where our linear layers have none."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, model.config.n_layer)
    sd = {k: v.detach().float() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.bias is None and name != "lm_head":
            sd[f"{name}.bias"] = m.weight.new_zeros(m.out_features)
    out = []
    for k, v in sd.items():
        new = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise nanosft.UserError(f"GGUF export: no gpt2 tensor for our {k}")
        out.append((new, v.contiguous().numpy()))
    return out


def tensor_type(name, array, file_type, gguf):
    """The converter's rule for a tensor's type under a file type (see the module docstring)."""
    one_d_or_norm = array.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
    if one_d_or_norm or name.startswith("position_embd."):
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType[FILE_TYPES[file_type][0]]


def vocabulary(tok, gguf):
    """(tokens, token types) for ids 0 .. vocab_size-1: tokens in GPT-2's byte characters, our
    specials as CONTROL, and an UNUSED "[PAD<id>]" for an id no token has (an imported GPT-2
    whose embedding rows were padded), as the converter writes them."""
    by_id = {i: hf.spell(b) for b, i in tok.ranks.items()}
    by_id.update({i: s for s, i in tok.special.items()})
    T = gguf.TokenType
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(tok.vocab_size)]
    types = [T.CONTROL if i in tok.special.values() else T.NORMAL if i in by_id else T.UNUSED
             for i in range(tok.vocab_size)]
    return tokens, types


def save_gguf(checkpoint, path, file_type="f32", source="checkpoint"):
    """Write `checkpoint` to `path` (atomically) as a GGUF of llama.cpp's gpt2. Returns (model,
    tokenizer, {tensor type name: how many tensors})."""
    gguf = import_gguf()
    model, tok = nanosft.model_from_checkpoint(checkpoint, source)
    cfg = model.config
    if cfg.n_prefix:
        raise nanosft.UserError(f"{source}: a prompt-tuned model ({cfg.n_prefix} prefix vectors); "
                                "GPT-2 has no place for them")
    if tok.pattern != nanosft.SPLIT_PATTERN:
        raise nanosft.UserError(f"{source}: the tokenizer splits text with its own pattern; llama.cpp's gpt2 "
                                "tokenizer has only GPT-2's")
    if os.path.isdir(path):
        raise nanosft.UserError(f"--gguf {path}: is a directory, expected a file name")
    chat = checkpoint["kind"] in ("sft", "dpo")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    # the model: what llama.cpp's gpt2 reads (convert_hf_to_gguf.py's GPT2Model writes the same)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"nanosft {checkpoint['kind']}")
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(model.h[0].mlp.c_fc.out_features)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(model.ln_f.eps)  # nn.LayerNorm's default, 1e-5, in every norm
    w.add_file_type(gguf.LlamaFileType[FILE_TYPES[file_type][1]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # the tokenizer
    tokens, types = vocabulary(tok, gguf)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2's split pattern, which is ours (nanosft.SPLIT_PATTERN)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) for m in hf.merge_list(tok)])
    w.add_bos_token_id(tok.endoftext)
    w.add_eos_token_id(tok.end if chat else tok.endoftext)
    w.add_pad_token_id(tok.pad)
    # a chat prompt writes <|endoftext|> itself (the template); a plain prompt starts with it,
    # as in sample.py
    w.add_add_bos_token(not chat)
    w.add_add_eos_token(False)
    w.add_chat_template(hf.CHAT_TEMPLATE)
    counts = {}
    for name, array in gguf_tensors(model, gguf):
        qtype = tensor_type(name, array, file_type, gguf)
        try:
            data = gguf.quants.quantize(array, qtype)
        except gguf.QuantError:  # rows not a multiple of q8_0's block: f16, as the converter does
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(array, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return model, tok, counts
