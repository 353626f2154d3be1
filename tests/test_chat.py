"""sample.py --chat: streaming, split UTF-8 characters, the history, the context limit, input's end."""
import io
import os
import select
import subprocess
import sys
import time

import pytest
import torch

import nanosft
import sample
from conftest import ROOT, tiny_gpt

WORD = " the"  # a single token in the test tokenizer


def parrot(tok, **kw):
    """A tiny model that answers anything with WORD, over and over: its final LayerNorm
    ignores its input and always hands the (tied) head WORD's own, enlarged, embedding."""
    model = tiny_gpt(tok, **kw)
    [w] = tok.encode(WORD)
    with torch.no_grad():
        model.wte.weight[w] *= 50
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(model.wte.weight[w])
    return model


def answer(n):
    """What the parrot says with --max-new-tokens n, as printed and as kept in the history."""
    return (WORD * n).strip()


@pytest.fixture
def sft_ckpt(tok, tmp_path):
    path = str(tmp_path / "sft.pt")
    nanosft.save_checkpoint(path, nanosft.checkpoint_dict("sft", parrot(tok), tok))
    return path


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


@pytest.fixture
def prompts(monkeypatch):
    """Records the prompt ids of every answer the chat asks the model for."""
    seen = []
    real = sample.stream

    def spy(model, ids, *a, **k):
        seen.append(list(ids))
        return real(model, ids, *a, **k)
    monkeypatch.setattr(sample, "stream", spy)
    return seen


def chat_main(monkeypatch, capsys, ckpt, lines, *flags):
    """sample.py --chat in this process, with `lines` as piped input; returns (stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(l + "\n" for l in lines)))
    capsys.readouterr()
    sample.main(["--ckpt", ckpt, "--chat", "--temperature", "0", *flags])
    return capsys.readouterr()


# ---- streaming


def test_stream_decoder_holds_back_a_character_split_across_tokens(tok):
    for text in (" café au lait", " naïve 🙂 ok"):
        ids = tok.encode(text)
        assert any("\ufffd" in tok.decode([i]) for i in ids)  # the tokens do split a character
        d = sample.StreamDecoder(tok)
        pieces = [d.push(i) for i in ids] + [d.flush()]
        assert not any("\ufffd" in p for p in pieces), pieces
        assert "".join(pieces) == text
    # raw bytes (ids < 256 are single bytes): nothing until the character is whole, then at once
    d = sample.StreamDecoder(tok)
    assert [d.push(b) for b in "🙂".encode()] == ["", "", "", "🙂"]
    assert d.flush() == ""
    # an answer that ends inside a character: flush gives what is left, marked as broken
    d = sample.StreamDecoder(tok)
    assert d.push("é".encode()[0]) == ""
    assert d.flush() == "\ufffd"


def test_answer_is_printed_while_it_is_generated(tok, monkeypatch):
    """Each token's text is on the screen before the next token is drawn."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    on_screen = []
    real = sample.stream

    def spy(*a, **k):
        for t in real(*a, **k):
            on_screen.append(out.getvalue())
            yield t
    monkeypatch.setattr(sample, "stream", spy)
    sample.Chat(parrot(tok), tok, torch.Generator(), max_new_tokens=4, temperature=0.0, top_k=0).ask("Hi")
    assert on_screen == ["", "the", "the the", "the the the"]
    assert out.getvalue() == answer(4) + "\n"


# ---- the conversation


def test_piped_two_turns_second_prompt_holds_the_first_exchange(tok, sft_ckpt, monkeypatch, capsys, prompts):
    out, err = chat_main(monkeypatch, capsys, sft_ckpt, ["Where was Ada born?", "", "And her hobby?"],
                         "--max-new-tokens", "3")
    assert out == f"{answer(3)}\n{answer(3)}\n"  # two answers, no prompt marks; the blank line is no turn
    assert err == ""
    assert prompts == [nanosft.chat_prompt(tok, [user("Where was Ada born?")]),
                       nanosft.chat_prompt(tok, [user("Where was Ada born?"), bot(answer(3)), user("And her hobby?")])]


def test_reset_clears_the_history_and_quit_ends(tok, sft_ckpt, monkeypatch, capsys, prompts):
    out, err = chat_main(monkeypatch, capsys, sft_ckpt, ["Hi", "/reset", "Who is Ada?", "/quit", "never read"],
                         "--max-new-tokens", "2")
    assert prompts == [nanosft.chat_prompt(tok, [user("Hi")]), nanosft.chat_prompt(tok, [user("Who is Ada?")])]
    assert out == f"{answer(2)}\n{answer(2)}\n"
    assert err == "[history cleared]\n"


def test_a_long_conversation_drops_the_oldest_exchanges(tok, sft_ckpt, monkeypatch, capsys, prompts):
    lines = [f"Question number {i}: where was Ada Stone born and what is her hobby?" for i in range(6)]
    out, err = chat_main(monkeypatch, capsys, sft_ckpt, lines, "--max-new-tokens", "8")
    block, reserve = 64, 8
    turns = []
    for line, ids in zip(lines, prompts):
        turns += [user(line)]
        assert len(ids) <= block - reserve
        # the prompt is the newest exchanges, as many as fit: one more would not
        kept = next(k for k in range(1, len(turns) + 1, 2) if nanosft.chat_prompt(tok, turns[-k:]) == ids)
        assert kept == len(turns) or len(nanosft.chat_prompt(tok, turns[-kept - 2:])) > block - reserve
        turns += [bot(answer(8))]
    assert out == f"{answer(8)}\n" * len(lines)
    assert "[dropped the oldest exchange to fit the 64-token context]" in err
    assert len(prompts[-1]) < len(nanosft.chat_prompt(tok, turns[:-1]))  # something was dropped


def test_fit_context_drops_whole_exchanges_oldest_first(tok):
    turns = [user("one two three"), bot("four five"), user("six seven"), bot("eight"), user("nine ten")]
    def size(t):
        return len(nanosft.chat_prompt(tok, t))
    ids, kept, dropped, cut = sample.fit_context(tok, turns, size(turns[2:]) + 10, 10)
    assert (kept, dropped, cut) == (turns[2:], 1, 0) and ids == nanosft.chat_prompt(tok, turns[2:])
    ids, kept, dropped, cut = sample.fit_context(tok, turns, size(turns[2:]) + 9, 10)
    assert (kept, dropped, cut) == (turns[4:], 2, 0)
    _, kept, dropped, cut = sample.fit_context(tok, turns, size(turns) + 10, 10)
    assert (kept, dropped, cut) == (turns, 0, 0)


def test_a_user_turn_longer_than_the_context_is_cut_from_the_left(tok, sft_ckpt, monkeypatch, capsys, prompts):
    words = " ".join(f"word{i}" for i in range(100))
    out, err = chat_main(monkeypatch, capsys, sft_ckpt, ["Hello", words + " so where was Ada born?"],
                         "--max-new-tokens", "8")
    assert len(prompts[1]) <= 64 - 8
    assert tok.decode(prompts[1][2:-2]).endswith("word99 so where was Ada born?")  # the end is kept
    assert prompts[1][:2] == [tok.endoftext, tok.user]  # the earlier exchange went first
    assert "[dropped the oldest exchange" in err
    assert "too long for the 64-token context: cut its first" in err
    assert out == f"{answer(8)}\n" * 2


def test_ctrl_c_during_an_answer_stops_only_that_answer(tok, sft_ckpt, monkeypatch, capsys):
    real, seen = sample.stream, []

    def interrupted(model, ids, *a, **k):
        seen.append(list(ids))
        if len(seen) == 1:  # the first answer: Ctrl-C after two tokens
            yield from list(real(model, ids, *a, **k))[:2]
            raise KeyboardInterrupt
        yield from real(model, ids, *a, **k)
    monkeypatch.setattr(sample, "stream", interrupted)
    out, err = chat_main(monkeypatch, capsys, sft_ckpt, ["Hi", "Again?"], "--max-new-tokens", "5")
    assert out == f"{answer(2)}\n{answer(5)}\n"  # the program went on to the next turn
    assert err == "[answer stopped]\n"
    # the partial answer stayed in the history as the assistant's turn
    assert seen[1] == nanosft.chat_prompt(tok, [user("Hi"), bot(answer(2)), user("Again?")])


# ---- the end, and wrong checkpoints


class CtrlCAtThePrompt(io.StringIO):
    def readline(self, *a):
        raise KeyboardInterrupt


def test_end_of_input_and_ctrl_c_at_the_prompt_exit_cleanly(sft_ckpt, monkeypatch, capsys):
    for stdin in (io.StringIO(""), CtrlCAtThePrompt()):
        monkeypatch.setattr(sys, "stdin", stdin)
        nanosft.cli(lambda: sample.main(["--ckpt", sft_ckpt, "--chat"]))  # returns: no SystemExit, status 0
    assert capsys.readouterr() == ("", "")


def test_chat_with_a_pretrain_checkpoint_is_one_line_error(tok, tmp_path, capsys):
    path = str(tmp_path / "pre.pt")
    nanosft.save_checkpoint(path, nanosft.checkpoint_dict("pretrain", tiny_gpt(tok), tok))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        nanosft.cli(lambda: sample.main(["--ckpt", path, "--chat"]))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "--chat needs a fine-tuned" in err, err


def test_piped_chat_in_a_real_process_exits_0_at_end_of_input(sft_ckpt):
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", sft_ckpt, "--chat", "--temperature", "0",
                        "--max-new-tokens", "3"], cwd=ROOT, input="Hi there\nAnd then?\n", capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{answer(3)}\n" * 2, "")


def test_one_shot_prompt_is_unchanged(sft_ckpt, monkeypatch, capsys):
    capsys.readouterr()
    sample.main(["--ckpt", sft_ckpt, "--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "3",
                 "--num-samples", "2"])
    assert capsys.readouterr().out == f"{answer(3)}\n{'-' * 40}\n{answer(3)}\n"


# ---- a real terminal


def read_until(fd, want, timeout=60):
    seen = b""
    end = time.time() + timeout
    while want not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.time()))
        if not ready:
            raise AssertionError(f"waited for {want!r}, got {seen!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the other side closed
            chunk = b""
        if not chunk:
            raise AssertionError(f"ended before {want!r}, got {seen!r}")
        seen += chunk
    return seen


def read_rest(fd):
    """What is left to read once the other side has exited."""
    seen = b""
    while select.select([fd], [], [], 1)[0]:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # closed: everything was read
            break
        if not chunk:
            break
        seen += chunk
    return seen


def test_terminal_session_prompts_answers_and_exits_at_ctrl_d(sft_ckpt):
    pty = pytest.importorskip("pty")
    try:
        master, slave = pty.openpty()
    except OSError:
        pytest.skip("no pseudo-terminals here")
    p = subprocess.Popen([sys.executable, "sample.py", "--ckpt", sft_ckpt, "--chat", "--temperature", "0",
                          "--max-new-tokens", "3"], cwd=ROOT, stdin=slave, stdout=slave, stderr=slave,
                         env=dict(os.environ, OMP_NUM_THREADS="1", TERM="dumb"))
    os.close(slave)
    try:
        assert b"/quit" in read_until(master, b"> ")  # the banner, then the prompt
        os.write(master, b"Where was Ada born?\n")
        assert answer(3).encode() in read_until(master, b"> ")
        os.write(master, b"/reset\n")
        assert b"[history cleared]" in read_until(master, b"> ")
        # Ctrl-D ends the input. (Ctrl-C at the prompt is tested above, in this process: sent
        # here, it may land in the instant after the prompt is shown and before input waits.)
        os.write(master, b"\x04")
        assert p.wait(timeout=60) == 0
        assert b"Traceback" not in read_rest(master)
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
