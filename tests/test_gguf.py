"""GGUF export (extras/gguf_export.py, export.py --gguf): the file holds every tensor of ours
under llama.cpp's gpt2 names and layout, the tokenizer and the chat template; transformers'
own GGUF reader loads it with our logits and our token ids; f16 and q8_0 convert what
llama.cpp's converter converts; a bad request is one line. Where llama.cpp is at hand
(node-llama-cpp, see extras/gguf_check.py), the check runs in it too.

The tiny models' weights are drawn large (std 0.5, as in test_gpt2.py), so that a wrong
transpose, a lost bias or the other GELU moves the logits far beyond 1e-4."""
import os

import numpy as np
import pytest
import torch

import nanosft
from conftest import SAMPLE_TEXT, tiny_gpt

from extras import export
from extras import gguf_check
from extras import hf

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

MULTI = "Café déjà vu, naïve façade. Привет, как дела? 日本語のテキストと中文字符。 Emoji 🎉👍🏽 ok. "
TEXTS = ["Ada Stone was born in Lisbon. Don't stop; it's 12,345 or 3.14!", MULTI,
         "emoji 🎉👍🏽🇺🇳 and   spaces\n\n\ttabs  ", "typed <|assistant|> and <|end|> stay plain text", ""]


def scramble(model, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return nanosft.train_tokenizer(SAMPLE_TEXT[:20_000] + MULTI * 20, 700)


def export_gguf(tmp, model, tok, kind="sft", file_type="f32"):
    """A checkpoint of `model` written and exported by export.py's command line -> (gguf path, reader)."""
    ckpt, out = os.path.join(tmp, f"{kind}.pt"), os.path.join(tmp, f"model-{file_type}.gguf")
    nanosft.save_checkpoint(ckpt, nanosft.checkpoint_dict(kind, model, tok))
    export.main(["--ckpt", ckpt, "--gguf", out, "--gguf-type", file_type])
    return out, gguf.GGUFReader(out)


def field(reader, key):
    return reader.fields[key].contents()


# ours: no biases, exact GELU; GPT-2's shape (an imported GPT-2): biases, tanh GELU
SHAPES = {"ours": {}, "gpt2": {"bias": True, "gelu": "tanh"}}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_tensor_is_ours_under_llama_cpps_gpt2_names(shape, tok, tmp_path):
    model = scramble(tiny_gpt(tok, **SHAPES[shape]))
    _, r = export_gguf(str(tmp_path), model, tok)
    tensors = {t.name: t for t in r.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, 2)
    want = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for name, m in model.named_modules():  # llama.cpp's gpt2 requires every bias: ours are written as zeros
        if isinstance(m, torch.nn.Linear) and m.bias is None and name != "lm_head":
            want[f"{name}.bias"] = torch.zeros(m.out_features)
    assert len(want) == len(tensors) == 4 + 12 * 2  # embeddings and final norm, 12 per block
    assert "output.weight" not in tensors  # tied: llama.cpp's gpt2 falls back to token_embd
    for k, v in want.items():
        t = tensors[names.get_name(k, try_suffixes=(".weight", ".bias"))]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == list(reversed(v.shape))  # GGUF lists dims innermost first: {in, out}
        np.testing.assert_array_equal(t.data, v.numpy())  # nn.Linear's (out, in): no transpose
    assert list(tensors["blk.0.attn_qkv.weight"].shape) == [32, 96]  # as llama.cpp asks: {n_embd, 3 n_embd}
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [128, 32]  # {n_ff, n_embd}
    assert field(r, "general.architecture") == "gpt2"
    assert [field(r, f"gpt2.{k}") for k in ("context_length", "embedding_length", "feed_forward_length",
                                            "block_count", "attention.head_count")] == [64, 32, 128, 2, 2]
    assert field(r, "gpt2.attention.layer_norm_epsilon") == pytest.approx(model.ln_f.eps)
    assert field(r, "general.file_type") == gguf.LlamaFileType.ALL_F32


def test_tokenizer_and_chat_template_round_trip(tok, tmp_path):
    _, r = export_gguf(str(tmp_path), tiny_gpt(tok), tok)
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == tok.vocab_size
    for b, i in list(tok.ranks.items())[:400]:
        assert tokens[i] == hf.spell(b) and types[i] == gguf.TokenType.NORMAL
    assert tokens[tok.ranks[b" the"]] == "Ġthe"
    for s, i in tok.special.items():
        assert tokens[i] == s and types[i] == gguf.TokenType.CONTROL  # typed "<|end|>" stays text
    merges = field(r, "tokenizer.ggml.merges")
    assert len(merges) == len(hf.merge_list(tok)) and merges[0] == " ".join(hf.merge_list(tok)[0])
    assert (field(r, "tokenizer.ggml.model"), field(r, "tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    assert [field(r, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")] == [
        tok.endoftext, tok.end, tok.pad]
    assert field(r, "tokenizer.ggml.add_bos_token") is False  # the template writes <|endoftext|>
    assert field(r, "tokenizer.chat_template") == hf.CHAT_TEMPLATE


def test_an_imported_gpt2_exports_with_its_own_tokenizer(tmp_path):
    """A transformers GPT-2 with its own BPE and padded embedding rows: the rows no token has
    become UNUSED "[PAD<id>]" tokens, <|endoftext|> stays where GPT-2 has it, its biases are
    its own."""
    tr = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([SAMPLE_TEXT[:5_000]], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    rows, d = bpe.get_vocab_size() + 3, str(tmp_path / "gpt2")
    os.makedirs(d)
    bpe.model.save(d)
    import json
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(dict(bpe.get_vocab(), **{"<|endoftext|>": rows - 1}), f)
    ref = scramble(tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=rows, n_positions=32, n_embd=32, n_layer=1,
                                                    n_head=2)))
    ref.save_pretrained(d)
    out = str(tmp_path / "gpt2.gguf")
    export.main(["--ckpt", d, "--gguf", out])
    r = gguf.GGUFReader(out)
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert tokens[rows - 3: rows] == [f"[PAD{rows - 3}]", f"[PAD{rows - 2}]", "<|endoftext|>"]
    assert types[rows - 3: rows] == [gguf.TokenType.UNUSED] * 2 + [gguf.TokenType.CONTROL]
    assert field(r, "tokenizer.ggml.bos_token_id") == rows - 1
    assert field(r, "tokenizer.ggml.add_bos_token") is True  # a base model: prompts start with it
    bias = next(t for t in r.tensors if t.name == "blk.0.attn_qkv.bias")
    np.testing.assert_array_equal(bias.data, ref.transformer.h[0].attn.c_attn.bias.detach().numpy())


def load_gguf(tr, path, **config):
    return tr.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                   n_positions=64, **config).eval()


def test_transformers_loads_the_gguf_with_our_logits_and_ids(tok, tmp_path):
    """transformers' GGUF reader for gpt2 reads context_length as n_ctx, not n_positions
    (the position table's size), so n_positions is passed; and it assumes GPT-2's gelu_new.
    The tanh model matches to 1e-4; ours (exact GELU) as loaded differs by the approximation
    (~1e-3 with these large weights, docs/gguf.md) and matches once told activation "gelu"."""
    tr = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers loads a GGUF only with it
    ids = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    gaps = {}
    for shape, kw in SHAPES.items():
        model = scramble(tiny_gpt(tok, **kw))
        path, _ = export_gguf(str(tmp_path / shape), model, tok)
        with torch.no_grad():
            ours = model(ids)[0]
            gaps[shape] = (load_gguf(tr, path)(ids).logits - ours).abs().max().item()
            if shape == "ours":
                exact = load_gguf(tr, path, activation_function="gelu")
                torch.testing.assert_close(exact(ids).logits, ours, atol=1e-4, rtol=0)
    assert gaps["gpt2"] < 1e-4
    assert 1e-4 < gaps["ours"] < 1e-2, gaps  # tanh in place of the exact GELU: real, and small
    hf_tok = tr.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in TEXTS:
        assert hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == tok.encode(text)


def test_f16_and_q8_0_convert_the_matrices_only(tok, tmp_path):
    """llama.cpp's converter's rules: 1-D tensors (norms, biases) and position_embd stay f32;
    q8_0 needs rows in blocks of 32, else that matrix is f16 (width 48: every matrix but
    ffn_down, whose rows are 4 x 48)."""
    T = gguf.GGMLQuantizationType
    for file_type, width, want in (("f16", 32, {"token_embd.weight": T.F16, "blk.0.ffn_up.weight": T.F16}),
                                   ("q8_0", 32, {"token_embd.weight": T.Q8_0, "blk.0.attn_qkv.weight": T.Q8_0}),
                                   ("q8_0", 48, {"token_embd.weight": T.F16, "blk.0.ffn_down.weight": T.Q8_0})):
        model = scramble(tiny_gpt(tok, n_embd=width))
        _, r = export_gguf(str(tmp_path / f"{file_type}{width}"), model, tok, file_type=file_type)
        types = {t.name: t.tensor_type for t in r.tensors}
        for name, t in types.items():
            if name.endswith(".bias") or "norm" in name or name == "position_embd.weight":
                assert t == T.F32, name
        assert {k: types[k] for k in want} == want
        qkv = next(t for t in r.tensors if t.name == "blk.0.attn_qkv.weight")
        back = gguf.quants.dequantize(qkv.data, qkv.tensor_type)
        err = np.abs(back - model.h[0].attn.c_attn.weight.detach().numpy()).max()
        assert err < 0.02, err  # f16 rounding, or q8_0's 1/127 of a block's largest weight


@pytest.mark.parametrize("argv, says", [
    (["--gguf", "m.gguf", "--gguf-type", "q4"], "invalid choice: 'q4'"),
    (["--gguf-type", "f16"], "--gguf-type needs --gguf"),
    (["--gguf", "m.gguf", "--out", "hf"], "not allowed with"),
    (["--gguf", "."], "is a directory"),
])
def test_a_bad_request_is_one_line(argv, says, tok, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing lands in the repository, whatever the outcome
    ckpt = str(tmp_path / "sft.pt")
    nanosft.save_checkpoint(ckpt, nanosft.checkpoint_dict("sft", tiny_gpt(tok), tok))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        nanosft.cli(lambda: export.main(["--ckpt", ckpt, *argv]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err, err


def test_the_check_in_llama_cpp(tok, tmp_path, capsys):
    """extras/gguf_check.py in llama.cpp (skipped without node and node-llama-cpp): the same
    token ids, the chat template, and probabilities close to ours (a small untrained model)."""
    node_dir = os.environ.get("NODE_LLAMA_DIR", "/tmp/llama")
    if not gguf_check.find_node_llama(node_dir):
        pytest.skip(f"no node-llama-cpp in {node_dir} (set NODE_LLAMA_DIR)")
    ckpt = str(tmp_path / "sft.pt")
    nanosft.save_checkpoint(ckpt, nanosft.checkpoint_dict("sft", tiny_gpt(tok), tok))
    fig = gguf_check.main(["--ckpt", ckpt, "--node-dir", node_dir, "--questions", "2", "--max-new-tokens", "8"])
    assert fig["tokens_same"] == fig["tokens_total"] and fig["chat_template_same"], capsys.readouterr().out
    assert fig["max_dp_f32"] < 1e-3 and fig["greedy_f32"] == 2
