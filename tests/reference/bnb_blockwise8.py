"""Reference fixture for bitsandbytes' CPU 8-bit blockwise quantizer (double-quant path).

Writes tests/data/quant/bnb_blockwise8.safetensors (run:
``.venv/bin/python tests/reference/bnb_blockwise8.py``).

Why: nested ("double") quantization of 4-bit absmax calls
``quantize_blockwise(absmax - offset, blocksize=256)`` with the signed dynamic map.
On CPU, bitsandbytes 0.50.x runs the native ``cquantize_blockwise_cpu_fp32``
(csrc/cpu_ops.cpp ``quantize_cpu_impl``), which is NOT a nearest-code search: it
quantizes the scaled value to a 65,536-entry lookup table.  To write checkpoints
that are byte-identical to bitsandbytes-on-CPU the C++ library has to reproduce the
exact float32 arithmetic, including where the shipped binary uses an FMA.

Tensors (blocksize 256, 18 blocks, the last one partial; per-block descriptions in
__metadata__["blocks"]):
  input    F32[4452]  values to quantize (flat)
  code     F32[256]   the signed dynamic map used (create_dynamic_map() here; it is
                      torch-build dependent, so always use this stored copy)
  lut      U8[65536]  the 65,536-entry index -> code table the CPU kernel builds from
                      `code` (emulated; every entry is exercised by the checks above)
  codes    U8[4452]   bitsandbytes quantize_blockwise output codes
  absmax   F32[18]    per-block absmax (0 for the all-zero block, inf for the inf block)
  dequant  F32[4452]  dequantize_blockwise(codes, state) = fl32(code[codes] * absmax)

The script
  1. emulates the quantizer in exact float32 numpy arithmetic in several variants
     (with / without an FMA at each candidate place; FMA = float64 a*b+c rounded
     once to float32, which is exact for float32 operands here),
  2. runs the real ``bitsandbytes.functional.quantize_blockwise`` on CPU over ~5.3
     million values concentrated at LUT index edges and at code midpoints and keeps
     the variants that match every byte (asserts that the FMA variant does),
  3. checks ``dequantize_blockwise`` (``fl32(code[q] * absmax)``),
  4. writes a small fixture.

Confirmed rule (bitsandbytes 0.50.2 libbitsandbytes_cpu.so, x86-64, built by GCC 11.4;
its disassembly shows vdivss, vmulss, vaddss 1.0, vmulss 0.5, vfmadd213ss 65535/0.5,
vcvttss2si, i.e. the FMA IS emitted at the last step):
  absmax_b = max |x| over the 256-block (float32; NaN elements ignored; starts at 0)
  if absmax_b == 0: every code in the block is 0 (i.e. code[0] = -0.99296875!) and
                    absmax_b = 0 is stored; dequant gives -0.99296875*0 = -0.0
  inv  = fl32(1.0f / absmax_b)                       (IEEE division)
  v    = clamp(fl32(x * inv), -1, 1)                 (NaN passes through clamp)
  t    = fl32(v + 1.0f);  u = fl32(t * 0.5f)         (the halving is exact)
  idx  = (uint16)(int32)trunc( fma(u, 65535.0f, 0.5f) )
         (NaN -> cvttss2si gives 0x80000000 -> low 16 bits 0 -> idx 0)
  q    = lut[idx]
  lut[i] = #{ j in 0..254 : mid[j] < val_i },  val_i = fl32(fl32(2.0f*i / 65535.0f) - 1.0f),
           mid[j] = fl32(0.5f * fl32(code[j] + code[j+1]))
  dequant: out = fl32(code[q] * absmax_b)  (plain float32 multiply, no FMA possible)
FMA or not does NOT matter for this formula: trunc(fma(u,65535,0.5)) ==
trunc(fl(fl(u*65535)+0.5)) for every reachable u (fl(P)+0.5 is exact whenever it is
>= 1, and rounding fl(P) onto k-0.5 happens only when P+0.5 is within half an ulp of
k, where the FMA also rounds to k).  Measured: 16.4M values at LUT index edges and
code midpoints (three absmax scales) and, with --exhaustive, all 2,130,706,434
float32 in [-1, 1], match both the FMA and the two-rounding emulation, and also the
reassociated t*32767.5 forms.  What DOES matter is rounding t = v + 1 to float32
before the scaling (skipping it mismatches ~100 per million edge values).  x = 0
maps to LUT index 32768 -> code 131 (+2.125e-5), not 127.
"""

from __future__ import annotations

import os

import numpy as np
import torch

import _refcommon as rc

OUT = os.path.join(rc.DATA_DIR, "quant", "bnb_blockwise8.safetensors")
BS = 256
f32 = np.float32


# ----------------------------------------------------------------------------- emulation
def build_lut(code: np.ndarray) -> np.ndarray:
    code = code.astype(f32)
    mid = (f32(0.5) * (code[:-1] + code[1:])).astype(f32)
    i = np.arange(65536, dtype=np.int64)
    val = ((f32(2.0) * i.astype(f32)) / f32(65535.0)).astype(f32) - f32(1.0)
    val = val.astype(f32)
    # count of midpoints strictly below val (the C++ while loop, capped at 255)
    return np.searchsorted(mid, val, side="left").astype(np.uint8)


def fma32(a, b, c):
    """float32 fma: exact in float64 for these operand ranges, then one rounding."""
    return (a.astype(np.float64) * np.float64(b) + np.float64(c)).astype(f32)


def index_variants(v: np.ndarray) -> dict:
    """LUT index for already-scaled values v (float32), for each arithmetic variant."""
    with np.errstate(invalid="ignore"):
        v = np.where(v < f32(-1), f32(-1), np.where(v > f32(1), f32(1), v)).astype(f32)  # std::clamp, NaN kept
        t = (v + f32(1.0)).astype(f32)
        u = (t * f32(0.5)).astype(f32)
        out = {}
        out["fma_final"] = fma32(u, 65535.0, 0.5)                              # fma(u, 65535, 0.5)
        out["no_fma"] = ((u * f32(65535.0)).astype(f32) + f32(0.5)).astype(f32)  # two roundings
        out["reassoc_t_times_32767.5_fma"] = fma32(t, 32767.5, 0.5)
        out["reassoc_t_times_32767.5_no_fma"] = ((t * f32(32767.5)).astype(f32) + f32(0.5)).astype(f32)
        out["fma_v_plus_1_exact"] = fma32((v.astype(np.float64) + 1.0) * 0.5, 65535.0, 0.5)  # no rounding of t
        res = {}
        for k, g in out.items():
            gi = np.where(np.isnan(g), f32(-2.0**31), g)
            res[k] = (np.trunc(gi).astype(np.int64) & 0xFFFF).astype(np.int64)
    return res


def quantize_emul(x: np.ndarray, code: np.ndarray, variant: str = "fma_final"):
    x = x.astype(f32)
    n = x.size
    nb = -(-n // BS)
    lut = build_lut(code)
    absmax = np.zeros(nb, dtype=f32)
    q = np.zeros(n, dtype=np.uint8)
    pad = np.zeros(nb * BS, dtype=f32)
    pad[:n] = x
    blocks = pad.reshape(nb, BS)
    a = np.abs(blocks)
    a = np.where(np.isnan(a), f32(0), a)  # NaN ignored by std::max(cur, |x|)
    absmax[:] = a.max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = (f32(1.0) / absmax).astype(f32)
        v = (blocks * inv[:, None]).astype(f32).reshape(-1)[:n]
    idx = index_variants(v)[variant]
    q[:] = lut[idx]
    zero_blocks = np.repeat(absmax == 0, BS)[:n]
    q[zero_blocks] = 0
    return q, absmax


def dequant_emul(q, absmax, code):
    n = q.size
    s = np.repeat(absmax, BS)[:n]
    return (code.astype(f32)[q] * s).astype(f32)


# ----------------------------------------------------------------------------- bnb
def bnb_quant(x: np.ndarray, code_t: torch.Tensor):
    import bitsandbytes.functional as F

    q, st = F.quantize_blockwise(torch.from_numpy(x.astype(f32)), code=code_t, blocksize=BS)
    return q.numpy().copy(), st.absmax.numpy().copy(), st


def edge_inputs(code: np.ndarray) -> np.ndarray:
    """~5.3M float32 values at LUT index edges and code midpoints (scaled domain)."""
    k = np.arange(65537, dtype=np.float64)
    edges = (2 * k - 1) / 65535.0 - 1.0  # where (v+1)*32767.5+0.5 == k
    # ulp walk on the float32 total order (handle sign via signed-magnitude mapping)
    def walk(vals32, span):
        b = vals32.view(np.int32).astype(np.int64)
        key = np.where(b < 0, -(b & 0x7FFFFFFF), b)
        out = (key[:, None] + np.arange(-span, span + 1)[None, :]).reshape(-1)
        bits = np.where(out < 0, (-out) | 0x80000000, out).astype(np.uint32)
        return bits.view(f32)
    near_edges = walk(edges.astype(f32), 32)
    mids = (f32(0.5) * (code[:-1] + code[1:]).astype(f32)).astype(f32)
    near_mids = walk(mids, 256)
    uni = (rc.uniform01(1 << 20, seed=801) * 2.0 - 1.0).astype(f32)
    v = np.concatenate([near_edges, near_mids, uni])
    v = v[np.abs(v) <= 1.0]
    return v


def _key(v):
    b = np.asarray(v, dtype=f32).view(np.int32).astype(np.int64)
    return np.where(b < 0, -(b & 0x7FFFFFFF), b)


def _unkey(k):
    return np.where(k < 0, (-k) | 0x80000000, k).astype(np.uint32).view(f32)


def lut_code_edges(lut: np.ndarray) -> np.ndarray:
    """For every LUT index k where the code changes, the smallest float32 v with idx(v) >= k."""
    ks = np.flatnonzero(lut[1:] != lut[:-1]) + 1
    guess = (2.0 * ks - 1.0) / 65535.0 - 1.0
    lo = _key((guess - 2e-5).astype(f32))
    hi = _key((guess + 2e-5).astype(f32))
    idx = lambda kk: index_variants(_unkey(kk))["fma_final"]  # noqa: E731
    assert np.all(idx(lo) < ks) and np.all(idx(hi) >= ks)
    while np.any(hi - lo > 1):  # invariant: idx(lo) < k <= idx(hi)
        mid = (lo + hi) // 2
        up = idx(mid) >= ks
        hi = np.where(up, mid, hi)
        lo = np.where(up, lo, mid)
    return _unkey(hi)


def exhaustive_check(code_t, code, lut):
    """All 2,130,706,434 float32 in [-1, 1] through bnb (absmax 1) vs the emulations (~6 min)."""
    top = 0x3F800000
    ch = 255 * (1 << 16)
    bad = {"fma_final": 0, "no_fma": 0}
    n = 0
    for sign in (0, 0x80000000):
        for s0 in range(0, top + 1, ch):
            bits = np.arange(s0, min(s0 + ch, top + 1), dtype=np.uint32) | np.uint32(sign)
            x = pack_unit_blocks(bits.view(f32), 1.0)
            q, _, _ = bnb_quant(x, code_t)
            iv = index_variants(x)
            for k in bad:
                bad[k] += int((lut[iv[k]] != q).sum())
            n += bits.size
    print("exhaustive:", n, bad)
    return n, bad


def pack_unit_blocks(v: np.ndarray, scale: float) -> np.ndarray:
    """Lay values out in 256-blocks whose element 0 is +-scale (so absmax == scale)."""
    per = BS - 1
    nb = -(-v.size // per)
    buf = np.zeros(nb * per, dtype=f32)
    buf[: v.size] = v
    buf = (buf.reshape(nb, per).astype(np.float64) * scale).astype(f32)
    head = np.full((nb, 1), f32(scale), dtype=f32)
    head[1::2] = -f32(scale)
    return np.concatenate([head, buf], axis=1).reshape(-1)


def main():
    import sys

    import bitsandbytes.functional as F

    code_t = F.create_dynamic_map().float()
    code = code_t.numpy().copy()
    lut = build_lut(code)
    assert lut[32768] == 131 and index_variants(np.zeros(1, f32))["fma_final"][0] == 32768  # x = 0 -> code 131
    exhaustive = ("not run this time (pass --exhaustive, ~6 min). When first generated with bitsandbytes 0.50.2 it "
                  "ran: all 2,130,706,434 float32 in [-1,1] (absmax 1) matched both fma_final and no_fma, 0 mismatches")
    if "--exhaustive" in sys.argv:
        n, bad = exhaustive_check(code_t, code, lut)
        assert bad["fma_final"] == 0
        exhaustive = {"values": n, "mismatches": bad}

    # ---------------- 1. empirical variant determination
    v = edge_inputs(code)
    results = {}
    for scale in (1.0, 3.0, 0.0123):
        x = pack_unit_blocks(v, scale)
        q_bnb, am_bnb, _ = bnb_quant(x, code_t)
        for var in ("fma_final", "no_fma", "reassoc_t_times_32767.5_fma", "reassoc_t_times_32767.5_no_fma",
                    "fma_v_plus_1_exact"):
            q_e, am_e = quantize_emul(x, code, var)
            assert np.array_equal(am_e.view(np.uint32), am_bnb.view(np.uint32))
            results.setdefault(var, 0)
            results[var] += int((q_e != q_bnb).sum())
        print(f"scale {scale}: {x.size} values; mismatches so far {results}")
    assert results["fma_final"] == 0, results
    n_tested = 3 * pack_unit_blocks(v, 1.0).size

    # ---------------- 2. dequant check
    x = pack_unit_blocks(v[:100000], 0.37)
    q_bnb, am_bnb, st = bnb_quant(x, code_t)
    deq = F.dequantize_blockwise(torch.from_numpy(q_bnb), st).numpy()
    assert np.array_equal(deq.view(np.uint32), dequant_emul(q_bnb, am_bnb, code).view(np.uint32))

    # ---------------- 3. fixture input
    blocks = []
    desc = []
    # (a) exact LUT-index edges where the code changes (absmax 1): edge, edge-1ulp, edge+1ulp
    edges = lut_code_edges(lut)
    trip = np.concatenate([np.nextafter(edges, f32(-2)), edges, np.nextafter(edges, f32(2))]).astype(f32)
    trip = trip[np.abs(trip) <= 1]
    for j in range(0, trip.size, 255):
        chunk = trip[j:j + 255]
        blk = np.zeros(BS, dtype=f32)
        blk[0] = 1.0
        blk[1:1 + chunk.size] = chunk
        blocks.append(blk)
        desc.append("absmax 1.0 (element 0); smallest float32 v whose LUT index reaches a k with lut[k] != lut[k-1] "
                    "(the effective code boundaries), and +-1 ulp around them (padded with 0)")
    # (b) code midpoints, +-1 ulp, absmax 1
    mids = (f32(0.5) * (code[:-1] + code[1:]).astype(f32)).astype(f32)
    around = np.concatenate([mids, np.nextafter(mids, f32(2)), np.nextafter(mids, f32(-2))]).astype(f32)
    for j in range(0, around.size, 255):
        chunk = around[j:j + 255]
        blk = np.zeros(BS, dtype=f32)
        blk[0] = -1.0
        blk[1:1 + chunk.size] = chunk
        blocks.append(blk)
        desc.append("absmax 1.0 (element 0 = -1); float32 midpoints of adjacent codes and +-1 ulp (padded with 0)")
    # (c) codes themselves, zero, tiny, LUT sample points
    blk = np.zeros(BS, dtype=f32)
    blk[:BS] = np.concatenate([code[::2], code[1::2]])[:BS]
    blocks.append(blk)
    desc.append("the 256 code values themselves (absmax 1.0 from code[255]); zero maps to code 131, not 127")
    i = np.arange(0, 65536, 257)[:BS]
    blk = (((f32(2.0) * i.astype(f32)) / f32(65535.0)).astype(f32) - f32(1.0)).astype(f32)
    blk[0] = -1.0
    blocks.append(blk)
    desc.append("LUT sample points val_i = fl(fl(2i/65535) - 1) for i = 0, 257, 514, ... (absmax 1)")
    # (d) realistic double-quant input: absmax - offset of a 4-bit quantization
    r = rc.normalish(BS * 64, seed=802, scale=0.02).reshape(BS, 64)
    am4 = np.abs(r).max(axis=1).astype(f32)
    off = f32(am4.astype(np.float64).mean())
    blocks.append((am4 - off).astype(f32))
    desc.append("absmax - offset of a 64-blocksize 4-bit quantization of N(0,0.02)-ish data (the double-quant input)")
    # (e) random scales
    for s, seed in ((0.37, 803), (2.5e-3, 804), (1e30, 805), (1e-30, 806)):
        blocks.append((rc.normalish(BS, seed=seed).astype(np.float64) * s).astype(f32))
        desc.append(f"random normal-ish * {s:g}")
    # (f) absmax from a negative element, tiny/subnormal values
    blk = (rc.normalish(BS, seed=807) * f32(0.5)).astype(f32)
    blk[17] = -2.5
    blk[18:30] = np.array([1e-39, -1e-39, 1e-45, 0.0, -0.0, 1e-7, -1e-7, 2.5e-5, -2.5e-5, 5.5e-7, 2.5 * 2**-24, 1.0],
                          dtype=f32)
    blocks.append(blk)
    desc.append("absmax 2.5 from a negative element; tiny, subnormal, +-0 values")
    # (g) zero block
    blocks.append(np.zeros(BS, dtype=f32))
    desc.append("all zeros: absmax 0, every code 0 (code[0] = -0.99296875), dequant -0.0")
    # (h) NaN / inf block
    blk = (rc.normalish(BS, seed=808) * f32(0.1)).astype(f32)
    blk[3] = np.nan
    blk[4] = -np.nan
    blocks.append(blk)
    desc.append("special: NaN elements (ignored by absmax; NaN itself -> LUT index 0 -> code lut[0] = 0)")
    blk = (rc.normalish(BS, seed=809) * f32(0.1)).astype(f32)
    blk[5] = np.inf
    blocks.append(blk)
    desc.append("special: +inf element: absmax inf, inv 0, finite*0 = 0 -> code 131, inf*0 = NaN -> code 0")
    # (i) partial last block
    tail = (rc.normalish(100, seed=810) * f32(0.05)).astype(f32)
    x = np.concatenate(blocks + [tail]).astype(f32)
    block_desc = [{"block": b, "start": b * BS, "count": BS, "description": d} for b, d in enumerate(desc)]
    block_desc.append({"block": len(desc), "start": len(desc) * BS, "count": int(tail.size),
                       "description": "partial last block (100 elements) of random normal-ish * 0.05"})

    q_bnb, am_bnb, st = bnb_quant(x, code_t)
    q_e, am_e = quantize_emul(x, code, "fma_final")
    assert np.array_equal(q_bnb, q_e) and np.array_equal(am_bnb.view(np.uint32), am_e.view(np.uint32))
    q_nofma, _ = quantize_emul(x, code, "no_fma")
    deq = F.dequantize_blockwise(torch.from_numpy(q_bnb), st).numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        assert np.array_equal(deq.view(np.uint32), dequant_emul(q_bnb, am_bnb, code).view(np.uint32))
    # zero-block facts
    zb = len(desc) - 3
    assert np.all(q_bnb[zb * BS:(zb + 1) * BS] == 0) and am_bnb[zb] == 0
    assert np.all(deq[zb * BS:(zb + 1) * BS].view(np.uint32) == 0x80000000)

    meta = {
        "description": "bitsandbytes CPU 8-bit blockwise quantize/dequantize reference, blocksize 256, signed "
                       "dynamic map. See tests/reference/bnb_blockwise8.py for the exact rule.",
        "blocksize": BS,
        "blocks": block_desc,
        "rule": "absmax=max|x| (NaN ignored, 0 start); absmax==0 -> all codes 0; inv=fl(1/absmax); "
                "v=clamp(fl(x*inv),-1,1); u=fl(fl(v+1)*0.5); idx=(uint16)(int32)trunc(fma(u,65535,0.5)) "
                "(an FMA; fl(fl(u*65535)+0.5) gives identical results; NaN->0); q=lut[idx]; lut[i]=#{j: mid[j] < fl(fl(2i/65535)-1)}, "
                "mid[j]=fl(0.5*fl(c[j]+c[j+1])); dequant=fl(code[q]*absmax)",
        "variant_mismatches_on_edge_sweep": results,
        "edge_sweep_values_tested": n_tested,
        "fixture_codes_differing_without_fma": int((q_nofma != q_bnb).sum()),
        "exhaustive_check": exhaustive,
        "code_map_source": "bitsandbytes.functional.create_dynamic_map() on this machine (torch build dependent; "
                           "always use the stored map)",
    }
    tensors = {
        "input": torch.from_numpy(x),
        "code": code_t.clone(),
        "lut": torch.from_numpy(lut),
        "codes": torch.from_numpy(q_bnb),
        "absmax": torch.from_numpy(am_bnb),
        "dequant": torch.from_numpy(deq),
    }
    rc.save(OUT, tensors, meta)
    print({k: v for k, v in meta.items() if k not in ("blocks",)})


if __name__ == "__main__":
    main()
