"""The claims' measures on hand-made cases: what each should report, written out here.

    the knowledge probe   asks with exactly the tokens a pre-training document begins with
    never stopping        an answer that reaches its token budget without <|end|> is degenerate
    DPO's held-out pairs  the margin and preference accuracy are of log-RATIOS to the reference,
                          not of the policy's likelihoods alone"""
import pytest
import torch

import nanosft
from data import corpus, world_eval, world_qa
import dpo


def test_probe_prompts_are_how_pretraining_documents_begin(tok, monkeypatch):
    """A pre-training document is <|endoftext|> then its text (corpus.encode_corpus); the probe
    '<name> was born in' must be that document's first tokens, or it asks a prompt the model
    never read (a different number: 0.992 against 0.984 on the default world)."""
    asked = []

    def generate(model, prompts, max_new_tokens, stop, **kw):
        asked.extend(prompts)
        return [[] for _ in prompts]

    monkeypatch.setattr(nanosft, "generate_batch", generate)
    facts = world = world_eval.load_world()
    world_eval.knowledge_probe(None, tok, world)
    people = world_eval.probe_people(facts)
    expected = [(p["name"], a) for p in facts["people"] if p["name"] in people for a in facts["attributes"]]
    assert len(asked) == len(expected) == len(people) * len(facts["attributes"])
    for prompt, (name, attribute) in zip(asked, expected):
        sentence = world_eval.PROBE[attribute].format(n=name)
        document = corpus.encode_corpus(tok, f"{sentence} somewhere. More text.").tolist()
        assert prompt == document[:len(prompt)], sentence
        assert tok.decode(prompt) == "<|endoftext|>" + sentence


def test_an_answer_that_never_stops_is_counted_degenerate(tok, monkeypatch):
    """Three answers: one closed by <|end|>, one that ran to the token budget without it, one
    empty but closed. Only the second did not stop, and qa_eval counts it degenerate even
    though its text alone looks fine."""
    facts = world = world_eval.load_world()
    city = [r for r in world_qa.load_eval_rows("heldout") if r["attribute"] == "city"][:3]
    person = {p["name"]: p for p in facts["people"]}
    answers = [tok.encode(f" {r['person']} was born in {person[r['person']]['city']}.") for r in city]
    outs = [answers[0] + [tok.end], answers[1], [tok.end]]

    def generate(model, prompts, max_new_tokens, stop, keep_stop=False, **kw):
        assert keep_stop and tok.end in stop
        return [list(o) for o in outs]

    monkeypatch.setattr(nanosft, "generate_batch", generate)
    texts, ended = world_qa.answer_questions(None, tok, [r["prompt"] for r in city], max_new_tokens=len(answers[1]))
    assert ended == [True, False, True]
    assert texts[:2] == [tok.decode(answers[0]).strip(), tok.decode(answers[1]).strip()] and texts[2] == ""
    result = world_qa.qa_eval(None, tok, world, city)
    assert result["accuracy"] == pytest.approx(2 / 3)  # the cut-off answer is right, as text
    assert [bool(d) for d in result["degenerate"]] == [False, True, False]
    assert result["degenerate"][1] == "no end token"
    assert result["degenerate_rate"] == pytest.approx(1 / 3)


def test_held_out_margin_and_accuracy_are_of_log_ratios_to_the_reference():
    """Four held-out pairs whose reference disagrees with the policy's plain likelihood:
    the margin is beta x ((pi_c - ref_c) - (pi_r - ref_r)), written out for each pair here;
    a tie counts half. The plain likelihood (pi_c > pi_r) is reported apart, as logp_accuracy."""
    ref = (torch.tensor([-1.0, -9.0, -2.0, -3.0]), torch.tensor([-5.0, -1.0, -2.0, -3.0]))
    policy = (torch.tensor([-2.0, -4.0, -6.0, -3.0]), torch.tensor([-4.0, -8.0, -1.0, -3.0]))
    held = dpo.heldout_rewards(policy, ref, beta=0.5)
    # pair 1: (-2 + 1) - (-4 + 5) = -2;  pair 2: (-4 + 9) - (-8 + 1) = 12;
    # pair 3: (-6 + 2) - (-1 + 2) = -5;  pair 4: 0 (a tie)
    margins = 0.5 * torch.tensor([-2.0, 12.0, -5.0, 0.0])
    torch.testing.assert_close(held["margins"], margins)
    assert held["margin"] == pytest.approx(margins.mean().item())
    assert held["pref_accuracy"] == pytest.approx((0 + 1 + 0 + 0.5) / 4)
    assert held["logp_accuracy"] == pytest.approx(2 / 4)  # pairs 1 and 2: what the margin must NOT be
    same = dpo.heldout_rewards(ref, ref, beta=0.5)  # the policy is the reference: every margin 0, accuracy a coin flip
    assert same["margin"] == 0 and same["pref_accuracy"] == 0.5
