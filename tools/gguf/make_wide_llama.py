#!/usr/bin/env python3
"""Makes a small Llama Hugging Face directory whose every linear width is a multiple of 128
(hidden 256, FFN 768), so that `binllm export --format gguf` writes all its block linears as
Q1_0. Standard library only.

The weights are derived from stories260K (../shared/models/stories260K, read at run time,
never copied into the repo): every tensor is tiled four times so that the wide model computes
stories260K's function (up to float rounding) before binarisation:

- hidden 64 -> 256: the residual stream is four copies of the original one (RMSNorm of four
  copies equals RMSNorm of one); embeddings and norm weights are tiled.
- attention: 8 heads of 8 -> 32 heads of 8 (copy k of head h is head 8k + h), 4 kv heads ->
  16, so each copy of a query head reads the copy of its own kv head; q/k/v/o are tiled, input
  columns divided by 4 (four copies summed give the original product).
- FFN 172 -> 768: four copies of 172 units padded to 192 with zero units; down_proj tiled.
- an untied head (the embedding tiled and divided by 4), since a tied one would scale the
  logits by 4.

The tokenizer is stories260K's tok512 (SentencePiece BPE, 512 pieces) as binllm builds it:
the script asks `binllm export --ptq` for a packed file of stories260K and copies the
tokenizer.json embedded in its header.

Usage: make_wide_llama.py OUT_DIR [--binllm target/release/binllm] [--shared ../shared]
"""

import argparse
import array
import json
import os
import struct
import subprocess
import sys
import tempfile

TILE = 4
FFN_PADDED = 192  # 172 units padded to a width that makes 4 * 192 = 768 a multiple of 128


def read_llama2c(path):
    """The legacy llama2.c checkpoint: 7 int32 header fields, then float32 tensors."""
    with open(path, "rb") as f:
        header = struct.unpack("<7i", f.read(28))
        data = array.array("f")
        data.frombytes(f.read())
    if sys.byteorder != "little":
        data.byteswap()
    dim, hidden, layers, heads, kv_heads, vocab, _seq_len = header
    vocab = abs(vocab)
    head_dim = dim // heads
    kv_dim = kv_heads * head_dim
    sizes = [
        ("tok_emb", vocab * dim),
        ("attn_norm", layers * dim),
        ("wq", layers * dim * dim),
        ("wk", layers * kv_dim * dim),
        ("wv", layers * kv_dim * dim),
        ("wo", layers * dim * dim),
        ("ffn_norm", layers * dim),
        ("w1", layers * hidden * dim),
        ("w2", layers * dim * hidden),
        ("w3", layers * hidden * dim),
        ("final_norm", dim),
    ]
    tensors, at = {}, 0
    for name, n in sizes:
        tensors[name] = data[at : at + n]
        at += n
    shape = dict(dim=dim, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                 vocab=vocab, head_dim=head_dim)
    return shape, tensors


def rows(flat, n_rows, n_cols, layer=0):
    """Layer `layer`'s matrix as a list of rows."""
    base = layer * n_rows * n_cols
    return [flat[base + r * n_cols : base + (r + 1) * n_cols] for r in range(n_rows)]


def rotate_half(matrix, heads, head_dim):
    """llama2.c keeps q/k rows in Meta's interleaved RoPE order; Hugging Face in rotate-half
    order: row h*hd + j*hd/2 + i is interleaved row h*hd + 2i + j."""
    half = head_dim // 2
    out = [None] * len(matrix)
    for h in range(heads):
        for i in range(half):
            for j in range(2):
                out[h * head_dim + j * half + i] = matrix[h * head_dim + 2 * i + j]
    return out


def tile_matrix(matrix, out_width, in_width):
    """Four copies of the rows (each padded with zero rows to `out_width`), each row four
    copies of its columns (padded with zeros to `in_width`) divided by 4."""
    zero_row = [0.0] * len(matrix[0])
    padded = list(matrix) + [zero_row] * (out_width - len(matrix))
    out = []
    for _ in range(TILE):
        for row in padded:
            cols = [v / TILE for v in row] + [0.0] * (in_width - len(row))
            out.append(cols * TILE)
    return out


def tile_vector(v):
    return list(v) * TILE


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, (shape, values) in tensors.items():
        blob = array.array("f", values)
        if sys.byteorder != "little":
            blob.byteswap()
        blob = blob.tobytes()
        header[name] = {"dtype": "F32", "shape": shape,
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def embedded_tokenizer(binllm, model, tokenizer):
    """binllm's tokenizer.json for the llama2.c tokenizer, from a packed file's header."""
    with tempfile.TemporaryDirectory() as tmp:
        packed = os.path.join(tmp, "stories.b1")
        subprocess.run([binllm, "export", "--ptq", model, "--tokenizer", tokenizer,
                        "--out", packed], check=True, stdout=subprocess.DEVNULL)
        with open(packed, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    return header["__metadata__"]["binllm.tokenizer"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--binllm", default="target/release/binllm")
    parser.add_argument("--shared", default="../shared")
    args = parser.parse_args()
    source = os.path.join(args.shared, "models/stories260K/stories260K.bin")
    tok512 = os.path.join(args.shared, "models/stories260K/tok512.bin")
    s, t = read_llama2c(source)
    dim, hd = s["dim"], s["head_dim"]
    kv_dim = s["kv_heads"] * hd
    wide = dim * TILE
    ffn = FFN_PADDED * TILE

    def flat(matrix):
        return [v for row in matrix for v in row]

    tensors = {}
    emb = rows(t["tok_emb"], s["vocab"], dim)
    tensors["model.embed_tokens.weight"] = ([s["vocab"], wide], flat([tile_vector(r) for r in emb]))
    tensors["lm_head.weight"] = ([s["vocab"], wide],
                                 flat([[v / TILE for v in r] * TILE for r in emb]))
    tensors["model.norm.weight"] = ([wide], tile_vector(t["final_norm"]))
    for layer in range(s["layers"]):
        p = f"model.layers.{layer}."
        norm = lambda name: tile_vector(t[name][layer * dim : (layer + 1) * dim])
        tensors[p + "input_layernorm.weight"] = ([wide], norm("attn_norm"))
        tensors[p + "post_attention_layernorm.weight"] = ([wide], norm("ffn_norm"))
        q = rotate_half(rows(t["wq"], dim, dim, layer), s["heads"], hd)
        k = rotate_half(rows(t["wk"], kv_dim, dim, layer), s["kv_heads"], hd)
        v = rows(t["wv"], kv_dim, dim, layer)
        o = rows(t["wo"], dim, dim, layer)
        gate = rows(t["w1"], s["hidden"], dim, layer)
        down = rows(t["w2"], dim, s["hidden"], layer)
        up = rows(t["w3"], s["hidden"], dim, layer)
        for name, m, out_w, in_w in [
            ("self_attn.q_proj", q, dim, dim), ("self_attn.k_proj", k, kv_dim, dim),
            ("self_attn.v_proj", v, kv_dim, dim), ("self_attn.o_proj", o, dim, dim),
            ("mlp.gate_proj", gate, FFN_PADDED, dim), ("mlp.up_proj", up, FFN_PADDED, dim),
            ("mlp.down_proj", down, dim, FFN_PADDED),
        ]:
            tiled = tile_matrix(m, out_w, in_w)
            tensors[p + name + ".weight"] = ([len(tiled), len(tiled[0])], flat(tiled))

    os.makedirs(args.out_dir, exist_ok=True)
    write_safetensors(os.path.join(args.out_dir, "model.safetensors"), tensors)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": s["vocab"], "hidden_size": wide, "intermediate_size": ffn,
        "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"] * TILE,
        "num_key_value_heads": s["kv_heads"] * TILE, "head_dim": hd,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(args.out_dir, "tokenizer.json"), "w") as f:
        f.write(embedded_tokenizer(args.binllm, source, tok512))
    with open(os.path.join(args.out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    print(f"wrote {args.out_dir}: hidden {wide}, FFN {ffn}, {s['layers']} layers, "
          f"{s['heads'] * TILE} heads of {hd} ({s['kv_heads'] * TILE} kv heads), "
          f"vocab {s['vocab']}, from {source}")


if __name__ == "__main__":
    main()
