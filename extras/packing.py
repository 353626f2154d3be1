"""
Packed rows: several sequences in one row of a batch instead of one each, so short ones stop
paying for the longest (dpo.py --pack packs the answers of a step's pairs this way; without it,
one row per sequence). Every sequence restarts at position 0 and attends only to its own
earlier tokens: its logits are the ones it gets alone, up to float rounding.

    X, Y, S = pack(examples, pad_id)                  # S: the sequence of each token, -1: padding
    logits = packed_logits(model, X, packed_layout(S, block_size))   # or logits(model, X, S)
    sums = segment_sums(values, S)                    # per-token values -> one sum per sequence
"""
import torch


def pack(examples, pad_id):
    """Several sequences per row instead of one each, so short ones stop paying for the
    longest: sequences, longest first, go into the first row with room (first-fit
    decreasing). The row width is the one, from the longest sequence to twice that, that
    computes the fewest tokens in all. Returns X, Y (R, T) and S (R, T): the index in
    `examples` of the sequence each token belongs to, -1 on padding. Run the model with
    packed_logits(model, X, packed_layout(S, block_size)): each sequence sees only itself,
    at its own positions."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    lengths = [len(examples[i][0]) for i in order]

    def first_fit(T):
        rows = []  # [free width, [example indices]]
        for i, n in zip(order, lengths):
            row = next((r for r in rows if r[0] >= n), None)
            if row is None:
                row = [T, []]
                rows.append(row)
            row[0] -= n
            row[1].append(i)
        return rows

    T = min(range(lengths[0], 2 * lengths[0] + 1), key=lambda w: len(first_fit(w)) * w)
    rows = first_fit(T)
    X = torch.full((len(rows), T), pad_id, dtype=torch.long)
    Y = torch.full((len(rows), T), -1, dtype=torch.long)
    S = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, (_, idx) in enumerate(rows):
        at = 0
        for i in idx:
            x, y = examples[i]
            X[r, at:at + len(x)], Y[r, at:at + len(x)], S[r, at:at + len(x)] = x, y, i
            at += len(x)
    return X, Y, S


def packed_layout(S, block_size):
    """Positions and attention mask of packed rows: every sequence starts again at position
    0 and attends only to its own earlier tokens, exactly as if it had a row to itself.
    S (R, T) from `pack` -> pos (R, T), mask (R, 1, T, T)."""
    R, T = S.shape
    t = torch.arange(T, device=S.device)
    first = torch.ones_like(S, dtype=torch.bool)
    first[:, 1:] = S[:, 1:] != S[:, :-1]  # (R, T) a sequence starts here
    pos = t - torch.where(first, t, 0).cummax(dim=1).values  # (R, T) index within its sequence
    if int(pos.masked_fill(S < 0, 0).max()) >= block_size:
        raise ValueError(f"a packed sequence exceeds block_size {block_size}")
    pos = pos.clamp(max=block_size - 1)  # a long run of padding (S = -1) is one "sequence"
    same = S[:, :, None] == S[:, None, :]  # (R, T, T)
    return pos, (same & torch.ones(T, T, dtype=torch.bool, device=S.device).tril())[:, None]


def segment_sums(values, segments):
    """(R, T) per-token values of packed rows -> (N,) sums per sequence (N = segments.max()
    + 1). Values must be 0 on padding (segment -1), which is sent to sequence 0, adding
    nothing."""
    n = int(segments.max()) + 1
    return values.new_zeros(n).index_add(0, segments.clamp(min=0).flatten(), values.flatten())


def packed_hidden(gpt, X, layout):
    """The GPT's final hidden states (R, T, C) of packed rows X; layout from packed_layout."""
    pos, mask = layout
    x = gpt.wte(X) + gpt.wpe(pos)  # (R, T, C)
    for block in gpt.h:
        x = block(x, mask=mask)
    return gpt.ln_f(x)


def packed_logits(model, X, layout):
    """Logits (R, T, V) of packed rows X (layout from packed_layout). The call still goes
    through the model's forward, with the GPT's hidden states computed the packed way for
    this one call: a DistributedDataParallel wrapper synchronises gradients only for the
    passes it sees."""
    gpt = getattr(model, "module", model)  # DDP holds the model in .module,
    gpt = getattr(gpt, "_orig_mod", gpt)  # torch.compile in ._orig_mod
    gpt.hidden = lambda idx, cache=None: packed_hidden(gpt, idx, layout)
    try:
        return model(X)[0]
    finally:
        del gpt.hidden


def logits(model, X, S):
    """Logits (R, T, V) of packed rows X whose segments S come from `pack`, at the model's block size."""
    block = getattr(model, "module", model).config.block_size  # (DDP holds the model in .module)
    return packed_logits(model, X, packed_layout(S, block))
