#!/usr/bin/env python3
"""Writes a Hugging Face Llama directory (F32 safetensors, such as make_wide_llama.py's) as an
F32 GGUF, the input llama.cpp's llama-quantize needs. Standard library only.

binllm cannot write a float GGUF, and llama.cpp's convert_hf_to_gguf.py needs torch and
transformers. So the metadata (hyperparameters, tokenizer) is taken from binllm's own GGUF
export of the same directory (`binllm export --ptq --format gguf`, run here into a temporary
folder), without its `binllm.one_bit` marker and with general.file_type ALL_F32; every tensor
is the directory's float weight, in the same order and shape, as F32. q/k rows go into
llama.cpp's interleaved RoPE order, as its converter writes them.

Usage: float_gguf.py HF_DIR OUT.gguf [--binllm target/release/binllm]
"""

import argparse
import json
import os
import struct
import subprocess
import tempfile

ALIGN = 32
F32 = 0
# Fixed sizes of the GGUF metadata value types; 8 = string, 9 = array.
SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class Reader:
    def __init__(self, data):
        self.data, self.at = data, 0

    def take(self, fmt):
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self):
        n = self.take("Q")
        self.at += n
        return self.data[self.at - n : self.at].decode()

    def skip_value(self, kind):
        if kind == 8:
            self.string()
        elif kind == 9:
            inner, n = self.take("IQ")
            for _ in range(n):
                self.skip_value(inner)
        else:
            self.at += SIZES[kind]


def read_header(path):
    """The metadata as (key, raw type + value bytes) and the tensors as (name, raw dims)."""
    with open(path, "rb") as f:
        r = Reader(f.read())
    magic, version, n_tensors, n_kv = r.take("4sIQQ")
    assert magic == b"GGUF" and version == 3, f"{path}: not a GGUF v3 file"
    kvs = []
    for _ in range(n_kv):
        key = r.string()
        start = r.at
        r.skip_value(r.take("I"))
        kvs.append((key, r.data[start : r.at]))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.take("I")
        dims = [r.take("Q") for _ in range(n_dims)]
        r.take("IQ")  # type, offset
        tensors.append((name, dims))
    return kvs, tensors


def read_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", f"{name}: {info['dtype']}, only F32 is handled"
        a, b = info["data_offsets"]
        out[name] = (info["shape"], data[a:b])
    return out


def interleave_rope(blob, shape, heads):
    """Hugging Face's rotate-half q/k rows into llama.cpp's interleaved order: interleaved
    row h*hd + 2i + j is rotate-half row h*hd + j*hd/2 + i."""
    rows, cols = shape
    hd = rows // heads
    row = lambda r: blob[r * cols * 4 : (r + 1) * cols * 4]
    return b"".join(row(h * hd + (w % 2) * (hd // 2) + w // 2) for h in range(heads) for w in range(hd))


def hf_tensor(name, weights, config):
    top = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
           "output_norm.weight": "model.norm.weight"}
    if name in top:
        return weights[top[name]][1]
    _, layer, module, _ = name.split(".")
    hf = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}[module]
    shape, blob = weights[f"model.layers.{layer}.{hf}.weight"]
    if module == "attn_q":
        return interleave_rope(blob, shape, config["num_attention_heads"])
    if module == "attn_k":
        return interleave_rope(blob, shape, config["num_key_value_heads"])
    return blob


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir")
    parser.add_argument("out")
    parser.add_argument("--binllm", default="target/release/binllm")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        template = os.path.join(tmp, "template.gguf")
        subprocess.run([args.binllm, "export", "--ptq", args.hf_dir, "--format", "gguf",
                        "--out", template], check=True, stdout=subprocess.DEVNULL)
        kvs, tensors = read_header(template)
    with open(os.path.join(args.hf_dir, "config.json")) as f:
        config = json.load(f)
    weights = read_safetensors(os.path.join(args.hf_dir, "model.safetensors"))

    meta = []
    for key, raw in kvs:
        if key == "binllm.one_bit":
            continue
        if key == "general.file_type":
            raw = struct.pack("<II", 4, 0)  # u32 ALL_F32
        if key == "general.name":
            raw = struct.pack("<I", 8) + gguf_string(os.path.basename(os.path.abspath(args.hf_dir)))
        meta.append(gguf_string(key) + raw)
    infos, blobs, offset = [], [], 0
    for name, dims in tensors:
        blob = hf_tensor(name, weights, config)
        n = 1
        for d in dims:
            n *= d
        assert len(blob) == 4 * n, f"{name}: {len(blob)} bytes for dims {dims}"
        infos.append(gguf_string(name) + struct.pack("<I", len(dims))
                     + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", F32, offset))
        blob += b"\0" * (-len(blob) % ALIGN)
        blobs.append(blob)
        offset += len(blob)
    head = struct.pack("<4sIQQ", b"GGUF", 3, len(infos), len(meta)) + b"".join(meta) + b"".join(infos)
    head += b"\0" * (-len(head) % ALIGN)
    with open(args.out, "wb") as f:
        f.write(head)
        for blob in blobs:
            f.write(blob)
    print(f"wrote {args.out}: {len(infos)} F32 tensors, {len(meta)} metadata keys, "
          f"{len(head) + offset} bytes")


if __name__ == "__main__":
    main()
