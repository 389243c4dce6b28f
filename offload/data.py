"""Training data for `offload train`: a .txt file (one document per line, or free text) or a .jsonl file
with a "text" field per line, tokenised and packed into fixed-length sequences.

Bad .jsonl lines (not JSON, no "text" string) are counted and skipped, and reported with their line numbers.
"""
import json
import os

from .errors import ConfigError


class ByteTokenizer:
    """Bytes as tokens (ids 3..258) with pad 0, bos 1, eos 2: for presets, which carry no tokenizer."""
    vocab_size = 259
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def encode(self, text):
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def read_documents(path):
    """Returns (documents, skipped line numbers)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--data {path}: no such file")
    docs, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        if path.endswith(".jsonl"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    text = obj["text"] if isinstance(obj, dict) else None
                except (ValueError, KeyError):
                    text = None
                if isinstance(text, str):
                    docs.append(text)
                else:
                    bad.append(n)
        else:
            docs = [line.rstrip("\n") for line in f if line.strip()]
    if not docs:
        raise ConfigError(f"--data {path}: no usable text" + (f" ({len(bad)} bad lines)" if bad else ""))
    return docs, bad


def pack(docs, tokenizer, seq):
    """Concatenates documents separated by EOS and cuts them into rows of seq + 1 tokens (input + shift)."""
    import torch
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = []
    for d in docs:
        ids.extend(tokenizer.encode(d) if not hasattr(tokenizer, "__call__") or isinstance(tokenizer, ByteTokenizer)
                   else tokenizer(d, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    rows = len(ids) // (seq + 1)
    if rows == 0:
        raise ConfigError(f"the data holds {len(ids)} tokens, fewer than one sequence of {seq + 1}; lower --seq")
    return torch.tensor(ids[:rows * (seq + 1)], dtype=torch.long).view(rows, seq + 1)
