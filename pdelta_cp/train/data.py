"""The embedded default dataset: synthetic multi-query associative recall (MQAR, as in Zoology).

A sample lists ``num_kv_pairs`` (key, value) pairs, then asks for the values of keys again at random later
positions: the model sees a key and must predict its value at that position (label = value, elsewhere
-100). Keys come from the lower half of the vocabulary, values from the upper half, 0 is filler. Batches
are a pure function of (seed, step, data-parallel rank), so every CP rank of a data-parallel group draws
the same samples and a resumed run sees exactly the data an uninterrupted run would.
"""
from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100


def mqar_batch(*, vocab_size: int, seq_len: int, batch_size: int, num_kv_pairs: int, seed: int, step: int,
               dp_rank: int = 0) -> tuple[Tensor, Tensor]:
    """tokens, labels [batch_size, seq_len] (int64)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + dp_rank)
    half = vocab_size // 2
    n = num_kv_pairs
    tokens = torch.zeros(batch_size, seq_len, dtype=torch.long)
    labels = torch.full((batch_size, seq_len), IGNORE, dtype=torch.long)
    for b in range(batch_size):
        keys = torch.randperm(half - 1, generator=gen)[:n] + 1
        values = torch.randint(half, vocab_size, (n,), generator=gen)
        tokens[b, 0:2 * n:2] = keys
        tokens[b, 1:2 * n:2] = values
        slots = torch.randperm(seq_len - 2 * n, generator=gen)[:n] + 2 * n
        order = torch.randperm(n, generator=gen)
        tokens[b, slots] = keys[order]
        labels[b, slots] = values[order]
    return tokens, labels


class TokenFile:
    """A pre-tokenised corpus: ``tokens.bin`` (a flat uint16/uint32 array, read through a memory map) and
    ``meta.json`` ({"dtype", "vocab_size", "num_tokens", "tokenizer"}). Written by ``pdelta-cp preprocess``."""

    def __init__(self, folder: str):
        import json
        import os

        import numpy as np

        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = json.load(f)
        self.tokens = np.memmap(os.path.join(folder, "tokens.bin"), dtype=self.meta["dtype"], mode="r")
        if len(self.tokens) != self.meta["num_tokens"]:
            raise ValueError(f"{folder}/tokens.bin holds {len(self.tokens)} tokens but meta.json says "
                             f"{self.meta['num_tokens']}: the file is truncated or from another run")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def batch(self, *, seq_len: int, batch_size: int, seed: int, step: int, dp_rank: int = 0
              ) -> tuple[Tensor, Tensor]:
        """Fixed windows (as in the paper: no document resets): tokens, next-token labels [batch, seq_len]."""
        import numpy as np

        n = len(self.tokens) - seq_len - 1
        if n < 1:
            raise ValueError(f"the corpus has {len(self.tokens)} tokens, fewer than data.seq_len + 1 = {seq_len + 1}")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + dp_rank)
        starts = torch.randint(0, n, (batch_size,), generator=gen).tolist()
        window = np.stack([np.asarray(self.tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
        window = torch.from_numpy(window)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def preprocess(inputs: list[str], out_dir: str, tokenizer: str = "bytes") -> dict:
    """Tokenise text files into ``out_dir`` (documents separated by an end-of-text token).

    tokenizer: ``bytes`` (UTF-8 bytes, vocabulary 257 with 256 = end of text) or the name/path of a Hugging
    Face tokenizer available locally (needs ``transformers``).
    """
    import json
    import os

    import numpy as np

    if tokenizer == "bytes":
        vocab, eos = 257, 256

        def encode(text: str) -> list[int]:
            return list(text.encode("utf-8"))
    else:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ValueError(f"tokenizer {tokenizer!r} needs the transformers package; use --tokenizer bytes") from exc
        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        vocab, eos = len(tok), tok.eos_token_id if tok.eos_token_id is not None else len(tok) - 1
        encode = tok.encode
    dtype = "uint16" if vocab <= 65536 else "uint32"
    os.makedirs(out_dir, exist_ok=True)
    total = 0
    tmp = os.path.join(out_dir, "tokens.bin.tmp")
    with open(tmp, "wb") as f:
        for path in inputs:
            with open(path, encoding="utf-8", errors="replace") as src:
                ids = encode(src.read()) + [eos]
            np.asarray(ids, dtype=dtype).tofile(f)
            total += len(ids)
    os.replace(tmp, os.path.join(out_dir, "tokens.bin"))
    meta = {"dtype": dtype, "vocab_size": vocab, "num_tokens": total, "tokenizer": tokenizer, "inputs": inputs}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta
