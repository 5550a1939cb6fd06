#!/usr/bin/env python3
"""Training-speed reference for `binllm convert` Stage 2, in PyTorch.

The same step binllm takes, written independently in PyTorch: a LLaMA decoder in the
SmolLM2-135M shape (30 layers, hidden 576, 9 heads / 3 kv heads, MLP 1536, vocab 49152,
tied embeddings), bf16 autocast over fp32 master weights, SDPA causal attention with GQA,
cross-entropy, global gradient clipping at 1.0, fused AdamW (weight decay 0.1 on matrices).
Block linears either plain ("plain") or in the paper's progressive form
W_q = S_l * S_a * tanh(t W/S_a) / tanh(t) ("progressive"). Weights are random: speed does
not depend on their values.

Run it on the same GPU in the same session as binllm, then compare tokens/s:

    python3 tools/reference/train_speed.py --steps 20 --out speed.json [--compile]
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F


class Config:
    vocab = 49152
    hidden = 576
    layers = 30
    heads = 9
    kv_heads = 3
    head_dim = 64
    mlp = 1536
    eps = 1e-5
    theta = 100000.0


class Linear(torch.nn.Module):
    def __init__(self, out_features, in_features, progressive):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) * 0.02)
        self.progressive = progressive
        if progressive:
            self.row_scale = torch.nn.Parameter(torch.ones(out_features, 1))
        self.t = 5.0

    def forward(self, x):
        w = self.weight
        if self.progressive:
            sa = w.abs().mean(dim=1, keepdim=True)
            w = self.row_scale * sa * torch.tanh(self.t * (w / sa)) / math.tanh(self.t)
        return F.linear(x, w)


def rms_norm(x, weight, eps):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Block(torch.nn.Module):
    def __init__(self, c, progressive):
        super().__init__()
        q_dim, kv_dim = c.heads * c.head_dim, c.kv_heads * c.head_dim
        self.attn_norm = torch.nn.Parameter(torch.ones(c.hidden))
        self.mlp_norm = torch.nn.Parameter(torch.ones(c.hidden))
        self.q = Linear(q_dim, c.hidden, progressive)
        self.k = Linear(kv_dim, c.hidden, progressive)
        self.v = Linear(kv_dim, c.hidden, progressive)
        self.o = Linear(c.hidden, q_dim, progressive)
        self.gate = Linear(c.mlp, c.hidden, progressive)
        self.up = Linear(c.mlp, c.hidden, progressive)
        self.down = Linear(c.hidden, c.mlp, progressive)
        self.c = c

    def forward(self, h, cos, sin):
        c = self.c
        b, t, _ = h.shape
        x = rms_norm(h, self.attn_norm, c.eps)
        q = self.q(x).view(b, t, c.heads, c.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + self.o(a.transpose(1, 2).reshape(b, t, -1))
        x = rms_norm(h, self.mlp_norm, c.eps)
        return h + self.down(F.silu(self.gate(x)) * self.up(x))


class Model(torch.nn.Module):
    def __init__(self, c, progressive):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(c.vocab, c.hidden) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(c, progressive) for _ in range(c.layers))
        self.norm = torch.nn.Parameter(torch.ones(c.hidden))
        self.c = c

    def forward(self, ids):
        c = self.c
        h = F.embedding(ids, self.embed)
        pos = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32)
        inv = 1.0 / (c.theta ** (torch.arange(0, c.head_dim, 2, device=ids.device).float() / c.head_dim))
        freqs = torch.outer(pos, inv)
        ang = torch.cat((freqs, freqs), -1)
        cos, sin = ang.cos().to(h.dtype)[None, None], ang.sin().to(h.dtype)[None, None]
        for block in self.blocks:
            h = block(h, cos, sin)
        return F.linear(rms_norm(h, self.norm, c.eps), self.embed)


def measure(progressive, compiled, args):
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = Model(Config(), progressive).to(device)
    # As binllm: decay matrices only (a [out, 1] row scale is a vector).
    is_matrix = lambda p: p.dim() >= 2 and min(p.shape) > 1
    decay = [p for p in model.parameters() if is_matrix(p)]
    no_decay = [p for p in model.parameters() if not is_matrix(p)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    forward = torch.compile(model) if compiled else model
    ids = torch.randint(0, Config.vocab, (args.micro_batch, args.seq_len + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]

    def step():
        for _ in range(args.accumulation):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = forward(x)
                loss = F.cross_entropy(logits.reshape(-1, Config.vocab).float(), y.reshape(-1))
            (loss / args.accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    for _ in range(args.warmup):
        step().item()
    warm = time.time() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(args.steps):
        loss = step()
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    tokens = args.steps * args.accumulation * args.micro_batch * args.seq_len
    return {
        "weights": "progressive" if progressive else "plain",
        "engine": "torch.compile" if compiled else "eager",
        "tokens_per_second": tokens / seconds,
        "warmup_seconds": warm,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compile", action="store_true",
                   help="also measure torch.compile on the progressive weights (about 2 min to compile)")
    p.add_argument("--out")
    args = p.parse_args()
    results = []
    runs = [(False, False), (True, False)] + ([(True, True)] if args.compile else [])
    for progressive, compiled in runs:
        r = measure(progressive, compiled, args)
        print(json.dumps(r), flush=True)
        results.append(r)
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "seq_len": args.seq_len, "micro_batch": args.micro_batch, "accumulation": args.accumulation}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
