"""
Plain text: pre-training's corpus as a token stream, and any file's text read with one clear
error (every other format starts from read_text).

    read_text(path)              UTF-8 text; a BOM dropped, \\r\\n as \\n
    encode_corpus(tok, text)     documents (blank-line separated) -> one token stream
    split_corpus(data, block)    (train, val): the last 10% held out
    fixed_windows(data, block)   the same validation windows at every evaluation
"""

import torch

import nanosft


def read_text(path):
    """UTF-8 text (a BOM is dropped, \\r\\n becomes \\n). One clear error otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise nanosft.UserError(f"{path}: no such file")
    except IsADirectoryError:
        raise nanosft.UserError(f"{path}: is a directory, expected a file")
    except OSError as e:
        raise nanosft.UserError(f"{path}: cannot read ({e.strerror})")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise nanosft.UserError(
            f"{path}:{line}: not valid UTF-8 (byte offset {e.start}); expected UTF-8 text"
        )
    return text.replace("\r\n", "\n")


def encode_corpus(tok, text):
    """Plain text -> one token stream. Blank-line-separated documents (paragraphs of a book,
    biographies of the world) each start with <|endoftext|>, so that token is a familiar
    "a document begins here" marker when later prompts start with it (probes, chat)."""
    docs = [d for d in text.split("\n\n") if d.strip()]
    bodies = tok.enc.encode_ordinary_batch(docs)
    return torch.tensor([t for body in bodies for t in (tok.endoftext, *body)], dtype=torch.long)


def split_corpus(data, block_size):
    """(train, val): the last 10% of the stream is held out (at least one block)."""
    n_val = max(block_size + 1, len(data) // 10)
    return data[:-n_val], data[-n_val:]


def fixed_windows(data, block_size, n=32, batch=8):
    """Evenly spaced (input, target) windows of a stream, for a validation loss that is the
    same set of tokens at every evaluation."""
    T = block_size
    starts = torch.linspace(0, len(data) - T - 1, min(n, max(1, len(data) // T))).long()
    return [
        (
            torch.stack([data[s : s + T] for s in c.tolist()]),
            torch.stack([data[s + 1 : s + T + 1] for s in c.tolist()]),
        )
        for c in starts.split(batch)
    ]
