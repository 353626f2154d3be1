"""GPT-2 interop (hf.py, export.py): a Hugging Face GPT-2 directory imports with the logits
and token ids transformers gives; any checkpoint of ours exports to a directory transformers
loads with our logits, our token ids and our chat format; the stage scripts run on an
imported GPT-2; a missing or damaged file is a one-line error naming it.

The models are tiny (2 layers, width 32) with weights drawn large (std 0.5), so that the
mistakes these tests guard against move the logits far beyond 1e-4: an untransposed Conv1D
weight, exact GELU where GPT-2 uses tanh's approximation (at most 5e-4 apart per unit), a
missing bias."""
import dataclasses
import json
import os
import re
import shutil

import pytest
import torch

import nanosft
from conftest import SAMPLE_TEXT, tiny_gpt

from extras import export
import finetune
from extras import hf
import sample

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two

MULTI = ("Café déjà vu, naïve façade. Привет, как дела? Москва — столица. 日本語のテキストと"
         "中文字符。 Emoji 🎉👍🏽 ok. ")
TEXTS = ["Ada Stone was born in Lisbon. Don't stop; it's 12,345 or 3.14!",
         "Café déjà vu — naïve façade, Ærø, Łódź, Straße.",
         "Привет, как дела? Москва — столица России.",
         "日本語のテキスト、中文字符和한국어。",
         "emoji 🎉👍🏽🇺🇳 and   spaces\n\n\ttabs  ",
         "typed <|assistant|> and <|endoftext|><|end|> stay <|pad|>plain text",
         ""]


def scramble(model, seed=0):
    """Every weight, bias and LayerNorm gain drawn from N(0, 0.5), so each detail matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def one_line_error(main, argv, capsys):
    """main(argv) through nanosft.cli, as its command line runs it -> stderr (checked: one line,
    exit code 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        nanosft.cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ---- fixtures: a tiny HF GPT-2 made locally, and an export of a tiny checkpoint of ours


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A randomly initialised transformers GPT-2 with its own byte-level BPE (trained here by
    `tokenizers`, ids in its own order), saved as config.json + model.safetensors + vocab.json
    + merges.txt. <|endoftext|> is the last embedding row, as in GPT-2, here after a few
    unused rows (as in a vocabulary padded to a round size). Returns (dir, model, tokenizer)."""
    tr = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([SAMPLE_TEXT[:20_000], MULTI * 20], trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    rows = bpe.get_vocab_size() + 7
    d = str(tmp_path_factory.mktemp("gpt2"))
    bpe.model.save(d)  # merges.txt (and vocab.json, rewritten below with <|endoftext|>, as GPT-2's)
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(dict(bpe.get_vocab(), **{"<|endoftext|>": rows - 1}), f)
    torch.manual_seed(0)
    cfg = tr.GPT2Config(vocab_size=rows, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = scramble(tr.GPT2LMHeadModel(cfg)).eval()
    model.save_pretrained(d)
    return d, model, bpe


@pytest.fixture(scope="module")
def our_export(tmp_path_factory):
    """A tiny SFT checkpoint of ours (our BPE, trained on text in several scripts) exported
    with export.py. Returns (checkpoint path, model, tokenizer, export dir)."""
    pytest.importorskip("transformers")
    tok = nanosft.train_tokenizer(SAMPLE_TEXT[:20_000] + MULTI * 20, 700)
    model = scramble(tiny_gpt(tok)).eval()
    d = tmp_path_factory.mktemp("ours")
    ckpt, out = str(d / "sft.pt"), str(d / "hf")
    nanosft.save_checkpoint(ckpt, nanosft.checkpoint_dict("sft", model, tok, it=7, metrics={"heldout_accuracy": 0.875}))
    export.main(["--ckpt", ckpt, "--out", out])
    return ckpt, model, tok, out


# ---- 1. round trip: transformers GPT-2 -> ours -> transformers


def test_import_matches_transformers_and_exports_back(gpt2_dir, tmp_path):
    tr = pytest.importorskip("transformers")
    d, ref, bpe = gpt2_dir
    V = ref.config.vocab_size
    checkpoint = nanosft.load_checkpoint(d)
    model, tok = nanosft.model_from_checkpoint(checkpoint, d)
    model.eval()
    assert checkpoint["kind"] == "pretrain" and model.config.bias and model.config.gelu == "tanh"
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = ref(ids).logits
        ours = model(ids)[0]
    torch.testing.assert_close(ours[..., :V], theirs, atol=1e-4, rtol=0)

    # GPT-2's GELU is not ours: with the exact one the logits are off by more than 1e-4
    exact = nanosft.GPT(dataclasses.replace(model.config, gelu="none"))
    exact.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (exact.eval()(ids)[0][..., :V] - theirs).abs().max() > 1e-4

    # the chat tokens are new ids after GPT-2's, their rows the mean of GPT-2's rows
    assert tok.endoftext == V - 1
    assert sorted(tok.special[s] for s in nanosft.SPECIALS[1:]) == list(range(V, V + 5))
    mean = ref.transformer.wte.weight[:V].mean(0)
    for s in nanosft.SPECIALS[1:]:
        torch.testing.assert_close(model.wte.weight[tok.special[s]], mean)

    # the tokenizer: the same ids as `tokenizers` on GPT-2's files (ids in its own order)
    assert [bpe.token_to_id(c) for c in hf.BYTE_CHARS] != list(range(256))
    for text in TEXTS + [MULTI]:
        assert tok.encode(text) == bpe.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text

    # exported again: transformers gives our logits (the chat tokens' columns too) and ids
    out = str(tmp_path / "again")
    hf.save_dir(checkpoint, out, d)
    again = tr.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours, atol=1e-4, rtol=0)
    ht = tr.AutoTokenizer.from_pretrained(out)
    assert {s: ht.convert_tokens_to_ids(s) for s in nanosft.SPECIALS} == {s: tok.special[s] for s in nanosft.SPECIALS}
    for text in TEXTS:
        assert ht.encode(text, add_special_tokens=False, split_special_tokens=True) == tok.encode(text), text
    assert_same_when_imported(out, model, tok, "pretrain")


def assert_same_when_imported(hf_dir, model, tok, kind):
    """An export, imported again, is the same model and tokenizer."""
    checkpoint = nanosft.load_checkpoint(hf_dir)
    back, tok2 = nanosft.model_from_checkpoint(checkpoint, hf_dir)
    assert checkpoint["kind"] == kind and tok2.ranks == tok.ranks and tok2.special == tok.special
    ids = torch.randint(0, tok.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids)[0], model.eval()(ids)[0], atol=1e-5, rtol=0)


def test_weights_file_and_tokenizer_file_variants(gpt2_dir, tmp_path):
    """pytorch_model.bin instead of model.safetensors, tokenizer.json instead of vocab.json +
    merges.txt: the same checkpoint."""
    d, ref, bpe = gpt2_dir
    alt = tmp_path / "alt"
    alt.mkdir()
    shutil.copy(os.path.join(d, "config.json"), alt)
    torch.save(ref.state_dict(), alt / "pytorch_model.bin")
    t = json.loads(bpe.to_str())
    t["added_tokens"] = [{"id": ref.config.vocab_size - 1, "content": "<|endoftext|>", "special": True}]
    (alt / "tokenizer.json").write_text(json.dumps(t), encoding="utf-8")
    a, b = nanosft.load_checkpoint(d), nanosft.load_checkpoint(str(alt))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ta, tb = nanosft.Tokenizer.from_state(a["tokenizer"]), nanosft.Tokenizer.from_state(b["tokenizer"])
    assert ta.special == tb.special and all(ta.encode(t) == tb.encode(t) for t in TEXTS)


# ---- 2. export of our checkpoint


def test_export_gives_our_logits_and_token_ids(our_export):
    tr = pytest.importorskip("transformers")
    ckpt, model, tok, out = our_export
    theirs = tr.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, tok.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids)[0], atol=1e-4, rtol=0)

    ht = tr.AutoTokenizer.from_pretrained(out)
    for text in TEXTS + [MULTI, SAMPLE_TEXT[:3000]]:
        assert ht.encode(text, add_special_tokens=False, split_special_tokens=True) == tok.encode(text), text
        assert ht.decode(tok.encode(text)) == text
    # special tokens by id are ours; typed, they stay plain text (above)
    assert {s: ht.convert_tokens_to_ids(s) for s in nanosft.SPECIALS} == {s: tok.special[s] for s in nanosft.SPECIALS}

    assert_same_when_imported(out, model, tok, "sft")
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "| heldout_accuracy | 0.875 |" in card and "7 steps" in card


# ---- 3. the chat template


def test_chat_template_renders_our_chat_format(our_export):
    tr = pytest.importorskip("transformers")
    _, _, tok, out = our_export
    ht = tr.AutoTokenizer.from_pretrained(out)
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Где Москва? 🎉"},
            {"role": "assistant", "content": "Там. Hope this helps!"},
            {"role": "user", "content": "typed <|assistant|> and <|end|> are text"}]
    render = lambda c, **kw: ht.apply_chat_template(c, tokenize=True, return_dict=False,
                                                     sanitize_control_tokens=True, **kw)
    assert render(conv, add_generation_prompt=True) == nanosft.chat_prompt(tok, conv)
    assert render(conv[:3]) == nanosft.render_chat(tok, conv[:3])[0]
    # what the README says: without sanitize_control_tokens, typed role strings become roles
    plain = ht.apply_chat_template(conv, tokenize=True, return_dict=False)
    assert plain != nanosft.render_chat(tok, conv)[0] and plain.count(tok.assistant) == 2


# ---- 4. the stage scripts on an imported GPT-2


def answer_loss(model, tok, rows):
    """The mean next-token loss over every answer token (and its <|end|>) of prompt/response
    rows, from the chat format's text alone: what SFT's loss covers."""
    total, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            prompt = nanosft.chat_prompt(tok, [{"role": "user", "content": r["prompt"]}])
            ids = prompt + nanosft.encode_content(tok, r["response"]) + [tok.end]
            logp = torch.log_softmax(model.eval()(torch.tensor([ids[:-1]]))[0][0].double(), -1)
            total -= sum(logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))
            n += len(ids) - len(prompt)
    return total / n


def test_finetune_on_imported_gpt2_then_sample(gpt2_dir, tmp_path, capsys, monkeypatch):
    d, _, _ = gpt2_dir
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # keeps one_thread's setting: tiny model
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What is {a} plus {b}?", "response": f"{a + b}.", "split": "train"}
            for a in range(4) for b in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = str(tmp_path / "out")
    # every step is all 12 rows (all "train": none held out): step 1's loss is the imported
    # model's answer loss on them
    finetune.main(["--ckpt", d, "--data", str(data), "--max-iters", "5", "--batch-size", "12", "--lr", "1e-3",
                   "--warmup", "1", "--eval-interval", "5", "--log-interval", "1", "--out-dir", out,
                   "--dtype", "float32"])
    log = capsys.readouterr().out
    logged = [float(x) for x in re.findall(r"step +\d+/5 \| loss (\d+\.\d+)", log)]
    assert len(logged) == 5, log
    imported, tok0 = nanosft.model_from_checkpoint(nanosft.load_checkpoint(d), d)
    checkpoint = nanosft.load_checkpoint(os.path.join(out, "sft.pt"), expect_kind=("sft",))
    model, tok = nanosft.model_from_checkpoint(checkpoint)
    assert model.config.bias and model.config.gelu == "tanh"
    assert tok0.ranks == tok.ranks and tok0.special == tok.special  # saved and restored
    # fine-tuning moved the weights and lowered the answer loss, measured here from the text
    before, after = answer_loss(imported, tok, rows), answer_loss(model, tok, rows)
    assert logged[0] == pytest.approx(before, abs=1e-3)  # (printed to 4 decimals)
    assert any(not torch.equal(v, imported.state_dict()[k]) for k, v in model.state_dict().items())
    assert after < before - 0.1, (before, after)
    # sample.py at temperature 0 (its own one-sequence decoder) prints sft.pt's greedy answer, as
    # nanosft.generate_batch decodes it
    question = "What is 1 plus 2?"
    sample.main(["--ckpt", os.path.join(out, "sft.pt"), "--prompt", question, "--temperature", "0",
                 "--max-new-tokens", "8"])
    printed = capsys.readouterr().out
    prompt = nanosft.chat_prompt(tok, [{"role": "user", "content": question}])
    [greedy] = nanosft.generate_batch(model, [prompt], 8, stop={tok.end, tok.endoftext})
    # (not one token repeated: a decoder that lost its context, e.g. its KV cache, would repeat one)
    assert len(set(greedy)) > 1, greedy
    assert printed == tok.decode(greedy).strip() + "\n", (printed, tok.decode(greedy))


# ---- 5. bad input: one line, exit code 2, naming the file


def test_export_of_a_bad_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    err = one_line_error(export.main, ["--ckpt", str(bad), "--out", str(tmp_path / "hf")], capsys)
    assert "bad.pt: not a readable checkpoint" in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("damage, expect", [
    ("rm merges.txt", r"merges\.txt: no such file"),
    ("rm model.safetensors", r"model\.safetensors: no such file"),
    ("rm config.json", r"is a directory, expected a checkpoint file or a Hugging Face GPT-2 directory "
                       r"\(.*config\.json: no such file\)"),
    ("cut model.safetensors", r"model\.safetensors: not a readable safetensors file"),
    ("cut config.json", r"config\.json: not readable JSON"),
    ("cut vocab.json", r"vocab\.json: not readable JSON"),
])
def test_import_of_a_missing_or_damaged_file_is_one_line(gpt2_dir, damage, expect, tmp_path, capsys):
    d = str(tmp_path / "gpt2")
    shutil.copytree(gpt2_dir[0], d)
    how, name = damage.split()
    path = os.path.join(d, name)
    if how == "rm":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    err = one_line_error(sample.main, ["--ckpt", d, "--max-new-tokens", "2"], capsys)
    assert re.search(expect, err), err
