#!/usr/bin/env bash
# Run a command as an AVX2-only host would (no AVX-512, no VNNI, no native bf16), on a host that
# has more: onspec chooses its kernels from ONSPEC_CPU_FLAGS, and each kernel library is held to
# AVX2 by its own switch (FBGEMM, oneDNN, MKL, ATen's vectorized kernels). Memory bandwidth and
# core speed stay this host's: a measurement made this way is labelled "AVX2 (emulated)".
#   scripts/as-avx2.sh .venv/bin/onspec bench --prompts 4
export ONSPEC_CPU_FLAGS="avx2,fma"
export FBGEMM_ENABLE_INSTRUCTIONS=AVX2
export ONEDNN_MAX_CPU_ISA=AVX2
export DNNL_MAX_CPU_ISA=AVX2
export MKL_ENABLE_INSTRUCTIONS=AVX2
export ATEN_CPU_CAPABILITY=avx2
exec "$@"
