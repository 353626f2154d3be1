"""Tokenizer, model, generation, checkpoints, world data: the core every stage relies on."""
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch

import finetune
from extras import cross_domain
import nanosft
import sample
from conftest import ROOT, SAMPLE_TEXT, tiny_gpt
from extras.bench import encode_python
from nanosft import cpu_has_native_bf16

sys.path.insert(0, ROOT)
from data import world as W  # noqa: E402
from data import world_eval, world_qa  # noqa: E402


def random_unicode(rng, n):
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF),
              (0x600, 0x6FF), (0x900, 0x97F), (0x300, 0x36F), (0x3040, 0x30FF), (0x4E00, 0x4FFF),
              (0xAC00, 0xAD00), (0x1F300, 0x1F64F), (0x0, 0x1F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_bpe_round_trips_any_unicode(tok):
    rng = random.Random(0)
    for _ in range(200):
        s = random_unicode(rng, rng.randint(0, 40))
        assert tok.decode(tok.encode(s)) == s
    s = "".join(chr(i) for i in range(256)) + "\r\n\t  \x00 ǅ 𝕏 👩‍👩‍👧"
    assert tok.decode(tok.encode(s)) == s


def test_bpe_learns_merges_and_compresses(tok):
    ids = tok.encode(SAMPLE_TEXT[:5000])
    assert len(ids) < len(SAMPLE_TEXT[:5000].encode()) / 2.5  # real compression
    assert tok.vocab_size == 600


def test_the_verifier_uses_the_generators_constants():
    """world_eval/world_qa grade with the attributes, probe prompts and closings that
    data/world.py writes the world with (the generator imports nothing from them)."""
    assert cross_domain.ATTRS == W.ATTRS == world_eval.load_world()["attributes"]
    assert world_eval.PROBE == {a: re.split(r" \{[av]\}", t[0])[0] for a, t in W.TEMPLATES.items()}
    assert world_qa.CLOSINGS == (W.POLITE, W.RUDE, W.RAMBLE) and world_qa.POLITE == W.POLITE


def test_the_world_ships_the_bpe_that_training_on_its_corpus_learns():
    """A default pre-training loads data/world_tokenizer.json instead of training: it must be
    exactly what nanosft.train_tokenizer learns from the corpus at the world's vocabulary."""
    import pretrain

    with open(os.path.join(ROOT, "data", "world_tokenizer.json"), encoding="utf-8") as f:
        shipped = json.load(f)
    corpus = open(os.path.join(ROOT, "data", "world_corpus.txt"), encoding="utf-8").read()
    trained = nanosft.train_tokenizer(corpus, pretrain.WORLD_VOCAB)
    assert shipped["vocab_size"] == pretrain.WORLD_VOCAB
    assert [tuple(m) for m in shipped["merges"]] == trained.merges and len(trained.merges) > 1000
    logs = []
    _, tok = pretrain.new_model(corpus, "corpus", None, os.path.join(ROOT, "data"), nanosft.GPTConfig(), logs.append)
    assert tok.merges == trained.merges and "world_tokenizer.json" in logs[0]


def test_python_bpe_agrees_with_tiktoken(tok):
    rng = random.Random(1)
    texts = [SAMPLE_TEXT[i:i + 300] for i in range(0, 20000, 2000)]
    texts += [random_unicode(rng, 60) for _ in range(30)]
    texts += ["Hello world's   spaces\n\n  and 12345 numbers!!", "don't we'll they've"]
    for t in texts:
        assert encode_python(tok, t) == tok.encode(t), t


def test_typed_special_token_stays_text(tok):
    s = "<|assistant|> hi <|end|><|endoftext|>"
    ids = tok.encode(s)
    assert not set(ids) & set(tok.special.values())
    assert tok.decode(ids) == s
    ids, mask = nanosft.render_chat(tok, [{"role": "user", "content": s}, {"role": "assistant", "content": "ok"}])
    assert ids.count(tok.assistant) == 1 and ids.count(tok.end) == 2


def test_tokenizer_state_round_trip(tok):
    t2 = nanosft.Tokenizer.from_state(tok.state())
    assert t2.encode(SAMPLE_TEXT[:2000]) == tok.encode(SAMPLE_TEXT[:2000])
    assert t2.special == tok.special


def test_loss_at_init_is_ln_vocab(tok):
    model = tiny_gpt(tok)
    x = torch.randint(0, tok.vocab_size, (4, 32))
    y = torch.randint(0, tok.vocab_size, (4, 32))  # not x: tied weights favour the input token
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(tok.vocab_size)) < 0.1


def test_all_masked_batch_is_zero_not_nan(tok):
    model = tiny_gpt(tok)
    x = torch.randint(0, tok.vocab_size, (2, 8))
    y = torch.full_like(x, -1)
    _, loss = model(x, y)
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_kv_cache_matches_full_forward(tok):
    model = tiny_gpt(tok, seed=3).eval()
    prompt = tok.encode("Ada was born in")
    cached = sample.generate(model, prompt, 30, temperature=0)

    def no_cache(ids, n):  # re-run the whole prefix every token
        out = []
        for _ in range(n):
            logits, _ = model(torch.tensor([ids + out]))
            out.append(int(logits[0, -1].argmax()))
        return out
    assert cached == no_cache(prompt, len(cached)) and len(cached) == 30
    # cached logits themselves equal full-forward logits, also when several tokens are fed
    ids = torch.tensor([tok.encode("The birthplace of Ada Stone is Lisbon and more")])
    full, _ = model(ids)
    cache = nanosft.KVCache(model.config.n_layer)
    a, _ = model(ids[:, :3], cache=cache)
    b, _ = model(ids[:, 3:7], cache=cache)
    c, _ = model(ids[:, 7:], cache=cache)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=1e-5, atol=1e-5)


def test_batched_greedy_equals_single(tok):
    model = tiny_gpt(tok, seed=4).eval()
    prompts = [tok.encode(s) for s in ["Ada", "Ada Stone was", "Where is", "Leon Berg likes"]]
    batch = nanosft.generate_batch(model, prompts, 12, stop=set())
    for p, b in zip(prompts, batch):
        assert b == sample.generate(model, p, 12, temperature=0)


def test_sampling_respects_top_k_and_seed(tok):
    model = tiny_gpt(tok, seed=5)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = sample.generate(model, [1, 2, 3], 20, temperature=1.0, top_k=5, generator=g1)
    b = sample.generate(model, [1, 2, 3], 20, temperature=1.0, top_k=5, generator=g2)
    assert a == b
    logits = torch.randn(1, tok.vocab_size)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    assert all(sample.sample_next(logits, 1.0, 3, g) in allowed for _ in range(50))


def test_checkpoint_round_trip_in_fresh_process(tok, tmp_path):
    model = tiny_gpt(tok, seed=6)
    path = tmp_path / "m.pt"
    nanosft.save_checkpoint(str(path), nanosft.checkpoint_dict("pretrain", model, tok))
    x = torch.tensor([tok.encode("Ada Stone was born in Lisbon.")])
    expect = model(x)[0]
    m2, t2 = nanosft.model_from_checkpoint(nanosft.load_checkpoint(str(path)))
    assert torch.equal(m2(x)[0], expect)
    # a fresh process with nothing but the .pt (run from an empty folder)
    # same thread count as this process, so the float sums happen in the same order
    code = (f"import sys, torch; torch.set_num_threads({torch.get_num_threads()}); sys.path.insert(0, %r); import nanosft;"
            "m, t = nanosft.model_from_checkpoint(nanosft.load_checkpoint('m.pt'));"
            "x = torch.tensor([t.encode('Ada Stone was born in Lisbon.')]);"
            "torch.save(m(x)[0], 'out.pt')" % ROOT)
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expect)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(nanosft.UserError, match="refused"):
        nanosft.load_checkpoint(str(path))
    assert not marker.exists()


def test_world_is_deterministic_and_files_match_generator():
    a, b = W.build_files(1337), W.build_files(1337)
    assert a == b
    assert W.build_files(7)["world_corpus.txt"] != a["world_corpus.txt"]
    for name, text in a.items():  # the checked-in files are exactly what the generator writes
        with open(os.path.join(ROOT, "data", name), encoding="utf-8") as f:
            assert f.read() == text, f"data/{name} is stale: run python data/world.py"


def test_heldout_people_never_in_instruction_data():
    files = W.build_files(1337)
    world = json.loads(files["world.json"])
    held = world["heldout"]
    assert len(held) >= 40
    for name in ("world_sft.jsonl", "world_community.jsonl"):
        for n in held:
            assert n not in files[name], (n, name)
    corpus = files["world_corpus.txt"]
    assert all(n in corpus for n in held)  # ... but they are in the pre-training prose
    evals = [json.loads(l) for l in files["world_eval.jsonl"].splitlines()]
    assert {r["person"] for r in evals if r["split"] == "heldout"} == set(held)


def test_verifier_grades_answers():
    world = json.loads(W.build_files(1337)["world.json"])
    p = world["people"][0]
    good = W.gold_sentence(p["name"], "city", p["city"])
    other = next(v for v in W.VALUES["city"] if v != p["city"])
    assert world_eval.grade(world, p["name"], "city", good)
    assert not world_eval.grade(world, p["name"], "city", good.replace(p["city"], other))
    assert not world_eval.grade(world, p["name"], "city", f"{p['city']} or {other}")
    assert world["polite_marker"] == world_qa.POLITE  # the style the answers are graded by


def test_votes_prefer_correct_answers():
    world = json.loads(W.build_files(1337)["world.json"])
    threads = [json.loads(l) for l in W.build_files(1337)["world_community.jsonl"].splitlines()]
    top_ok = sum(world_eval.grade(world, t["person"], t["attribute"],
                         max(t["answers"], key=lambda a: a["up"] - a["down"])["text"]) for t in threads)
    assert top_ok / len(threads) > 0.95


def test_a_cpu_limited_to_avx2_has_no_native_bf16_and_auto_picks_fp32(monkeypatch):
    """Under ATEN_CPU_CAPABILITY=avx2 (docs/performance.md's emulation of an AVX2-only
    laptop) bf16 runs hundreds of times slower than fp32: --dtype auto must pick fp32 even
    where /proc/cpuinfo lists avx512_bf16."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu_has_native_bf16() is False
    assert nanosft.pick_dtype(torch.device("cpu"), "auto") == "float32"
    assert nanosft.pick_dtype(torch.device("cpu"), "bfloat16") == "bfloat16"  # asked for, given
