"""Parameter-efficient fine-tuning (nanopeft.py): OFT, LoRA and the int8 base. Each test
checks an equivalence or an invariant that a wrong constant or a swapped product breaks."""
import copy

import pytest
import torch

from extras import peft
from conftest import tiny_gpt


@pytest.fixture
def base(tok):
    return tiny_gpt(tok, seed=3, n_embd=32, n_head=2, n_layer=2)


def ids(tok, n=2, T=20, seed=0):
    return torch.randint(0, tok.vocab_size, (n, T), generator=torch.Generator().manual_seed(seed))


def train_steps(model, x, steps=5, lr=0.05):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_oft_starts_as_the_base_model_exactly(tok, base):
    x = ids(tok)
    adapted = peft.add_oft(copy.deepcopy(base), block=8)
    assert torch.equal(adapted(x)[0], base(x)[0])  # R = I at Q = 0: bit for bit


def test_oft_rotation_stays_orthogonal_and_only_its_parameters_learn(tok, base):
    x = ids(tok)
    adapted = peft.add_oft(copy.deepcopy(base), block=8)
    frozen = {k: v.clone() for k, v in adapted.state_dict().items() if not k.endswith(".q")}
    train_steps(adapted, x)
    layers = [m for m in adapted.modules() if isinstance(m, peft.OFTLinear)]
    assert len(layers) == 4 * 2  # c_attn, attn c_proj, c_fc, mlp c_proj in each of 2 blocks
    assert any(m.q.abs().max() > 1e-3 for m in layers)  # it did train
    for m in layers:
        R = m.rotation()
        eye = torch.eye(m.block).expand_as(R)
        assert (R.transpose(1, 2) @ R - eye).norm(dim=(1, 2)).max() < 1e-5
        assert not torch.allclose(R, eye)
    for k, v in adapted.state_dict().items():  # every base weight untouched
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".q") for n in trainable)


def test_oft_parameter_count_is_b_times_b_minus_1_over_2_per_block(tok, base):
    b = 8
    adapted = peft.add_oft(copy.deepcopy(base), block=b, where=("attn",))
    n = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    C = base.config.n_embd
    per_layer = (C // b) * b * (b - 1) // 2  # c_attn and c_proj both read C features
    assert n == base.config.n_layer * 2 * per_layer


def test_oft_merged_model_equals_the_adapted_forward(tok, base):
    x = ids(tok)
    adapted = peft.add_oft(copy.deepcopy(base), block=8)
    train_steps(adapted, x)
    merged = peft.plain_model(adapted)
    assert not any(isinstance(m, peft.OFTLinear) for m in merged.modules())
    torch.testing.assert_close(merged(x)[0], adapted(x)[0], rtol=0, atol=1e-4)


def test_oft_is_a_rotation_of_the_input_not_of_the_output(tok, base):
    """The merged weight is W R^T: a swapped product (R W, or W R) would fail this."""
    lin = base.h[0].attn.c_attn
    oft = peft.OFTLinear(copy.deepcopy(lin), 8)
    torch.nn.init.normal_(oft.q, 0, 0.5)
    x = torch.randn(3, lin.in_features)
    R = torch.block_diag(*oft.rotation().detach())
    torch.testing.assert_close(oft(x), lin(x @ R), rtol=0, atol=1e-5)
    # orthogonal: the rotated input keeps its length
    torch.testing.assert_close((x @ R).norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=1e-5)


def test_oft_block_must_divide_the_width(base):
    with pytest.raises(ValueError, match="must divide"):
        peft.add_oft(base, block=5)


def test_int8_base_rounds_within_half_a_step_and_takes_under_30_percent(tok, base):
    q = peft.quantize_base(copy.deepcopy(base))
    for (parent, name), (qparent, _) in zip(peft.projections(base), peft.projections(q)):
        w, m = getattr(parent, name).weight.data, getattr(qparent, name)
        step = w.abs().amax(dim=1, keepdim=True) / 127
        err = (m.dequantized() - w).abs()
        assert (err <= step / 2 + 1e-7).all()
        assert m.qweight.dtype == torch.int8
    assert peft.frozen_bytes(q) <= 0.30 * peft.frozen_bytes(base)
    x = ids(tok)
    assert (q(x)[0] - base(x)[0]).abs().max() < 0.05  # close, not equal


@pytest.mark.parametrize("adapter", ["lora", "oft"])
def test_adapters_on_an_int8_base_merge_into_plain_float_weights(tok, base, adapter):
    x = ids(tok)
    q = peft.quantize_base(copy.deepcopy(base))
    model = peft.add_lora(q, 4) if adapter == "lora" else peft.add_oft(q, 8)
    train_steps(model, x)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any("qweight" in n or "scale" in n for n in trainable)
    merged = peft.plain_model(model)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(merged(x)[0], model(x)[0], rtol=0, atol=1e-4)


def test_reparametrised_prompt_starts_as_its_vectors_trains_and_saves_plain(tok):
    """prefix = P + MLP(P), the MLP's last layer at zero: the same model at the start; after
    training both P and the MLP have moved, and plain_state bakes the MLP's output into an
    ordinary `prefix` that a PromptTuned model without the MLP loads and computes the same
    logits with."""
    base = tiny_gpt(tok, seed=5)
    model = peft.add_prompt(base, 4, seed=0)
    P0 = model.prefix.detach().clone()
    x = torch.randint(0, tok.vocab_size, (2, 12))
    before = model(x)[0]
    peft.reparametrise_prompt(model, 16)
    torch.testing.assert_close(model(x)[0], before, rtol=0, atol=0)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["parametrizations.prefix.0.down.bias", "parametrizations.prefix.0.down.weight",
                         "parametrizations.prefix.0.up.bias", "parametrizations.prefix.0.up.weight",
                         "parametrizations.prefix.original"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(model.prefix.detach(), P0)
    plain = peft.PromptTuned(model.config)
    plain.load_state_dict(peft.plain_state(model))
    torch.testing.assert_close(plain(x)[0], model(x)[0], rtol=0, atol=1e-6)


def test_prompt_from_task_words_copies_their_embeddings(tok):
    model = peft.add_prompt(tiny_gpt(tok, seed=6), 5, seed=0)
    peft.init_prompt(model, [7, 9])  # cycled to the prefix's length
    torch.testing.assert_close(model.prefix.detach(), model.wte.weight.detach()[[7, 9, 7, 9, 7]], rtol=0, atol=0)
