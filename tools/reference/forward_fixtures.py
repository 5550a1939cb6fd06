#!/usr/bin/env python3
"""Independent reference fixtures for binllm's full-precision forward pass.

Hugging Face transformers is the reference: every logit stored here comes from a
transformers model, never from binllm. Two kinds of fixture are written to --out:

* Tiny synthetic models (Llama GQA, Llama with llama3 RoPE scaling and tied embeddings,
  Qwen2 with q/k/v biases, Qwen3 with q/k norms and an explicit head_dim). Their weights
  come from a deterministic generator that binllm re-implements bit for bit in
  `binllm_format::synthetic`, so no weights are committed: binllm recreates the model from
  the config stored in the fixture and checks the per-tensor digests recorded here.
* SmolLM2-135M-Instruct loaded by transformers from the Q4_1 GGUF (dequantised to float32):
  three real prompts, token ids and a faithful subset of the logits of the first 32
  positions (every position of the chat prompt): strided columns, top-32, per-position L2
  norm and logsumexp.

Everything is deterministic: same versions in, same bytes out. See tools/reference/README.md
for the file layout and how a test must compare against it.

Usage:
    /work/pyref/bin/python tools/reference/forward_fixtures.py --out tests/fixtures/reference \
        [--gguf models/SmolLM2-135M-Instruct.Q4_1.gguf] [--skip-gguf]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

import safetensors
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

# ---------------------------------------------------------------------------------------
# The synthetic weight generator. binllm_format::synthetic implements the same definition;
# any change here must be made there too (the Rust tests compare against generator.json).
# ---------------------------------------------------------------------------------------

GENERATOR_ID = "binllm-synthetic-v1"
MASK64 = (1 << 64) - 1
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
SPLITMIX_M1 = np.uint64(0xBF58476D1CE4E5B9)
SPLITMIX_M2 = np.uint64(0x94D049BB133111EB)


def fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & MASK64
    return h


def splitmix64_outputs(seed: int, indices: np.ndarray) -> np.ndarray:
    """Output number `index` (0-based) of a splitmix64 stream seeded with `seed`."""
    z = np.uint64(seed) + (indices.astype(np.uint64) + np.uint64(1)) * SPLITMIX_GAMMA
    z = (z ^ (z >> np.uint64(30))) * SPLITMIX_M1
    z = (z ^ (z >> np.uint64(27))) * SPLITMIX_M2
    return z ^ (z >> np.uint64(31))


def synthetic_uniform(name: str, indices: np.ndarray) -> np.ndarray:
    """Uniform in [-1, 1) on a 2^-23 grid: exactly representable in float32."""
    bits = splitmix64_outputs(fnv1a64(name.encode("utf-8")), indices)
    k = (bits >> np.uint64(40)).astype(np.int64) - (1 << 23)
    return k.astype(np.float32) * np.float32(2.0**-23)


def synthetic_init(name: str) -> tuple[np.float32, np.float32]:
    """(offset, scale) of a tensor, chosen from its Hugging Face name."""
    if name.endswith("norm.weight"):
        # RMSNorm weights around 1 but not 1, so a forward that skips a norm weight fails.
        return np.float32(1.0), np.float32(0.1)
    if name.endswith(".bias"):
        return np.float32(0.0), np.float32(0.1)
    return np.float32(0.0), np.float32(0.2)


def synthetic_tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """offset + scale * u, two float32 roundings (no fused multiply-add), row-major."""
    offset, scale = synthetic_init(name)
    n = int(np.prod(shape, dtype=np.int64))
    u = synthetic_uniform(name, np.arange(n, dtype=np.uint64))
    with np.errstate(all="raise"):
        values = offset + scale * u
    assert values.dtype == np.float32
    return values.reshape(shape)


def tensor_digest(values: np.ndarray) -> str:
    """FNV-1a 64 of the little-endian float32 bytes, as 16 hex digits."""
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return f"{fnv1a64(data):016x}"


def generator_samples() -> dict:
    """Values binllm's Rust generator must reproduce bit for bit (written to generator.json)."""
    probes = [
        ("", [0, 1, 2]),
        ("model.embed_tokens.weight", [0, 1, 2, 3, 255, 16383]),
        ("model.layers.0.self_attn.q_proj.weight", [0, 1, 4095, 4096]),
        ("model.layers.1.self_attn.q_proj.bias", [0, 63]),
        ("model.layers.2.self_attn.k_norm.weight", [0, 23]),
        ("model.norm.weight", [0, 1, 63]),
        ("lm_head.weight", [0, 12345]),
        ("non-ascii: é東", [0, 7]),
        ("large index", [(1 << 32) + 5, (1 << 40) + 3, (1 << 63) - 1, (1 << 64) - 2]),
    ]
    samples = []
    for name, idx in probes:
        offset, scale = synthetic_init(name)
        idx_arr = np.array(idx, dtype=np.uint64)
        bits = splitmix64_outputs(fnv1a64(name.encode("utf-8")), idx_arr)
        u = synthetic_uniform(name, idx_arr)
        value = offset + scale * u
        for i, b, uu, v in zip(idx, bits, u, value):
            samples.append(
                {
                    "name": name,
                    "index": i,
                    "splitmix64": f"{int(b):016x}",
                    "uniform_f32_bits": f"{np.float32(uu).view(np.uint32):08x}",
                    "offset": float(offset),
                    "scale_f32_bits": f"{np.float32(scale).view(np.uint32):08x}",
                    "value_f32_bits": f"{np.float32(v).view(np.uint32):08x}",
                    "value": float(v),
                }
            )
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.v_proj.bias",
    ]
    shapes = [(256, 64), (64,), (32,)]
    digests = [
        {"name": n, "shape": list(s), "fnv1a64_le_f32": tensor_digest(synthetic_tensor(n, s))}
        for n, s in zip(names, shapes)
    ]
    return {
        "generator": GENERATOR_ID,
        "fnv1a64_of_name": {n: f"{fnv1a64(n.encode()):016x}" for n, _ in probes},
        "samples": samples,
        "tensor_digests": digests,
    }


# ---------------------------------------------------------------------------------------
# Tiny synthetic models
# ---------------------------------------------------------------------------------------

TINY_VOCAB = 256

# Each entry: fixture name, config class kwargs. The configs are built through transformers'
# own config classes; the config.json it then saves is what goes into the fixture.
TINY_MODELS = [
    (
        "tiny_llama_gqa",
        "llama",
        dict(
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            max_position_embeddings=128,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    (
        "tiny_llama3_rope_tied",
        "llama",
        dict(
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            rms_norm_eps=1e-6,
            # original_max_position_embeddings 32 (not 16): with head_dim 16 and theta 1e4 the
            # wavelengths are 6.3, 19.9, 62.8, ..., so 32 puts one frequency in each of the
            # three llama3 bands (kept, smoothed, divided by factor). With 16 the "kept" band
            # (wavelength < 16/4 = 4 < 2*pi) could never be reached.
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    (
        "tiny_qwen2_bias",
        "qwen2",
        dict(
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            max_position_embeddings=512,
            tie_word_embeddings=False,
            use_sliding_window=False,
        ),
    ),
    (
        "tiny_qwen3_qknorm_tied",
        "qwen3",
        dict(
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            head_dim=24,  # q_dim 96 != hidden 64: catches code that assumes hidden/heads
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            max_position_embeddings=512,
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
    ),
]


def tiny_token_ids(vocab: int) -> list[list[int]]:
    """Three fixed sequences (12, 12 and 9 tokens). They include id 0 and id vocab-1 and
    repeat a few ids, so attention sees equal keys at different positions."""
    stream = splitmix64_outputs(fnv1a64(b"binllm tiny token ids"), np.arange(33, dtype=np.uint64))
    ids = [int(x % np.uint64(vocab)) for x in stream]
    a = ids[0:12]
    a[0], a[5] = 0, vocab - 1
    b = ids[12:24]
    b[3], b[9] = b[1], b[1]
    c = ids[24:33]
    return [a, b, c]


def set_synthetic_weights(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            values = synthetic_tensor(name, tuple(param.shape))
            param.copy_(torch.from_numpy(values))


def keep_float64(model: torch.nn.Module) -> None:
    """Makes a `.double()` model compute RMSNorm and RoPE in float64.

    transformers casts RMSNorm input to float32 and computes cos/sin in float32 whatever the
    model dtype, so a plain `.double()` run would still carry float32 rounding there. The
    RoPE inverse frequencies stay transformers' float32 values, widened.
    """

    def rms_norm_f64(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def rotary_f64(self, x, position_ids):
        inv_freq = self.inv_freq.to(torch.float64)
        freqs = position_ids.to(torch.float64)[:, :, None] * inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (
            (emb.cos() * self.attention_scaling).to(x.dtype),
            (emb.sin() * self.attention_scaling).to(x.dtype),
        )

    patched = {"norm": 0, "rotary": 0}
    for module in model.modules():
        cls = type(module).__name__
        if cls.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm_f64, module)
            patched["norm"] += 1
        elif cls.endswith("RotaryEmbedding"):
            module.forward = types.MethodType(rotary_f64, module)
            patched["rotary"] += 1
    assert patched["norm"] > 0 and patched["rotary"] == 1, patched


SAFETENSORS_DTYPES = {
    np.dtype("float64"): "F64",
    np.dtype("int64"): "I64",
    np.dtype("float32"): "F32",
}


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str]) -> None:
    """A safetensors file with a byte-stable header.

    safetensors' own writer keeps metadata in a hash map, so its key order (and the file's
    bytes) change from run to run; committed fixtures would churn. Layout as the library
    writes it: 8-byte header length, JSON header padded with spaces to 8 bytes, tensors by
    descending element size then name, contiguous.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, n))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in order:
        array = np.ascontiguousarray(tensors[name])
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for data in blobs:
            f.write(data)
    with safetensors.safe_open(path, "np") as check:
        assert check.metadata() == metadata
        for name, array in tensors.items():
            assert np.array_equal(check.get_tensor(name), array), name


def relative_l2(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    candidate = candidate.astype(np.float64)
    return float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))


def build_tiny_fixture(name: str, model_type: str, config_kwargs: dict, out: Path) -> dict:
    config = transformers.AutoConfig.for_model(model_type, **config_kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    set_synthetic_weights(model)
    with tempfile.TemporaryDirectory() as tmp:
        # Round trip through save_pretrained so the fixture reflects the on-disk HF layout
        # (tensor names, tied lm_head left out, config keys transformers 5 writes).
        model.save_pretrained(tmp)
        config_text = (Path(tmp) / "config.json").read_text()
        saved_names = sorted(safetensors.safe_open(Path(tmp) / "model.safetensors", "np").keys())
        saved_meta = safetensors.safe_open(Path(tmp) / "model.safetensors", "np").metadata()
        reloaded = AutoModelForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="sdpa"
        )
    reloaded.eval()

    digests = {}
    for param_name, tensor in reloaded.state_dict().items():
        if param_name not in saved_names:
            continue  # tied lm_head: not in the file, not a separate tensor in binllm either
        values = tensor.numpy()
        expected = synthetic_tensor(param_name, tuple(values.shape))
        assert np.array_equal(values.view(np.uint32), expected.view(np.uint32)), param_name
        digests[param_name] = {"shape": list(values.shape), "fnv1a64_le_f32": tensor_digest(values)}
    assert sorted(digests) == saved_names, (sorted(digests), saved_names)

    model64 = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model64.load_state_dict(reloaded.state_dict())
    model64 = model64.double().eval()
    keep_float64(model64)

    tensors: dict[str, np.ndarray] = {}
    sequences = tiny_token_ids(config.vocab_size)
    f32_vs_f64 = []
    with torch.no_grad():
        for i, ids in enumerate(sequences):
            input_ids = torch.tensor([ids], dtype=torch.long)
            logits32 = reloaded(input_ids=input_ids, use_cache=False).logits[0].numpy()
            logits64 = model64(input_ids=input_ids, use_cache=False).logits[0].numpy()
            assert logits32.dtype == np.float32 and logits64.dtype == np.float64
            assert np.isfinite(logits32).all() and np.isfinite(logits64).all()
            tensors[f"ids_{i}"] = np.array(ids, dtype=np.int64)
            tensors[f"logits_{i}"] = np.ascontiguousarray(logits32)
            tensors[f"logits_f64_{i}"] = np.ascontiguousarray(logits64)
            f32_vs_f64.append(relative_l2(logits64, logits32))

    metadata = {
        "fixture": name,
        "kind": "synthetic",
        "generator": GENERATOR_ID,
        "config_json": config_text,
        "saved_safetensors_metadata": json.dumps(saved_meta, sort_keys=True),
        "weights_digest": json.dumps(digests, sort_keys=True),
        "num_sequences": str(len(sequences)),
        "columns": "all",
        "attn_implementation": "sdpa",
        "f32_vs_f64_relative_l2": json.dumps(f32_vs_f64),
        **version_metadata(),
    }
    path = out / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return {
        "file": path.name,
        "config": json.loads(config_text),
        "sequence_lengths": [len(s) for s in sequences],
        "f32_vs_f64_relative_l2": f32_vs_f64,
        "params": sum(int(np.prod(d["shape"])) for d in digests.values()),
    }


# ---------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the GGUF
# ---------------------------------------------------------------------------------------

SMOL_POSITIONS = 32
SMOL_COLUMN_STRIDE = 16
SMOL_TOP_K = 32

SMOL_PLAIN_PROMPT = (
    "The old lighthouse keeper climbed the spiral stairs every evening, lit the great lamp, "
    "and watched the ships pass safely through the narrow channel between the rocky islands "
    "while a storm gathered far out at sea."
)
# Non-ASCII early, so the stored positions cover byte-level pieces of CJK and accents.
SMOL_MIXED_PROMPT = (
    "Zürich café: 3× crème brûlée @ €4.50 — 東京 ¥680, naïve ≈ 13,5 €; "
    "invoice #4471 (2024-03-15), 1/3 ≠ 0.333… ✓"
)
# Short enough (39 tokens) that the fixture stores every position of the rendered prompt,
# the last one included: that is where the reply starts. An explicit system message keeps
# the template from inserting its long default one.
SMOL_CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Italy?"},
]
SMOL_CHAT_MAX_POSITIONS = 48


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def logits_summary(logits: np.ndarray, columns: np.ndarray) -> dict[str, np.ndarray]:
    """The stored subset of float32 logits [positions, vocab]; statistics in float64."""
    full64 = logits.astype(np.float64)
    top_ids = np.argsort(-logits, axis=-1, kind="stable")[:, :SMOL_TOP_K]
    row_max = full64.max(axis=-1, keepdims=True)
    logsumexp = row_max[:, 0] + np.log(np.exp(full64 - row_max).sum(axis=-1))
    return {
        "logits": np.ascontiguousarray(logits[:, columns]),
        "top_ids": top_ids.astype(np.int64),
        "top_logits": np.take_along_axis(logits, top_ids, axis=-1).astype(np.float32),
        "l2": np.linalg.norm(full64, axis=-1).astype(np.float32),
        "logsumexp": logsumexp.astype(np.float32),
    }


def build_smol_fixture(gguf_path: Path, out: Path) -> dict:
    models_dir = str(gguf_path.parent)
    tokenizer = AutoTokenizer.from_pretrained(models_dir, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        models_dir, gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    vocab = model.config.vocab_size
    columns = np.arange(0, vocab, SMOL_COLUMN_STRIDE, dtype=np.int64)

    chat_text = tokenizer.apply_chat_template(SMOL_CHAT, tokenize=False, add_generation_prompt=True)
    prompts = [
        {"kind": "plain", "text": SMOL_PLAIN_PROMPT},
        {"kind": "mixed", "text": SMOL_MIXED_PROMPT},
        {"kind": "chat", "text": chat_text, "messages": SMOL_CHAT, "add_generation_prompt": True},
    ]
    # The default call, exactly as a user would tokenize: add_special_tokens=True.
    for p in prompts:
        ids_default = tokenizer(p["text"])["input_ids"]
        ids_plain = tokenizer(p["text"], add_special_tokens=False)["input_ids"]
        p["ids"] = ids_default
        p["special_tokens_added"] = len(ids_default) - len(ids_plain)
        p["decoded_roundtrip_equal"] = tokenizer.decode(ids_default) == p["text"]
        if p["kind"] == "chat":
            assert len(ids_default) <= SMOL_CHAT_MAX_POSITIONS, len(ids_default)
            p["positions"] = len(ids_default)
        else:
            assert len(ids_default) >= SMOL_POSITIONS, (p["kind"], len(ids_default))
            p["positions"] = SMOL_POSITIONS

    model64 = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32, attn_implementation="sdpa")
    model64.load_state_dict(model.state_dict())
    model64 = model64.double().eval()
    keep_float64(model64)

    tensors: dict[str, np.ndarray] = {"columns": columns}
    f32_vs_f64 = []
    top1_agree = []
    last_top1 = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            # Causal: the first P positions of the full prompt depend only on its first P ids.
            input_ids = torch.tensor([p["ids"][: p["positions"]]], dtype=torch.long)
            logits32 = model(input_ids=input_ids, use_cache=False).logits[0].numpy()
            logits64 = model64(input_ids=input_ids, use_cache=False).logits[0].numpy()
            assert np.isfinite(logits32).all()
            summary = logits_summary(logits32, columns)
            tensors[f"ids_{i}"] = np.array(p["ids"], dtype=np.int64)
            tensors[f"logits_{i}"] = summary["logits"]
            tensors[f"top_ids_{i}"] = summary["top_ids"]
            tensors[f"top_logits_{i}"] = summary["top_logits"]
            tensors[f"l2_{i}"] = summary["l2"]
            tensors[f"logsumexp_{i}"] = summary["logsumexp"]
            f32_vs_f64.append(relative_l2(logits64, logits32))
            top1_agree.append(float((logits64.argmax(-1) == logits32.argmax(-1)).mean()))
            last_top1.append(tokenizer.decode([int(summary["top_ids"][-1, 0])]))

    config_json = model.config.to_json_string(use_diff=False)
    metadata = {
        "fixture": "smollm2_135m_instruct_q4_1",
        "kind": "gguf",
        "model_file": gguf_path.name,
        "model_sha256": sha256_file(gguf_path),
        "config_json": config_json,
        "num_sequences": str(len(prompts)),
        "positions": json.dumps([p["positions"] for p in prompts]),
        "columns": f"every {SMOL_COLUMN_STRIDE}th vocab id, stored as tensor 'columns'",
        "column_stride": str(SMOL_COLUMN_STRIDE),
        "vocab_size": str(vocab),
        "top_k": str(SMOL_TOP_K),
        "prompts": json.dumps(
            [{k: v for k, v in p.items() if k != "ids"} for p in prompts], ensure_ascii=False
        ),
        "tokenizer_call": "tokenizer(text) (add_special_tokens=True, the default)",
        # As transformers' GGUF tokenizer conversion reports them (not necessarily the GGUF's).
        "tokenizer_special_tokens": json.dumps(
            {
                "bos": [tokenizer.bos_token, tokenizer.bos_token_id],
                "eos": [tokenizer.eos_token, tokenizer.eos_token_id],
                "unk": [tokenizer.unk_token, tokenizer.unk_token_id],
                "pad": [tokenizer.pad_token, tokenizer.pad_token_id],
            }
        ),
        "attn_implementation": "sdpa",
        "f32_vs_f64_relative_l2": json.dumps(f32_vs_f64),
        "f32_vs_f64_top1_agreement": json.dumps(top1_agree),
        **version_metadata(),
    }
    path = out / "smollm2_135m_instruct_q4_1.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return {
        "file": path.name,
        "prompts": [
            {k: p[k] for k in ("kind", "positions", "special_tokens_added", "decoded_roundtrip_equal")}
            | {"num_ids": len(p["ids"])}
            for p in prompts
        ],
        "f32_vs_f64_relative_l2": f32_vs_f64,
        "f32_vs_f64_top1_agreement": top1_agree,
        "last_position_top1": last_top1,
        "config": json.loads(config_json),
    }


def version_metadata() -> dict[str, str]:
    return {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": sys.version.split()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="fixture directory")
    parser.add_argument(
        "--gguf",
        type=Path,
        default=Path("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        help="the SmolLM2-135M-Instruct Q4_1 GGUF (never downloaded by this script)",
    )
    parser.add_argument("--skip-gguf", action="store_true", help="only the synthetic fixtures")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # fixed reduction order: identical bytes on every run
    args.out.mkdir(parents=True, exist_ok=True)

    report = {"versions": version_metadata(), "fixtures": []}
    (args.out / "generator.json").write_text(json.dumps(generator_samples(), indent=1) + "\n")
    for name, model_type, kwargs in TINY_MODELS:
        info = build_tiny_fixture(name, model_type, kwargs, args.out)
        report["fixtures"].append(info)
        print(f"{name}: {info['params']} params, f32 vs f64 rel L2 {info['f32_vs_f64_relative_l2']}")
    if not args.skip_gguf:
        info = build_smol_fixture(args.gguf, args.out)
        report["fixtures"].append(info)
        print(f"smollm2: {info['prompts']}, f32 vs f64 rel L2 {info['f32_vs_f64_relative_l2']}")
    print(json.dumps(report["versions"]))


if __name__ == "__main__":
    main()
