#!/usr/bin/env python3
"""Writes the reference fixtures the GGUF reader's tests compare against.

Every expected value here comes from an implementation other than binllm's: gguf-py's numpy
dequantisation (the mirror of ggml-quants.c), transformers' GGUF loader (dequantisation plus
its `reverse_permute_weights`), transformers' GGUF tokenizer converter and its
`apply_chat_template`.

Outputs, under crates/binllm-format/tests/fixtures/gguf/:
  quant_blocks.safetensors  raw blocks of every supported ggml type ("<TYPE>.raw", u8) and
                            gguf-py's dequantisation of them ("<TYPE>.values", f32)
  metadata_types.gguf/json  a tensor-less GGUF with every metadata value type (nested arrays
                            too) and the values and types gguf-py reads back
  tiny_llama.gguf           a 2-layer llama (GGUFWriter) with a small SentencePiece vocabulary,
                            ten tensor types and a custom alignment
  tiny_llama.json           what transformers makes of tiny_llama.gguf: config, tensors
                            (sha256 of the f32 values in HF layout + the first values), token ids
  tiny_qwen2.gguf/json      a 1-layer qwen2 (q/k/v biases, byte-level BPE vocabulary with
                            pre-tokenizer 'qwen2', ChatML template) and transformers' reading
  tiny_qwen3.gguf/json      a 1-layer qwen3 (q/k norms, head_dim 128 from key_length, tied
                            embeddings, a Q6_K tensor, no tokenizer) and transformers' reading
  smollm2_reference.json    the same for models/SmolLM2-135M-Instruct.Q4_1.gguf: config,
                            sha256 of every tensor, sample rows (as f32 bit patterns)
  smollm2_tokenizer.json    token ids of real strings and rendered chat templates

Usage (from the repository root; needs gguf, numpy, torch, transformers):
  /work/pyref/bin/python tools/reference/gguf_fixtures.py [--skip-smollm2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/binllm-format/tests/fixtures/gguf"
SMOLLM2 = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"

SUPPORTED = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# Byte offsets of the f16 scale fields in each block: random bytes there could be NaN/inf,
# which would make bit-exact comparison meaningless, so they get finite values instead.
F16_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2],
    "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite f16 values over a wide range of magnitudes, including subnormals and zero."""
    exps = rng.uniform(-26, 6, size=n)
    vals = np.sign(rng.normal(size=n)) * np.exp2(exps)
    vals = vals.astype(np.float16)
    if n >= 4:
        vals[1] = np.float16(0.0)
        vals[2] = np.float16(6.0e-8)  # the smallest subnormal
        vals[3] = np.float16(-65504.0)  # the largest magnitude
    return vals


def random_blocks(rng: np.random.Generator, qtype: str, n_blocks: int) -> np.ndarray:
    """Raw bytes of `n_blocks` blocks: random payload, finite f16 scale fields."""
    _, type_size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        raw[:, offset:offset + 2] = finite_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return raw


def quant_blocks(rng: np.random.Generator) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in SUPPORTED:
        qtype = Q[name]
        block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
        if name == "F32":
            values = (rng.normal(size=256) * np.exp2(rng.uniform(-30, 30, size=256))).astype(np.float32)
            values[:4] = [0.0, -0.0, 1e-45, -3.4e38]
            raw = values.view(np.uint8)
        elif name == "F16":
            raw = finite_f16(rng, 256).view(np.uint8)
        elif name == "BF16":
            bits = rng.integers(0, 1 << 16, size=256, dtype=np.uint32).astype(np.uint16)
            exponent = (bits >> 7) & 0xFF
            bits = np.where(exponent == 0xFF, bits & 0x807F, bits).astype(np.uint16)  # finite only
            raw = bits.view(np.uint8)
        else:
            n_blocks = 12 if block_size == 32 else 6
            raw = random_blocks(rng, name, n_blocks).reshape(-1)
        values = dequantize(raw.reshape(1, -1), qtype).reshape(-1).astype(np.float32)
        assert np.all(np.isfinite(values)), name
        out[f"{name}.raw"] = np.ascontiguousarray(raw, dtype=np.uint8)
        out[f"{name}.values"] = np.ascontiguousarray(values)
    return out


def sha256_f32(t) -> str:
    a = np.ascontiguousarray(np.asarray(t, dtype=np.float32))
    return hashlib.sha256(a.astype("<f4").tobytes()).hexdigest()


def f32_bits(values) -> list[int]:
    return [int(b) for b in np.asarray(values, dtype=np.float32).view(np.uint32).reshape(-1)]


# ---------------------------------------------------------------------------------------
# The tiny llama GGUF

TINY = dict(hidden=32, heads=4, kv_heads=2, ffn=256, layers=2, ctx=128)

# A SentencePiece-style vocabulary (Llama 2 conventions): <unk>, <s>, </s>, a few byte
# pieces for byte fallback, characters and merged pieces with descending scores.
TINY_PIECES = (
    [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    + [(f"<0x{b:02X}>", 0.0, 6) for b in (0x0A, 0x21, 0xC3, 0xA9, 0xF0, 0x9F, 0x98, 0x80)]
    + [("<tool>", 0.0, 4)]
    + [(p, -float(i), 1) for i, p in enumerate([
        "▁t", "he", "▁the", "▁c", "at", "▁cat", "▁s", "▁sat", "on", "▁on", "▁m", "▁mat",
        "in", "▁in", "▁a", "▁h", "at", "▁hat",
    ])]
    + [(c, -100.0 - i, 1) for i, c in enumerate("▁thecasonmiTH.,")]
)


def dedup_pieces(pieces):
    seen, out = set(), []
    for p in pieces:
        if p[0] not in seen:
            seen.add(p[0])
            out.append(p)
    return out


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: rotate-half -> interleaved rows."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_llama(rng: np.random.Generator, path: Path) -> dict:
    h, nh, nkv, ffn, nl = TINY["hidden"], TINY["heads"], TINY["kv_heads"], TINY["ffn"], TINY["layers"]
    hd = h // nh
    pieces = dedup_pieces(TINY_PIECES)
    vocab = len(pieces)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_name("binllm tiny llama fixture")
    w.add_context_length(TINY["ctx"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(ffn)
    w.add_block_count(nl)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(hd)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_tokenizer_model("llama")
    w.add_token_list([p[0] for p in pieces])
    w.add_token_scores([p[1] for p in pieces])
    w.add_token_types([p[2] for p in pieces])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")

    types = {
        0: dict(attn_q="Q4_0", attn_k="Q5_0", attn_v="Q8_0", attn_output="Q4_1",
                ffn_gate="Q5_1", ffn_up="BF16", ffn_down="Q4_K"),
        1: dict(attn_q="Q8_0", attn_k="Q4_1", attn_v="F16", attn_output="Q5_1",
                ffn_gate="Q4_0", ffn_up="Q5_0", ffn_down="Q5_K"),
    }

    def add(name: str, hf: np.ndarray, qtype: str, permute_heads: int | None = None):
        data = hf.astype(np.float32)
        if permute_heads:
            data = llama_permute(data, permute_heads)
        if qtype == "F32":
            w.add_tensor(name, data)
        elif qtype == "F16":
            w.add_tensor(name, data.astype(np.float16))
        elif qtype in ("Q4_K", "Q5_K", "Q6_K"):
            # gguf-py cannot quantize K types: random blocks stand in for real weights.
            rows = data.shape[0]
            blocks_per_row = data.shape[1] // 256
            raw = random_blocks(rng, qtype, rows * blocks_per_row).reshape(rows, -1)
            w.add_tensor(name, raw, raw_dtype=Q[qtype])
        else:
            w.add_tensor(name, quantize(data, Q[qtype]), raw_dtype=Q[qtype])

    norm = lambda n: (1.0 + 0.1 * rng.normal(size=n)).astype(np.float32)
    lin = lambda o, i: (rng.normal(size=(o, i)) / np.sqrt(i)).astype(np.float32)
    add("token_embd.weight", rng.normal(size=(vocab, h)).astype(np.float32), "F16")
    for layer in range(nl):
        t = types[layer]
        add(f"blk.{layer}.attn_norm.weight", norm(h), "F32")
        add(f"blk.{layer}.attn_q.weight", lin(nh * hd, h), t["attn_q"], nh)
        add(f"blk.{layer}.attn_k.weight", lin(nkv * hd, h), t["attn_k"], nkv)
        add(f"blk.{layer}.attn_v.weight", lin(nkv * hd, h), t["attn_v"])
        add(f"blk.{layer}.attn_output.weight", lin(h, nh * hd), t["attn_output"])
        add(f"blk.{layer}.ffn_norm.weight", norm(h), "F32")
        add(f"blk.{layer}.ffn_gate.weight", lin(ffn, h), t["ffn_gate"])
        add(f"blk.{layer}.ffn_up.weight", lin(ffn, h), t["ffn_up"])
        add(f"blk.{layer}.ffn_down.weight", lin(h, ffn), t["ffn_down"])
    add("output_norm.weight", norm(h), "F32")
    add("output.weight", lin(vocab, h), "Q8_0")

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    return {"gguf_types": {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}}


def write_metadata_types(path: Path) -> dict:
    """A GGUF with no tensors and one metadata entry of every value type, nested arrays
    included (kept out of tiny_llama.gguf because transformers cannot read nested arrays)."""
    w = gguf.GGUFWriter(str(path), "llama")
    scalars = {
        "binllm.test.u8": ("add_uint8", 200), "binllm.test.i8": ("add_int8", -100),
        "binllm.test.u16": ("add_uint16", 60000), "binllm.test.i16": ("add_int16", -30000),
        "binllm.test.u32": ("add_uint32", 4_000_000_000), "binllm.test.i32": ("add_int32", -2_000_000_000),
        "binllm.test.u64": ("add_uint64", 2**63 + 5), "binllm.test.i64": ("add_int64", -(2**62)),
        "binllm.test.f32": ("add_float32", 1.5), "binllm.test.f64": ("add_float64", -2.25),
        "binllm.test.bool": ("add_bool", True), "binllm.test.string": ("add_string", "héllo ✓"),
    }
    for key, (method, value) in scalars.items():
        getattr(w, method)(key, value)
    arrays = {
        "binllm.test.strings": ["a", "", "ünï"],
        "binllm.test.i32s": [1, -2, 3],
        "binllm.test.bools": [True, False, True],
        "binllm.test.nested": [[1, 2], [3]],
    }
    for key, value in arrays.items():
        w.add_array(key, value)
    w.add_key_value("binllm.test.f64s", [0.5, -1.0], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT64)
    w.add_key_value("binllm.test.u16s", [7, 65535], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # gguf-py's reader is the independent check of what was written.
    reader = gguf.GGUFReader(str(path))
    types = {k: [t.name for t in f.types] for k, f in reader.fields.items() if k.startswith("binllm.")}
    values = {k: v for k, (_, v) in scalars.items()} | arrays
    values |= {"binllm.test.f64s": [0.5, -1.0], "binllm.test.u16s": [7, 65535]}
    return {"version": 3, "values": values, "types": types}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies use it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# Merges chosen so that the pre-tokenizer matters: "1 2" only applies if digits are not
# split one by one (Qwen2's regex splits them), whitespace and newline runs merge.
QWEN_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "Ġ s", "Ġs at", "o n", "Ġ on",
               "1 2", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ", "i n", "Ġ in", "' s", "m at", "Ġ m", "Ġm at", "C A",
               "CA T", "ĉ ĉ"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def qwen_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = list(bytes_to_unicode().values())
    for m in QWEN_MERGES:
        merged = m.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    types = [1] * len(tokens) + [3] * len(QWEN_SPECIALS)
    return tokens + QWEN_SPECIALS, types, QWEN_MERGES


def write_tiny_qwen(rng: np.random.Generator, path: Path, arch: str) -> dict:
    """One-layer qwen2 (q/k/v biases, byte-level BPE with pre 'qwen2', ChatML, untied) or
    qwen3 (q/k norms, head_dim 128 != hidden/heads, no tokenizer, tied) model."""
    qwen3 = arch == "qwen3"
    h, nh, nkv, ffn = 32, (2 if qwen3 else 4), (1 if qwen3 else 2), 64
    hd = 128 if qwen3 else h // nh
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"binllm tiny {arch} fixture")
    w.add_context_length(256)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ffn)
    w.add_block_count(1)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1000000.0)
    if qwen3:
        w.add_key_length(hd)
        w.add_value_length(hd)
        vocab = 64
        w.add_vocab_size(vocab)
    else:
        tokens, types, merges = qwen_vocab()
        vocab = len(tokens)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokens.index("<|endoftext|>"))
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML)

    def add(name: str, data: np.ndarray, qtype: str):
        data = data.astype(np.float32)
        if qtype == "F32":
            w.add_tensor(name, data)
        elif qtype == "F16":
            w.add_tensor(name, data.astype(np.float16))
        elif qtype in ("Q4_K", "Q5_K", "Q6_K"):
            rows = data.shape[0]
            raw = random_blocks(rng, qtype, rows * (data.shape[1] // 256)).reshape(rows, -1)
            w.add_tensor(name, raw, raw_dtype=Q[qtype])
        else:
            w.add_tensor(name, quantize(data, Q[qtype]), raw_dtype=Q[qtype])

    norm = lambda n: (1.0 + 0.1 * rng.normal(size=n)).astype(np.float32)
    lin = lambda o, i: (rng.normal(size=(o, i)) / np.sqrt(i)).astype(np.float32)
    if qwen3:
        types = dict(token_embd="F16", attn_q="Q8_0", attn_k="Q5_1", attn_v="Q4_0", attn_output="Q6_K",
                     ffn_gate="Q8_0", ffn_up="F16", ffn_down="Q4_1")
    else:
        types = dict(token_embd="Q8_0", attn_q="Q4_1", attn_k="Q5_0", attn_v="Q8_0", attn_output="Q4_0",
                     ffn_gate="Q5_1", ffn_up="Q8_0", ffn_down="BF16", output="Q4_0")
    add("token_embd.weight", rng.normal(size=(vocab, h)), types["token_embd"])
    add("blk.0.attn_norm.weight", norm(h), "F32")
    add("blk.0.attn_q.weight", lin(nh * hd, h), types["attn_q"])
    add("blk.0.attn_k.weight", lin(nkv * hd, h), types["attn_k"])
    add("blk.0.attn_v.weight", lin(nkv * hd, h), types["attn_v"])
    if qwen3:
        add("blk.0.attn_q_norm.weight", norm(hd), "F32")
        add("blk.0.attn_k_norm.weight", norm(hd), "F32")
    else:
        for proj, rows in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
            add(f"blk.0.attn_{proj}.bias", 0.1 * rng.normal(size=rows), "F32")
    add("blk.0.attn_output.weight", lin(h, nh * hd), types["attn_output"])
    add("blk.0.ffn_norm.weight", norm(h), "F32")
    add("blk.0.ffn_gate.weight", lin(ffn, h), types["ffn_gate"])
    add("blk.0.ffn_up.weight", lin(ffn, h), types["ffn_up"])
    add("blk.0.ffn_down.weight", lin(h, ffn), types["ffn_down"])
    add("output_norm.weight", norm(h), "F32")
    if not qwen3:
        add("output.weight", lin(vocab, h), types["output"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    model = transformers_model(path)
    out = {
        "config": config_summary(model.config),
        "tensors": tensor_summaries(model, model.config.tie_word_embeddings),
        "gguf_types": {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors},
    }
    if not qwen3:
        tok = transformers_tokenizer(path)
        # ASCII and precomposed text only: transformers' Qwen2 converter adds an NFC
        # normalizer that llama.cpp does not have.
        texts = ["the cat sat on 12 mats", "  the\n\n\ncat   ", "it's 123 CATs", "tab\t\there\n",
                 "<|im_start|>user\nthe cat<|im_end|>", "naïve über"]
        out["tokens"] = token_cases(tok, texts)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat?"}]
        out["chat"] = {"messages": messages,
                       "rendered": tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)}
    return out


# ---------------------------------------------------------------------------------------
# What transformers makes of a GGUF file

def transformers_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model


def transformers_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def config_summary(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or {}
    return {
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": rope.get("rope_theta", getattr(config, "rope_theta", None)),
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
    }


def tensor_summaries(model, tied: bool, samples: dict[str, list[int]] | None = None, head: int = 8) -> dict:
    out = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        a = t.detach().to("cpu").float().numpy()
        entry = {"shape": list(a.shape), "sha256": sha256_f32(a)}
        if head:
            entry["head_bits"] = f32_bits(a.reshape(-1)[:head])
        if samples and name in samples:
            rows, cols = samples[name]
            entry["sample_rows"] = {str(r): f32_bits(a[r, :cols]) for r in rows}
        out[name] = entry
    return out


def token_cases(tok, texts: list[str]) -> list[dict]:
    return [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in texts]


def tiny_expectations(path: Path, written: dict) -> dict:
    model = transformers_model(path)
    tok = transformers_tokenizer(path)
    # No text uses the user-defined piece "<tool>": transformers' GGUF converter drops
    # user-defined pieces (only control pieces become added tokens), SentencePiece and
    # llama.cpp match them whole.
    texts = ["the cat sat on the mat", "The hat, in the cat.", "Thé cat!\n", "  the  cat ", "😀 mat",
             "sat\n\non a hat"]
    return {
        "config": config_summary(model.config),
        "tensors": tensor_summaries(model, model.config.tie_word_embeddings),
        "gguf_types": written["gguf_types"],
        "tokens": token_cases(tok, texts),
    }


# ---------------------------------------------------------------------------------------
# SmolLM2

SMOLLM2_TEXTS = [
    "Hello, world! How are you doing today?",
    "12345 and 3.14159",
    "Whitespace   runs    here, and trailing   ",
    "tabs\tand\nnewlines\n\n\tindented\r\nCRLF",
    "Ünïcödé: naïve café, 日本語のテキスト, Привет мир",
    "emoji 🤗🚀 and ❤️ and 👩‍👩‍👧",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "x  3 spaces before digits   42, and 1,000,000.",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "don't you'll I'M they've",
]

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "What is 2+2?"}],
    "user_assistant": [{"role": "user", "content": "Hi!"},
                       {"role": "assistant", "content": "Hello! How can I help?"}],
}


def smollm2_llamacpp_style(tok):
    """transformers' GGUF converter gives every gpt2 vocabulary GPT-2's pre-tokenizer and
    ignores tokenizer.ggml.pre. llama.cpp (and SmolLM2's own tokenizer.json) split every
    digit first for pre 'smollm': the same tokenizer with that pre-tokenizer."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
    ]}
    return Tokenizer.from_str(json.dumps(spec))


def smollm2_expectations() -> tuple[dict, dict]:
    model = transformers_model(SMOLLM2)
    reader = gguf.GGUFReader(str(SMOLLM2))
    from collections import Counter

    samples = {
        "model.layers.0.self_attn.q_proj.weight": ([0, 1, 2, 31, 32, 33, 63, 64, 96, 575], 16),
        "model.layers.0.self_attn.k_proj.weight": ([0, 1, 31, 32, 63, 64, 127, 191], 16),
        "model.layers.29.self_attn.k_proj.weight": ([0, 1, 32, 190, 191], 16),
        "model.embed_tokens.weight": ([0, 1, 2, 1000, 49151], 32),
        "model.layers.0.mlp.down_proj.weight": ([0, 575], 32),
    }
    reference = {
        "config": config_summary(model.config),
        "gguf_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "tensor_count": len(reader.tensors),
        "tensors": tensor_summaries(model, model.config.tie_word_embeddings, samples, head=0),
    }
    del model

    tok = transformers_tokenizer(SMOLLM2)
    llamacpp = smollm2_llamacpp_style(tok)
    chats = {}
    for name, messages in CONVERSATIONS.items():
        chats[name] = {
            "messages": messages,
            "rendered": tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        }
    texts = SMOLLM2_TEXTS + [chats["system_user"]["rendered"]]
    cases = []
    for case in token_cases(tok, texts):
        ours = llamacpp.encode(case["text"], add_special_tokens=False).ids
        if ours != case["ids"]:
            # Recorded, and compared against, explicitly: see smollm2_llamacpp_style.
            case["transformers_ids"] = case["ids"]
            case["ids"] = ours
            case["note"] = ("transformers' GGUF tokenizer ignores tokenizer.ggml.pre='smollm' "
                            "(digits are not split first); ids are llama.cpp's split")
        cases.append(case)
    tokenizer = {"cases": cases, "chats": chats, "bos_token": tok.bos_token, "chat_template_source": "gguf"}
    return reference, tokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-smollm2", action="store_true", help="only write the self-contained fixtures")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240611)

    from safetensors.numpy import save_file

    save_file(quant_blocks(rng), str(OUT / "quant_blocks.safetensors"))

    (OUT / "metadata_types.json").write_text(
        json.dumps(write_metadata_types(OUT / "metadata_types.gguf"), indent=1, ensure_ascii=False) + "\n")

    tiny = OUT / "tiny_llama.gguf"
    written = write_tiny_llama(rng, tiny)
    (OUT / "tiny_llama.json").write_text(json.dumps(tiny_expectations(tiny, written), indent=1, ensure_ascii=False) + "\n")

    for arch in ("qwen2", "qwen3"):
        expected = write_tiny_qwen(rng, OUT / f"tiny_{arch}.gguf", arch)
        (OUT / f"tiny_{arch}.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")

    if not args.skip_smollm2:
        if not SMOLLM2.exists():
            print(f"{SMOLLM2} is missing: run scripts/setup.sh first", file=sys.stderr)
            return 1
        reference, tokenizer = smollm2_expectations()
        (OUT / "smollm2_reference.json").write_text(json.dumps(reference, indent=1) + "\n")
        (OUT / "smollm2_tokenizer.json").write_text(json.dumps(tokenizer, indent=1, ensure_ascii=False) + "\n")

    for f in sorted(OUT.iterdir()):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
