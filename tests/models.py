"""Seeded, deterministic test models and batches for the engine parity suite.

Every model is called as ``model(**batch)`` and returns an object with ``.loss`` (``Out`` here, a
Hugging Face ``ModelOutput`` for the HF models), so one training loop serves every test. No dropout unless
asked for (TinyGPT's ``dropout``): parity against a separate reference needs a deterministic forward; the
activation tests use it to check that a recompute draws the same random numbers as the forward did.
"""
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class Out:
    loss: torch.Tensor
    logits: torch.Tensor


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- MLP

class MLP(nn.Module):
    """A plain stack of Linear+GELU layers with an MSE loss: no repeated-block container."""

    def __init__(self, d_in=32, width=128, depth=6, d_out=8):
        super().__init__()
        layers, d = [], d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.GELU()]
            d = width
        layers.append(nn.Linear(d, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x, y):
        pred = self.net(x)
        return Out(loss=F.mse_loss(pred, y), logits=pred)


def make_mlp(seed=0, **kw):
    torch.manual_seed(seed)
    return MLP(**kw)


def mlp_batches(n, seed=1, batch=8, d_in=32, d_out=8):
    g = _seeded(seed)
    return [dict(x=torch.randn(batch, d_in, generator=g), y=torch.randn(batch, d_out, generator=g))
            for _ in range(n)]


# ------------------------------------------------------------------------------------- small GPT

class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (written out, no SDPA) + GELU MLP."""

    def __init__(self, d, n_head, dropout=0.0):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d)
        # No qkv bias: the key bias gets an exactly-zero gradient in exact arithmetic, so its gradient is pure
        # rounding noise that AdamW normalises to full-size steps; no implementation can match another's noise.
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.n_head
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        att = F.dropout(att, self.dropout, self.training)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + F.dropout(self.out(F.gelu(self.fc(self.ln2(x)))), self.dropout, self.training)


class TinyGPT(nn.Module):
    """Token + position embedding, N identical blocks in an nn.ModuleList, final LayerNorm, and an LM
    head tied to the token embedding (one Parameter under two state_dict keys)."""

    def __init__(self, vocab=128, d=48, n_layer=6, n_head=4, max_len=32, dropout=0.0):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, input_ids, labels):
        t = input_ids.shape[1]
        x = self.tok_emb(input_ids) + self.pos_emb(torch.arange(t, device=input_ids.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               labels[:, 1:].reshape(-1))
        return Out(loss=loss, logits=logits)


def make_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyGPT(**kw)


def token_batches(n, seed=1, batch=2, seq=16, vocab=128):
    g = _seeded(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append(dict(input_ids=ids, labels=ids.clone()))
    return out


# ------------------------------------------------------------- a sub-module skipped on some steps

class SkipMLP(nn.Module):
    """``use_branch=False`` skips ``branch`` entirely, so its parameters get no gradient that step
    (grad stays None under zero_grad(set_to_none=True)); torch.optim.AdamW then neither updates them
    (no weight decay either) nor advances their step count."""

    def __init__(self, d=64):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.branch = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.trunk = nn.Sequential(nn.Linear(d, d), nn.GELU())
        self.head = nn.Linear(d, 4)

    def forward(self, x, y, use_branch):
        h = F.gelu(self.inp(x))
        if use_branch:
            h = h + self.branch(h)
        pred = self.head(self.trunk(h))
        return Out(loss=F.mse_loss(pred, y), logits=pred)


def make_skip(seed=0):
    torch.manual_seed(seed)
    return SkipMLP()


class PartlyUsed(nn.Module):
    """Owns two matrices directly, so both are in one unit; ``extra`` only acts when asked, so on other steps
    the unit has gradients for ``weight`` and none for ``extra``."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.extra = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, h, use_extra):
        out = h @ self.weight.T
        return out + h @ self.extra.T if use_extra else out


class PartlyUsedMLP(nn.Module):
    """SkipMLP's contract (batches from skip_batches) with the skipped parameter inside a unit that trains."""

    def __init__(self, d=64):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.mid = PartlyUsed(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x, y, use_branch):
        pred = self.head(F.gelu(self.mid(F.gelu(self.inp(x)), use_branch)))
        return Out(loss=F.mse_loss(pred, y), logits=pred)


def make_partly_used(seed=0):
    torch.manual_seed(seed)
    return PartlyUsedMLP()


def skip_batches(pattern, seed=1, batch=8):
    """One batch per entry of ``pattern`` (bools: whether the branch runs)."""
    g = _seeded(seed)
    return [dict(x=torch.randn(batch, 16, generator=g), y=torch.randn(batch, 4, generator=g),
                 use_branch=bool(p)) for p in pattern]


# ------------------------------------------------------------------------------------ frozen params

def make_frozen_gpt(seed=0, frozen_blocks=(0, 1)):
    """TinyGPT with the position embedding and the first blocks frozen (requires_grad=False)."""
    m = make_gpt(seed)
    m.pos_emb.weight.requires_grad_(False)
    for i in frozen_blocks:
        m.blocks[i].requires_grad_(False)
    return m


def frozen_names(model):
    return [n for n, p in model.named_parameters() if not p.requires_grad]


# ---------------------------------------------------------------------------- tiny Hugging Face models

HF_VOCAB = 128


def make_hf(name, seed=0):
    """A tiny randomly initialised HF model built from a config (no download), dropout 0, eager attention."""
    import transformers as tf

    torch.manual_seed(seed)
    v = HF_VOCAB
    if name == "llama":
        cfg = tf.LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                             tie_word_embeddings=False)
        cls = tf.LlamaForCausalLM
    elif name == "bert":
        cfg = tf.BertConfig(vocab_size=v, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        cls = tf.BertForMaskedLM
    elif name == "t5":
        cfg = tf.T5Config(vocab_size=v, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                          num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                          decoder_start_token_id=0, pad_token_id=0)
        cls = tf.T5ForConditionalGeneration
    elif name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=v, n_positions=32, n_embd=32, n_layer=6, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=v - 1, eos_token_id=v - 1)
        cls = tf.GPT2LMHeadModel
    else:
        raise KeyError(name)
    cfg._attn_implementation = "eager"
    model = cls(cfg)
    model.train()
    return model


def hf_batches(name, n, seed=1, batch=2, seq=12):
    g = _seeded(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, HF_VOCAB, (batch, seq), generator=g)
        if name == "bert":
            labels = torch.full_like(ids, -100)
            pick = torch.rand(batch, seq, generator=g) < 0.3
            pick[:, 0] = True                      # at least one masked token per row
            labels[pick] = ids[pick]
            inp = ids.masked_fill(pick, 3)         # token 3 stands in for [MASK]
            out.append(dict(input_ids=inp, attention_mask=torch.ones_like(ids), labels=labels))
        elif name == "t5":
            tgt = torch.randint(1, HF_VOCAB, (batch, seq // 2), generator=g)
            out.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=tgt))
        else:
            out.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone()))
    return out


def repeated_blocks(model):
    """The items of every nn.ModuleList in ``model`` (the repeated blocks a streaming engine splits on)."""
    return [m for mod in model.modules() if isinstance(mod, nn.ModuleList) for m in mod]
