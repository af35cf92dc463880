"""Reference fixture for bf16 / fp16 <-> float32 conversions.

Writes tests/data/core/dtype_conversions.safetensors (run:
``.venv/bin/python tests/reference/dtype_conversions.py``).  The C++ library must
convert between float32 and bfloat16 / float16 exactly as PyTorch does on CPU,
because bitsandbytes dequantizes with ``fl32(code*absmax).to(dtype)`` and every
4-bit fixture compares bf16/fp16 outputs bit for bit.

Tensors
  bf16_all_bits_as_f32  F32[65536]  element i = float32(bfloat16 with bit pattern i)
  fp16_all_bits_as_f32  F32[65536]  element i = float32(float16 with bit pattern i)
  sweep_f32             F32[N]      N = 51250 float32 inputs hitting every rounding case
                                    (see the "segments" metadata: name/start/count/
                                    description): specials and NaN payloads, float32
                                    limits, bf16 ties in all 255 binades, fp16 ties in
                                    all binades, fp16 subnormal ties, fp16 under/overflow
                                    boundaries, 32768 random bit patterns and 8192 random
                                    values in the fp16 range (N is capped so the file
                                    stays under 1 MB next to the two 256 KiB all-bits
                                    tables; tests/core/dtype_test.cpp expects N > 50000)
  sweep_to_bf16         BF16[N]     sweep_f32.to(torch.bfloat16), one tensor op on the
                                    whole contiguous 1-D tensor (vectorized ATen kernel)
  sweep_to_fp16         F16[N]      sweep_f32.to(torch.float16), same

Findings (asserted by this script, also recorded in the metadata):
  * widening (bf16/fp16 -> f32) is exact.  bf16 -> f32 is bits << 16 for every
    pattern (signalling NaNs stay signalling).  fp16 -> f32 NaN keeps sign and
    payload but FORCES the quiet bit: 0x7C01 -> 0x7FC02000 (F16C vcvtph2ps rule).
  * float32 -> bf16 on a tensor: round-to-nearest-even on the raw bits (subnormals
    kept, overflow to +-inf), EVERY NaN becomes 0xFFFF (negative quiet NaN, full
    payload), whatever its sign or payload.
  * float32 -> bf16 through the scalar path (``torch.tensor(x).to(bf16)`` or a 0-d
    tensor, i.e. c10::BFloat16(float)) gives the same bits for every non-NaN input,
    but EVERY NaN becomes 0x7FC0 (positive canonical quiet NaN).  So the two PyTorch
    paths differ on NaN (sign and payload); a 1-element 1-D tensor takes the
    vector path (0xFFFF).
  * float32 -> fp16: round-to-nearest-even with fp16 subnormals, overflow to +-inf
    (|x| >= 65520 -> inf, 65519.996 -> 65504), NaN -> sign | 0x7E00 | (mantissa >> 13)
    (sign kept, payload truncated, quiet bit forced: the F16C vcvtps2ph rule).
    Tensor and scalar paths agree bit for bit, NaNs included.
The exact scalar-vs-tensor comparison result is in metadata "scalar_path_check".
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

import _refcommon as rc

OUT = os.path.join(rc.DATA_DIR, "core", "dtype_conversions.safetensors")


def f32_bits_of_f16(h: np.ndarray) -> np.ndarray:
    return np.asarray(h, dtype=np.uint16).view(np.float16).astype(np.float32).view(np.uint32)


def build_sweep():
    segments = []
    parts = []

    def add(name, bits, desc):
        bits = np.asarray(bits, dtype=np.uint64).astype(np.uint32)
        start = sum(len(p) for p in parts)
        parts.append(bits)
        segments.append({"name": name, "start": start, "count": int(len(bits)), "description": desc})

    # 1. specials
    nan_payloads = [
        0x7FC00000, 0x7FC00001, 0x7FC12345, 0x7FE00000, 0x7FFFFFFF, 0x7FFF8000, 0x7FFF7FFF,
        0x7F800001, 0x7F801FFF, 0x7F802000, 0x7F807FFF, 0x7F808000, 0x7F810000, 0x7F812345,
        0x7FA00000, 0x7FBFFFFF,
    ]
    specials = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000]
    specials += nan_payloads + [b | 0x80000000 for b in nan_payloads]
    add("specials", specials, "+-0, +-inf, quiet and signalling NaNs of both signs with assorted payloads "
        "(payload bits only below bit 13 / bit 16, carry-provoking 0x7FFF8000, ...)")

    # 2. float32 subnormals / normal limits
    sub = [0x00000001, 0x00000002, 0x00000003, 0x00007FFF, 0x00008000, 0x00008001, 0x00018000,
           0x00017FFF, 0x00018001, 0x007F7FFF, 0x007F8000, 0x007F8001, 0x007FFFFF, 0x007FFFFE,
           0x00800000, 0x00800001, 0x00807FFF, 0x00808000, 0x00818000,
           0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x7F7F8001, 0x7F7EFFFF, 0x7F7E8000, 0x7F000000]
    sub += [b | 0x80000000 for b in sub]
    add("f32_limits", sub, "float32 subnormals (bf16 ties among them), min normal, max normal and the "
        "bf16 overflow tie 0x7F7F8000 (-> inf), both signs")

    # 3. bf16 ties in every float32 binade (exponent field 0..254)
    rnd = rc.random_u32(255, seed=101)
    b = []
    for e in range(255):
        for mhi in (0x00, 0x01, 0x7F, int(rnd[e] & 0x7F)):
            hi = (e << 23) | (mhi << 16)
            for low in (0x7FFF, 0x8000, 0x8001):
                b.append(hi | low)
                b.append(hi | low | 0x80000000)
        for mhi in (0x00, 0x7F):
            hi = (e << 23) | (mhi << 16)
            b.append(hi | 0x0001)
            b.append(hi | 0xFFFF)
    add("bf16_ties", b, "for every float32 exponent field 0..254 and bf16 mantissas {0x00,0x01,0x7F,random}: "
        "low 16 bits 0x7FFF / 0x8000 (exact tie) / 0x8001, both signs; plus low bits 0x0001 and 0xFFFF")

    # 4. fp16 ties in every fp16 normal binade
    rnd = rc.random_u32(64, seed=102)
    b = []
    for e in range(1, 31):
        mants = [0, 1, 2, 0x3FE, 0x3FF, int(rnd[2 * e] & 0x3FF), int(rnd[2 * e + 1] & 0x3FF)]
        for m in mants:
            h = (e << 10) | m
            f = int(f32_bits_of_f16(np.array([h]))[0])
            tie = f + (1 << 12)  # exactly halfway to the next fp16 (mantissa 13 bits below)
            for v in (f, f + 1, tie - 1, tie, tie + 1, f - 1):
                b.append(v)
                b.append(v | 0x80000000)
    add("fp16_ties", b, "for every fp16 normal exponent and mantissas {0,1,2,0x3FE,0x3FF,2 random}: the fp16 value, "
        "+1 float ulp, -1 float ulp, the exact tie with the next fp16 and +-1 float ulp around it, both signs")

    # 5. fp16 subnormal ties
    ms = list(range(0, 16)) + [255, 256, 510, 511, 512, 513, 1020, 1021, 1022, 1023]
    ms += [int(v & 0x3FF) for v in rc.random_u32(20, seed=103)]
    b = []
    for m in ms:
        exact = np.float32(m * 2.0**-24).view(np.uint32)
        tie = np.float32((m + 0.5) * 2.0**-24).view(np.uint32)
        for v in (int(exact), int(tie) - 1, int(tie), int(tie) + 1):
            b.append(v)
            b.append(v | 0x80000000)
    add("fp16_subnormal_ties", b, "fp16 subnormals m*2^-24 and the ties (m+0.5)*2^-24 +-1 float ulp, both signs; "
        "m=1023 tie rounds up to the min normal 2^-14")

    # 6. fp16 underflow / overflow boundaries
    vals = [2.0**-24, 2.0**-25, 2.0**-26, 3 * 2.0**-26, 1.5 * 2.0**-24, 2.5 * 2.0**-24, 2.0**-14, 2.0**-15,
            2.0**-30, 2.0**-100, 2.0**-126, 65504.0, 65505.0, 65519.0, 65520.0, 65536.0, 65535.0, 131072.0,
            1e5, 1e10, 65488.0, 65472.0, 65440.0, 32768.0, 2048.0, 2049.0, 2050.0, 2051.0, 4097.0]
    b = []
    for v in vals:
        f = int(np.float32(v).view(np.uint32))
        for x in (f - 1, f, f + 1):
            b.append(x)
            b.append(x | 0x80000000)
    add("fp16_boundaries", b, "2^-24 (min subnormal), 2^-25 (tie to 0), 2^-26, 3*2^-26, 1.5*2^-24, 2^-14, "
        "65504 (max), 65519.996 (0x477FEFFF -> 65504), 65520 (0x477FF000 -> inf), 65536, ... each +-1 float ulp, both signs")

    # 7. random bit patterns
    add("random_bits", rc.random_u32(32768, seed=104), "32768 uniformly random float32 bit patterns (splitmix64 seed 104)")

    # 8. random in the fp16 range
    r = rc.random_u32(8192, seed=105)
    exp = (r >> np.uint32(23)) % np.uint32(46) + np.uint32(97)  # float exponents 2^-30 .. 2^15
    b = (r & np.uint32(0x807FFFFF)) | (exp << np.uint32(23))
    add("random_fp16_range", b, "8192 random float32 with exponents 2^-30..2^15 (fp16 subnormal..overflow range)")

    return np.concatenate(parts), segments


def ref_bf16(bits: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bf16 on raw bits (non-NaN inputs)."""
    u = bits.astype(np.uint64)
    return ((u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)).astype(np.uint16)


def main():
    # all-bits tables
    allbits = np.arange(65536, dtype=np.uint16)
    bf16_all = torch.from_numpy(allbits.copy()).view(torch.bfloat16).float()
    fp16_all = torch.from_numpy(allbits.copy()).view(torch.float16).float()
    # sanity: widening is exact / payload preserving
    assert np.array_equal(bf16_all.numpy().view(np.uint32), allbits.astype(np.uint32) << 16)
    nn = ~np.isnan(allbits.view(np.float16))
    assert np.array_equal(fp16_all.numpy().view(np.uint32)[nn], allbits.view(np.float16)[nn].astype(np.float32).view(np.uint32))
    # fp16 NaN widening rule: which of the two candidate rules holds
    h = allbits[~nn].astype(np.uint32)
    widened = fp16_all.numpy().view(np.uint32)[~nn]
    fp16_nan_widen_keeps_payload = bool(np.array_equal(widened, ((h & 0x8000) << 16) | 0x7F800000 | ((h & 0x3FF) << 13)))
    fp16_nan_widen_quiets = bool(np.array_equal(widened, ((h & 0x8000) << 16) | 0x7FC00000 | ((h & 0x3FF) << 13)))
    assert fp16_nan_widen_quiets
    # a 1-element 1-D tensor takes the vector path, a 0-d tensor the scalar path
    one = torch.tensor([float("nan")], dtype=torch.float32)
    assert one.to(torch.bfloat16).view(torch.int16).item() & 0xFFFF == 0xFFFF
    assert one[0].to(torch.bfloat16).view(torch.int16).item() & 0xFFFF == 0x7FC0

    bits, segments = build_sweep()
    sweep = torch.from_numpy(bits.view(np.float32).copy())
    to_bf16 = sweep.to(torch.bfloat16)
    to_fp16 = sweep.to(torch.float16)
    bf = to_bf16.view(torch.int16).numpy().view(np.uint16)
    hf = to_fp16.view(torch.int16).numpy().view(np.uint16)

    isnan = np.isnan(bits.view(np.float32))
    # rule checks (tensor path)
    assert np.array_equal(bf[~isnan], ref_bf16(bits[~isnan])), "bf16 RNE rule mismatch"
    assert np.all(bf[isnan] == 0xFFFF), "tensor bf16 NaN rule mismatch"
    with np.errstate(over="ignore"):
        np_hf = bits[~isnan].view(np.float32).astype(np.float16).view(np.uint16)
    assert np.array_equal(hf[~isnan], np_hf), "fp16 RNE mismatch"
    nb = bits[isnan]
    exp_nan16 = (((nb >> 16) & 0x8000) | 0x7E00 | ((nb >> 13) & 0x3FF)).astype(np.uint16)
    assert np.array_equal(hf[isnan], exp_nan16), "fp16 NaN rule mismatch"

    # scalar path: 0-d tensors, one element at a time
    bf_s = np.empty_like(bf)
    hf_s = np.empty_like(hf)
    for i in range(len(bits)):
        x = sweep[i]  # 0-d tensor (same as torch.tensor(float32 scalar))
        bf_s[i] = x.to(torch.bfloat16).view(torch.int16).item() & 0xFFFF
        hf_s[i] = x.to(torch.float16).view(torch.int16).item() & 0xFFFF
    # torch.tensor(python float) route for a sample (python float is double: sNaN quieted on the way)
    sample = np.flatnonzero(isnan)[:64].tolist() + list(range(0, len(bits), 997))
    pyfloat_bf = [torch.tensor(float(sweep[i]), dtype=torch.float32).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF
                  for i in sample]
    pyfloat_hf = [torch.tensor(float(sweep[i]), dtype=torch.float32).to(torch.float16).view(torch.int16).item() & 0xFFFF
                  for i in sample]
    bf_diff = np.flatnonzero(bf_s != bf)
    hf_diff = np.flatnonzero(hf_s != hf)
    assert np.all(isnan[bf_diff]) and np.all(bf_s[isnan] == 0x7FC0), "scalar bf16 path differs beyond NaN"
    check = {
        "bf16_tensor_vs_scalar_differ_count": int(len(bf_diff)),
        "bf16_differ_only_on_nan": bool(np.all(isnan[bf_diff])),
        "bf16_scalar_nan_bits": "0x7FC0 for every NaN input",
        "bf16_tensor_nan_bits": "0xFFFF for every NaN input",
        "fp16_tensor_vs_scalar_differ_count": int(len(hf_diff)),
        "nan_count_in_sweep": int(isnan.sum()),
        "pyfloat_route_bf16_all_nan_0x7FC0": bool(all(pyfloat_bf[k] == 0x7FC0 for k, i in enumerate(sample) if isnan[i])),
        "pyfloat_route_bf16_equals_scalar_non_nan": bool(all(pyfloat_bf[k] == bf_s[i] for k, i in enumerate(sample) if not isnan[i])),
        "pyfloat_route_fp16_equals_tensor_non_nan": bool(all(pyfloat_hf[k] == hf[i] for k, i in enumerate(sample) if not isnan[i])),
        "pyfloat_route_fp16_equals_tensor_incl_nan": bool(all(pyfloat_hf[k] == hf[i] for k, i in enumerate(sample))),
        "pyfloat_route_sample_size": len(sample),
    }
    print(json.dumps(check, indent=1))

    meta = {
        "description": "float32<->bf16/fp16 conversion reference (PyTorch CPU). See tests/reference/dtype_conversions.py",
        "segments": segments,
        "sweep_count": int(len(bits)),
        "rules": {
            "widen": "exact; bf16 -> bits<<16 (sNaN stays sNaN); fp16 NaN -> sign|0x7FC00000|(mant<<13) "
                     f"(quiet bit forced: {fp16_nan_widen_quiets}; payload kept unquieted: {fp16_nan_widen_keeps_payload})",
            "f32_to_bf16_tensor": "RNE on raw bits: (u + 0x7FFF + ((u>>16)&1)) >> 16 for non-NaN (subnormals kept, "
                                  "overflow to inf); every NaN -> 0xFFFF",
            "f32_to_bf16_scalar": "same for non-NaN; every NaN -> 0x7FC0",
            "f32_to_fp16": "IEEE RNE incl. subnormals, |x|>=65520 -> inf; NaN -> sign|0x7E00|(mant>>13); "
                           "tensor and scalar paths identical",
        },
        "scalar_path_check": check,
    }
    tensors = {
        "bf16_all_bits_as_f32": bf16_all,
        "fp16_all_bits_as_f32": fp16_all,
        "sweep_f32": sweep,
        "sweep_to_bf16": to_bf16,
        "sweep_to_fp16": to_fp16,
    }
    rc.save(OUT, tensors, meta)


if __name__ == "__main__":
    main()
