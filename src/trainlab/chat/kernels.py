"""Small C++ kernels for decoding several rows at once, each row's numbers depending on
nothing but the row: not on how many rows share the pass, nor on the thread count.

Why C++. A served stream must get the same text alone and among others (``chat serve``'s
guarantee). MKL's products round a row differently with the row count and the threads, so
the server ran every pass over a fixed 8 rows: one stream paid for eight. Inductor's
compiled products (``decoding.rowwise_linear``) keep a row's order alone, but inside a
whole pass of several rows it laid the products out feature-major and vectorised across
the rows, and the bits changed with the row count (results/decoding/README.md). Here the
order is written down:

- ``pack_linear(w)`` and ``packed_linear(x, packed, N)``: ``x`` (R, K) times ``w`` (N, K)
  transposed, with ``w`` packed once into panels of 32 outputs, (ceil(N/32), K, 32), read in
  one run. Each output is a chain of fused multiply-adds over k in order, from zero, vectorised
  along the outputs: an order fixed by K alone, whatever the row count, and the same bits with
  AVX-512, AVX2 or plain C++ (an FMA's result is exact to one rounding). Threads split the
  panels, so a thread computes whole outputs. A panel is read once for a tile of up to 8 rows
  (3 on AVX2) held in registers: 8 rows cost about twice one row here, where the earlier
  kernel (dot products along K, four rows a weight row, the lanes added at the end of each)
  cost 3-4x; at 1 row the two are alike (memory-bound). ``rows_linear(x, w)`` packs and then
  multiplies, for one-off use.
- ``rows_attend(q, k, v, keys, values, rows, positions, scale)``: writes each row's new key
  and value at its position in its cache row, then its query attends to positions
  0..positions[r]: scores, softmax and the weighted sum of values, each in position order,
  one (row, head) per thread at a time; the exponentials 16 at a time (``v_exp``, the same
  bits on every ISA), the weighted sum held in registers. Software prefetch, tried here and
  in the products, made both slower (3-7% and 2-15%): the hardware's streams do it. At 8
  rows and 256 positions a pass reads 50 MB of cache beside 57 MB of weights, straight from
  DRAM (``benchmarks/kernels_ab.py`` prints that floor).
- ``rows_norm(x, weight, bias, eps, rms)``: RMSNorm or LayerNorm of each row, its sums in
  the order of a dot product: eager norms cost a dozen small ops each, 33 of them a pass.
- a block for R rows (C++ only, inside ``RowsModel``): the three above and per-row loops for
  the rotation, the MLP's activation (SwiGLU's 16 at a time, over the threads) and the
  residual adds, with no Python between them: the ~30 eager ops a block cost between the
  kernels took about 0.7 ms of a 3 ms pass.
- ``RowsModel(...)``: a model's weights held once on the C++ side (the linear layers packed),
  so that a whole pass (the embedding, every block, the final norm and the head) is one call,
  ``step_tokens`` (``step`` from embedded inputs). ``decoding.forget_rows_model`` drops it
  after a model's weights change.

Built once per machine with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and
ninja; about 25 s), kept under ``RUNS/.compiled/kernels-<key>`` (the key hashes the source,
torch's version and the CPU, since it is built for this CPU's instructions); a later start
loads it in well under a second. Where it cannot be built, callers keep their plain pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <limits>
#include <vector>

namespace {

constexpr int LANES = 16;

// a . b over K floats: 16 lanes, then the lanes in order, then the tail; fixed by K alone
inline float dot(const float* __restrict a, const float* __restrict b, int64_t K) {
  float acc[LANES] = {0};
  int64_t k = 0;
  for (; k + LANES <= K; k += LANES)
    for (int j = 0; j < LANES; ++j) acc[j] += a[k + j] * b[k + j];
  float tail = 0.f;
  for (; k < K; ++k) tail += a[k] * b[k];
  float s = 0.f;
  for (int j = 0; j < LANES; ++j) s += acc[j];
  return s + tail;
}

// 16 floats, and acc + x * w for each of them rounded once (a fused multiply-add): AVX-512, two
// AVX2 halves or plain C++, the same bits on each, since an FMA's result is defined exactly
#if defined(__AVX512F__)
struct V16 {
  __m512 a;
};
inline V16 v_zero() { return {_mm512_setzero_ps()}; }
inline V16 v_load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline V16 v_fma(float x, const V16& w, const V16& acc) { return {_mm512_fmadd_ps(_mm512_set1_ps(x), w.a, acc.a)}; }
inline void v_store(float* p, const V16& v) { _mm512_storeu_ps(p, v.a); }
inline V16 v_fmav(const V16& x, const V16& w, const V16& acc) { return {_mm512_fmadd_ps(x.a, w.a, acc.a)}; }
inline V16 v_add(const V16& x, const V16& y) { return {_mm512_add_ps(x.a, y.a)}; }
inline V16 v_set(float x) { return {_mm512_set1_ps(x)}; }
inline V16 v_clamp(const V16& x, float lo, float hi) {  // max then min, as x86 orders them
  return {_mm512_min_ps(_mm512_max_ps(x.a, _mm512_set1_ps(lo)), _mm512_set1_ps(hi))};
}
inline V16 v_sub(const V16& x, const V16& y) { return {_mm512_sub_ps(x.a, y.a)}; }
inline V16 v_mul(const V16& x, const V16& y) { return {_mm512_mul_ps(x.a, y.a)}; }
inline V16 v_div(const V16& x, const V16& y) { return {_mm512_div_ps(x.a, y.a)}; }
inline V16 v_pow2(const V16& n) {  // 2^n for whole n in [-126, 127]
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.a), _mm512_set1_epi32(127)), 23))};
}
inline float v_hsum(const V16& v) {  // lanes i + (i + 8), then + 4, + 2, + 1
  const __m256 lo = _mm512_castps512_ps256(v.a);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v.a), 1));
  const __m256 s8 = _mm256_add_ps(lo, hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
constexpr int ROW_TILE = 8;  // rows a panel is read once for: 16 accumulators of 32 registers
#elif defined(__AVX2__) && defined(__FMA__)
struct V16 {
  __m256 a, b;
};
inline V16 v_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 v_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline V16 v_fma(float x, const V16& w, const V16& acc) {
  const __m256 xv = _mm256_set1_ps(x);
  return {_mm256_fmadd_ps(xv, w.a, acc.a), _mm256_fmadd_ps(xv, w.b, acc.b)};
}
inline void v_store(float* p, const V16& v) {
  _mm256_storeu_ps(p, v.a);
  _mm256_storeu_ps(p + 8, v.b);
}
inline V16 v_fmav(const V16& x, const V16& w, const V16& acc) {
  return {_mm256_fmadd_ps(x.a, w.a, acc.a), _mm256_fmadd_ps(x.b, w.b, acc.b)};
}
inline V16 v_add(const V16& x, const V16& y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
inline V16 v_set(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline V16 v_clamp(const V16& x, float lo, float hi) {
  const __m256 l = _mm256_set1_ps(lo), h = _mm256_set1_ps(hi);
  return {_mm256_min_ps(_mm256_max_ps(x.a, l), h), _mm256_min_ps(_mm256_max_ps(x.b, l), h)};
}
inline V16 v_sub(const V16& x, const V16& y) { return {_mm256_sub_ps(x.a, y.a), _mm256_sub_ps(x.b, y.b)}; }
inline V16 v_mul(const V16& x, const V16& y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
inline V16 v_div(const V16& x, const V16& y) { return {_mm256_div_ps(x.a, y.a), _mm256_div_ps(x.b, y.b)}; }
inline V16 v_pow2(const V16& n) {
  const __m256i bias = _mm256_set1_epi32(127);
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.a), bias), 23)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.b), bias), 23))};
}
inline float v_hsum(const V16& v) {
  const __m256 s8 = _mm256_add_ps(v.a, v.b);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
constexpr int ROW_TILE = 3;  // 12 accumulators of 16 registers
#else
struct V16 {
  float f[16];
};
inline V16 v_zero() { return V16{}; }
inline V16 v_load(const float* p) {
  V16 v;
  std::copy(p, p + 16, v.f);
  return v;
}
inline V16 v_fma(float x, const V16& w, const V16& acc) {
  V16 o;
  for (int j = 0; j < 16; ++j) o.f[j] = std::fma(x, w.f[j], acc.f[j]);
  return o;
}
inline void v_store(float* p, const V16& v) { std::copy(v.f, v.f + 16, p); }
inline V16 v_fmav(const V16& x, const V16& w, const V16& acc) {
  V16 o;
  for (int j = 0; j < 16; ++j) o.f[j] = std::fma(x.f[j], w.f[j], acc.f[j]);
  return o;
}
inline V16 v_add(const V16& x, const V16& y) {
  V16 o;
  for (int j = 0; j < 16; ++j) o.f[j] = x.f[j] + y.f[j];
  return o;
}
inline V16 v_set(float x) {
  V16 o;
  std::fill(o.f, o.f + 16, x);
  return o;
}
inline V16 v_clamp(const V16& x, float lo, float hi) {
  V16 o;
  for (int j = 0; j < 16; ++j) {
    const float m = x.f[j] > lo ? x.f[j] : lo;  // x86's max: the second operand where either is NaN
    o.f[j] = m < hi ? m : hi;
  }
  return o;
}
inline V16 v_sub(const V16& x, const V16& y) {
  V16 o;
  for (int j = 0; j < 16; ++j) o.f[j] = x.f[j] - y.f[j];
  return o;
}
inline V16 v_mul(const V16& x, const V16& y) {
  V16 o;
  for (int j = 0; j < 16; ++j) o.f[j] = x.f[j] * y.f[j];
  return o;
}
inline V16 v_div(const V16& x, const V16& y) {
  V16 o;
  for (int j = 0; j < 16; ++j) o.f[j] = x.f[j] / y.f[j];
  return o;
}
inline V16 v_pow2(const V16& n) {
  V16 o;
  for (int j = 0; j < 16; ++j) {
    const int32_t bits = (static_cast<int32_t>(n.f[j]) + 127) << 23;
    std::memcpy(&o.f[j], &bits, 4);
  }
  return o;
}
inline float v_hsum(const V16& v) {
  float s8[8], s4[4];
  for (int j = 0; j < 8; ++j) s8[j] = v.f[j] + v.f[j + 8];
  for (int j = 0; j < 4; ++j) s4[j] = s8[j] + s8[j + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}
constexpr int ROW_TILE = 4;
#endif

constexpr int64_t PANEL = 32;  // output columns of a packed panel: two V16

// e^x for 16 lanes, x clamped to [-87, 88]: n = round(x / ln 2) (the 1.5 * 2^23 trick, one FMA),
// r = x - n ln 2 in two parts, e^r by its Taylor series to r^7 (|r| <= 0.35: the terms left out
// are under a tenth of float's rounding), times 2^n. The same FMAs in the same order on every
// ISA, so the same bits (benchmarks/kernels_isa.py); 16 at once where glibc's expf takes one.
inline V16 v_exp(const V16& x) {
  const V16 xc = v_clamp(x, -87.f, 88.f);
  const V16 magic = v_set(12582912.f);
  const V16 n = v_sub(v_fmav(xc, v_set(1.44269504088896341f), magic), magic);
  V16 r = v_fmav(n, v_set(-0.693359375f), xc);
  r = v_fmav(n, v_set(2.12194440e-4f), r);
  V16 p = v_set(1.f / 5040.f);
  for (float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = v_fmav(p, r, v_set(c));
  return v_mul(p, v_pow2(n));
}

// q . k for C chunks of 16 floats: one FMA chain a lane, then the lanes in v_hsum's order
template <int C>
inline float dot_chunks(const float* __restrict q, const float* __restrict k) {
  V16 acc = v_zero();
  for (int c = 0; c < C; ++c) acc = v_fmav(v_load(q + 16 * c), v_load(k + 16 * c), acc);
  return v_hsum(acc);
}

// the softmax weights of positions 0..n-1 (scores in w, padded to whole 16s) turned into
// e^(score - top) in place, the padding zeroed; returns their sum, in v_hsum's order over
// per-lane sums taken in position order
inline float softmax_weights(float* w, int64_t n, float top) {
  const int64_t padded = (n + 15) / 16 * 16;
  for (int64_t s = n; s < padded; ++s) w[s] = top;
  V16 z = v_zero();
  const V16 t = v_set(top);
  for (int64_t s = 0; s < padded; s += 16) {
    v_store(w + s, v_exp(v_sub(v_load(w + s), t)));
  }
  for (int64_t s = n; s < padded; ++s) w[s] = 0.f;
  for (int64_t s = 0; s < padded; s += 16) z = v_add(z, v_load(w + s));
  return v_hsum(z);
}

// o = (sum over positions s < n of w[s] v_s) * inv, v_s at v + s * 16C, in position order, held
// in registers (the earlier loop kept the output in memory and divided every weight by the sum)
template <int C>
inline void weighted_chunks(const float* __restrict w, const float* __restrict v, int64_t n, float inv, float* o) {
  V16 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = v_zero();
  for (int64_t s = 0; s < n; ++s)
    for (int c = 0; c < C; ++c) acc[c] = v_fma(w[s], v_load(v + (s * C + c) * 16), acc[c]);
  const V16 scale = v_set(inv);
  for (int c = 0; c < C; ++c) v_store(o + 16 * c, v_mul(acc[c], scale));
}

// the scores of positions 0..n-1 (score(s) times scale) into w, then their softmax weights;
// returns 1 / their sum, or NaN where a score is NaN (e^NaN would clamp to a number: the head
// says NaN instead, as the plain pass does)
template <class Score>
inline float softmax_of(Score score, int64_t n, float scale, float* w) {
  float top = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t s = 0; s < n; ++s) {
    w[s] = score(s) * scale;
    nan |= w[s] != w[s];
    top = std::max(top, w[s]);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : 1.f / softmax_weights(w, n, top);
}

// one (row, head): scores of positions 0..n-1 against q, softmax, weighted values; C = hd / 16
template <int C>
void attend_one(const float* q, const float* keys, const float* values, int64_t n, float scale, float* w, float* o) {
  const float inv = softmax_of([&](int64_t s) { return dot_chunks<C>(q, keys + s * 16 * C); }, n, scale, w);
  if (inv != inv)
    std::fill(o, o + 16 * C, inv);
  else
    weighted_chunks<C>(w, values, n, inv, o);
}

// SwiGLU's u * silu(g) = u * g / (1 + e^-g) in place over rows of F, 16 at a time (a row's last
// partial 16 through a padded copy, so every element takes the same path wherever it sits), the
// rows' 16s split over the threads: elementwise, so the split changes no bits
void swiglu_rows(float* u, const float* g, int64_t rows, int64_t F) {
  const int64_t per_row = (F + 15) / 16;
  at::parallel_for(0, rows * per_row, 64, [&](int64_t i0, int64_t i1) {
    const V16 one = v_set(1.f), zero = v_zero();
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / per_row, c0 = (i % per_row) * 16, cols = std::min<int64_t>(16, F - c0);
      float* ur = u + r * F + c0;
      const float* gr = g + r * F + c0;
      auto swiglu = [&](float* uu, const float* gg) {
        const V16 gv = v_load(gg);
        v_store(uu, v_div(v_mul(v_load(uu), gv), v_add(one, v_exp(v_sub(zero, gv)))));
      };
      if (cols == 16) {
        swiglu(ur, gr);
      } else {
        float ub[16] = {0}, gb[16] = {0};
        std::copy(ur, ur + cols, ub);
        std::copy(gr, gr + cols, gb);
        swiglu(ub, gb);
        std::copy(ub, ub + cols, ur);
      }
    }
  });
}

// the same for a head width that is not a whole number of 16s, or is over 128: plain FMA chains
void attend_one_any(const float* q, const float* keys, const float* values, int64_t n, int64_t hd, float scale,
                    float* w, float* o) {
  const float inv = softmax_of([&](int64_t s) {
    float a = 0.f;
    for (int64_t d = 0; d < hd; ++d) a = std::fma(q[d], keys[s * hd + d], a);
    return a;
  }, n, scale, w);
  if (inv != inv) {
    std::fill(o, o + hd, inv);
    return;
  }
  for (int64_t d = 0; d < hd; ++d) {
    float a = 0.f;
    for (int64_t s = 0; s < n; ++s) a = std::fma(w[s], values[s * hd + d], a);
    o[d] = a * inv;
  }
}

// RT rows of x (R, K; row stride K) against one packed panel (K, PANEL): out (RT, PANEL). Each
// output is a chain of FMAs over k = 0..K-1 in order, from zero: the same whatever RT is.
template <int RT>
inline void panel_rows(const float* __restrict xp, int64_t K, const float* __restrict wp, float* __restrict out) {
  V16 acc[RT][2];
  for (int i = 0; i < RT; ++i) acc[i][0] = acc[i][1] = v_zero();
  for (int64_t k = 0; k < K; ++k) {
    const V16 w0 = v_load(wp + k * PANEL), w1 = v_load(wp + k * PANEL + 16);
    for (int i = 0; i < RT; ++i) {
      const float xv = xp[i * K + k];
      acc[i][0] = v_fma(xv, w0, acc[i][0]);
      acc[i][1] = v_fma(xv, w1, acc[i][1]);
    }
  }
  for (int i = 0; i < RT; ++i) {
    v_store(out + i * PANEL, acc[i][0]);
    v_store(out + i * PANEL + 16, acc[i][1]);
  }
}

template <int RT>
inline void panel_tile(int rt, const float* xp, int64_t K, const float* wp, float* out) {
  if constexpr (RT > 1) {
    if (rt < RT) return panel_tile<RT - 1>(rt, xp, K, wp, out);
  }
  panel_rows<RT>(xp, K, wp, out);
}

}  // namespace

// w (N, K) as panels of PANEL outputs, (ceil(N / PANEL), K, PANEL), the missing outputs zero: a
// panel's weights are read in one run, and a product vectorises along the outputs
torch::Tensor pack_linear(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32, "pack_linear: w (N, K) float32");
  const int64_t N = w.size(0), K = w.size(1), P = (N + PANEL - 1) / PANEL;
  auto padded = torch::zeros({P * PANEL, K}, w.options());
  padded.slice(0, 0, N).copy_(w);
  return padded.view({P, PANEL, K}).transpose(1, 2).contiguous();  // (P, K, PANEL)
}

// x (R, K) times the packed w (its first N outputs): (R, N). Threads split the panels, each
// computing whole outputs for every row; so a row's numbers depend on neither the other rows
// nor the thread count.
torch::Tensor packed_linear(torch::Tensor x, const torch::Tensor& packed, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(1) == x.size(1) && packed.size(2) == PANEL &&
              packed.size(0) * PANEL >= N, "packed_linear: x (R, K) and a packed (P, K, 32) weight");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && packed.scalar_type() == torch::kFloat32,
              "packed_linear: float32 only");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "packed_linear: CPU tensors only");
  x = x.contiguous();
  const int64_t R = x.size(0), K = x.size(1), P = packed.size(0);
  auto out = torch::empty({R, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    float tile[ROW_TILE * PANEL];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * PANEL, cols = std::min(PANEL, N - n0);
      if (cols <= 0) continue;
      for (int64_t r = 0; r < R; r += ROW_TILE) {
        const int rt = static_cast<int>(std::min<int64_t>(ROW_TILE, R - r));
        panel_tile<ROW_TILE>(rt, xp + r * K, K, wp + p * K * PANEL, tile);
        for (int i = 0; i < rt; ++i) std::copy(tile + i * PANEL, tile + i * PANEL + cols, op + (r + i) * N + n0);
      }
    }
  });
  return out;
}

// x (R, K) times w (N, K) transposed, packing w first (RowsModel packs once; this is for one-off use)
torch::Tensor rows_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "rows_linear: x (R, K) and w (N, K)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32, "rows_linear: float32 only");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rows_linear: CPU tensors only");
  return packed_linear(x, pack_linear(w.contiguous()), w.size(0));
}

torch::Tensor rows_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor keys, torch::Tensor values,
                          torch::Tensor rows, torch::Tensor positions, double scale) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes() && k.sizes() == q.sizes() &&
              v.sizes() == q.sizes(), "rows_attend: q, k, v (R, H, hd), keys and values (slots, H, ctx, hd)");
  TORCH_CHECK(k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32, "rows_attend: float32 only");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && keys.scalar_type() == torch::kFloat32 &&
              values.scalar_type() == torch::kFloat32, "rows_attend: float32 only");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "rows_attend: contiguous caches only");
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  auto rows_c = rows.to(torch::kLong).contiguous();
  auto pos_c = positions.to(torch::kLong).contiguous();
  const int64_t R = q.size(0), H = q.size(1), hd = q.size(2), slots = keys.size(0), ctx = keys.size(2);
  TORCH_CHECK(keys.size(1) == H && keys.size(3) == hd && rows_c.numel() == R && pos_c.numel() == R,
              "rows_attend: shapes disagree");
  const int64_t* rp = rows_c.data_ptr<int64_t>();
  const int64_t* pp = pos_c.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(0 <= rp[r] && rp[r] < slots && 0 <= pp[r] && pp[r] < ctx, "rows_attend: row or position out of range");
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = r + 1; j < R; ++j) TORCH_CHECK(rp[r] != rp[j], "rows_attend: a row twice");
  auto out = torch::empty({R, H, hd}, q.options());
  const float* qp = q.data_ptr<float>();
  float* kp = keys.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  const float* knew = k.data_ptr<float>();
  const float* vnew = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, R * H, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> w((ctx + 15) / 16 * 16);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = b / H, h = b % H, last = pp[r];
      float* kr = kp + (rp[r] * H + h) * ctx * hd;
      float* vr = vp + (rp[r] * H + h) * ctx * hd;
      std::copy(knew + b * hd, knew + (b + 1) * hd, kr + last * hd);  // the new position's key and value
      std::copy(vnew + b * hd, vnew + (b + 1) * hd, vr + last * hd);
      const float* qr = qp + b * hd;
      float* o = op + b * hd;
      switch (hd) {
        case 16: attend_one<1>(qr, kr, vr, last + 1, sc, w.data(), o); break;
        case 32: attend_one<2>(qr, kr, vr, last + 1, sc, w.data(), o); break;
        case 48: attend_one<3>(qr, kr, vr, last + 1, sc, w.data(), o); break;
        case 64: attend_one<4>(qr, kr, vr, last + 1, sc, w.data(), o); break;
        case 96: attend_one<6>(qr, kr, vr, last + 1, sc, w.data(), o); break;
        case 128: attend_one<8>(qr, kr, vr, last + 1, sc, w.data(), o); break;
        default: attend_one_any(qr, kr, vr, last + 1, hd, sc, w.data(), o);
      }
    }
  });
  return out;
}

// RMSNorm (bias undefined, rms true) or LayerNorm of each row of x (M, D), times weight (and
// plus bias): each row's sums in dot()'s order, so a row's numbers depend on the row alone
torch::Tensor rows_norm(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, double eps,
                        bool rms) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "rows_norm: x (M, D), weight (D,)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32, "rows_norm: float32 only");
  x = x.contiguous();
  auto w = weight.contiguous();
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  const int64_t M = x.size(0), D = x.size(1);
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> c(D);
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = xp + m * D;
      float mean = 0.f;
      if (!rms) {
        float acc[LANES] = {0};
        int64_t k = 0;
        for (; k + LANES <= D; k += LANES)
          for (int j = 0; j < LANES; ++j) acc[j] += row[k + j];
        float tail = 0.f;
        for (; k < D; ++k) tail += row[k];
        float s = 0.f;
        for (int j = 0; j < LANES; ++j) s += acc[j];
        mean = (s + tail) / static_cast<float>(D);
      }
      for (int64_t d = 0; d < D; ++d) c[d] = row[d] - mean;
      const float inv = 1.f / std::sqrt(dot(c.data(), c.data(), D) / static_cast<float>(D) + e);
      float* o = op + m * D;
      for (int64_t d = 0; d < D; ++d) o[d] = c[d] * inv * wp[d] + (bp ? bp[d] : 0.f);
    }
  });
  return out;
}

namespace {

torch::Tensor plus_bias(torch::Tensor y, const c10::optional<torch::Tensor>& b) {
  if (b.has_value() && b->defined()) y.add_(*b);
  return y;
}

}  // namespace

// One block of the model for R rows, with no Python between its pieces: the norm, the q/k/v
// projection, QK-norm (qn_w and kn_w given: RMSNorm with eps qk_eps), the rotation by each
// row's cos and sin (R, hd) (given: rotary positions), attention over the row's own cache
// (rows_attend: the new key and value written first), the output projection and residual,
// the second norm, the MLP (mlp_kind 0: exact GELU, 1: ReLU squared, 2: SwiGLU with gate_w)
// and its residual. Returns the new residual stream (R, D). Every piece is per row, so a
// row's numbers depend on that row alone, as the kernels it is made of promise.
// A weight packed once (pack_linear) and its real output count
struct Lin {
  torch::Tensor packed;
  int64_t N = 0;
  Lin() = default;
  explicit Lin(const torch::Tensor& w)
      : packed(w.numel() ? pack_linear(w.contiguous()) : torch::Tensor()), N(w.numel() ? w.size(0) : 0) {}
  bool defined() const { return packed.defined(); }
  torch::Tensor operator()(const torch::Tensor& x) const { return packed_linear(x, packed, N); }
};

torch::Tensor rows_block(torch::Tensor x, const torch::Tensor& ln1_w, c10::optional<torch::Tensor> ln1_b, double ln1_eps,
                         const Lin& qkv_w, c10::optional<torch::Tensor> qkv_b,
                         c10::optional<torch::Tensor> qn_w, c10::optional<torch::Tensor> kn_w, double qk_eps,
                         c10::optional<torch::Tensor> cos, c10::optional<torch::Tensor> sin,
                         torch::Tensor keys, torch::Tensor values, torch::Tensor rows, torch::Tensor positions,
                         double scale, const Lin& proj_w, c10::optional<torch::Tensor> proj_b,
                         const torch::Tensor& ln2_w, c10::optional<torch::Tensor> ln2_b, double ln2_eps,
                         const Lin& up_w, c10::optional<torch::Tensor> up_b,
                         const Lin& gate_w, c10::optional<torch::Tensor> gate_b,
                         const Lin& down_w, c10::optional<torch::Tensor> down_b, int64_t mlp_kind, bool rms) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "rows_block: x (R, D) float32");
  const int64_t R = x.size(0), D = x.size(1), H = keys.size(1), hd = keys.size(3);
  TORCH_CHECK(H * hd == D, "rows_block: the cache's heads do not make the width");
  auto qkv = plus_bias(qkv_w(rows_norm(x, ln1_w, ln1_b, ln1_eps, rms)), qkv_b).view({R, 3, H, hd});
  auto q = qkv.select(1, 0).contiguous(), k = qkv.select(1, 1).contiguous(), v = qkv.select(1, 2).contiguous();
  if (qn_w.has_value() && qn_w->defined()) {
    q = rows_norm(q.view({R * H, hd}), *qn_w, c10::nullopt, qk_eps, true).view({R, H, hd});
    k = rows_norm(k.view({R * H, hd}), *kn_w, c10::nullopt, qk_eps, true).view({R, H, hd});
  }
  if (cos.has_value() && cos->defined()) {  // pairs (i, i + hd/2), as model.rotate turns them
    auto c = cos->contiguous(), s = sin->contiguous();
    TORCH_CHECK(c.size(0) == R && c.size(1) == hd && s.sizes() == c.sizes(), "rows_block: cos and sin (R, hd)");
    const float* cp = c.data_ptr<float>();
    const float* sp = s.data_ptr<float>();
    const int64_t half = hd / 2;
    for (auto* t : {&q, &k}) {
      auto turned = torch::empty_like(*t);
      const float* tp = t->data_ptr<float>();
      float* op = turned.data_ptr<float>();
      for (int64_t r = 0; r < R; ++r)
        for (int64_t h = 0; h < H; ++h) {
          const float* row = tp + (r * H + h) * hd;
          float* o = op + (r * H + h) * hd;
          const float* cr = cp + r * hd;
          const float* sr = sp + r * hd;
          for (int64_t d = 0; d < hd; ++d) {
            const float other = d < half ? -row[d + half] : row[d - half];
            o[d] = row[d] * cr[d] + other * sr[d];
          }
        }
      *t = turned;
    }
  }
  auto y = rows_attend(q, k, v, keys, values, rows, positions, scale);  // (R, H, hd)
  x = x + plus_bias(proj_w(y.view({R, D})), proj_b);
  auto h = rows_norm(x, ln2_w, ln2_b, ln2_eps, rms);
  auto up = plus_bias(up_w(h), up_b);
  float* u = up.data_ptr<float>();
  const int64_t n = up.numel();
  if (mlp_kind == 2) {
    TORCH_CHECK(gate_w.defined(), "rows_block: SwiGLU needs its gate");
    auto gate = plus_bias(gate_w(h), gate_b);
    swiglu_rows(u, gate.data_ptr<float>(), R, up.size(1));
  } else if (mlp_kind == 1) {
    for (int64_t i = 0; i < n; ++i) u[i] = u[i] > 0.f ? u[i] * u[i] : 0.f;
  } else {
    for (int64_t i = 0; i < n; ++i) u[i] = 0.5f * u[i] * (1.f + std::erf(u[i] * 0.70710678118654752f));
  }
  return x + plus_bias(down_w(up), down_b);
}

// A model's weights held once, so a whole pass is one call: per block (in order) ln1_w, ln1_b,
// qkv_w, qkv_b, qn_w, kn_w, proj_w, proj_b, ln2_w, ln2_b, up_w, up_b, gate_w, gate_b, down_w,
// down_b, an empty tensor where the model has none; then the final norm and the head.
struct RowsModel {
  std::vector<std::vector<torch::Tensor>> blocks;
  std::vector<std::array<Lin, 5>> lins;  // per block, packed: qkv, proj, up, gate, down
  Lin head;
  std::vector<double> eps;  // per block: ln1, qk, ln2
  torch::Tensor lnf_w, lnf_b, head_w;
  double lnf_eps, scale;
  int64_t mlp_kind;
  bool rms;

  RowsModel(std::vector<std::vector<torch::Tensor>> blocks_, std::vector<double> eps_, torch::Tensor lnf_w_,
            torch::Tensor lnf_b_, double lnf_eps_, torch::Tensor head_w_, double scale_, int64_t mlp_kind_, bool rms_)
      : blocks(std::move(blocks_)), eps(std::move(eps_)), lnf_w(lnf_w_), lnf_b(lnf_b_), head_w(head_w_),
        lnf_eps(lnf_eps_), scale(scale_), mlp_kind(mlp_kind_), rms(rms_) {
    TORCH_CHECK(eps.size() == 3 * blocks.size(), "RowsModel: three epsilons a block");
    for (const auto& b : blocks) {
      TORCH_CHECK(b.size() == 16, "RowsModel: sixteen tensors a block");
      lins.push_back({Lin(b[2]), Lin(b[6]), Lin(b[10]), Lin(b[12]), Lin(b[14])});
    }
    head = Lin(head_w);
  }

  // the embedding, so a pass can start from token ids: the token table, the pair table (empty
  // where the model has none; row (before * V + token) % pair_rows), the learned positions'
  // table (empty: rotary or none) and the rotary cos and sin tables (empty: learned)
  torch::Tensor tok_w, pair_w, pos_w, cos_t, sin_t;
  int64_t vocab = 0, pair_rows = 0;

  void set_embedding(torch::Tensor tok, torch::Tensor pair, torch::Tensor pos, torch::Tensor c, torch::Tensor s,
                     int64_t V, int64_t P) {
    TORCH_CHECK(tok.dim() == 2 && tok.scalar_type() == torch::kFloat32, "RowsModel: a float32 token table");
    tok_w = tok.contiguous();
    pair_w = pair.contiguous();
    pos_w = pos.contiguous();
    cos_t = c.contiguous();
    sin_t = s.contiguous();
    vocab = V;
    pair_rows = P;
  }

  // tokens, before (the token at each row's previous position; V: none) and positions (R,):
  // the rows' logits, their inputs embedded here as GPT.embed does (the same additions in the
  // same order), then step()
  torch::Tensor step_tokens(torch::Tensor tokens, torch::Tensor before, torch::Tensor rows, torch::Tensor positions,
                            torch::Tensor keys, torch::Tensor values) const {
    TORCH_CHECK(tok_w.defined(), "RowsModel: set_embedding first");
    auto t = tokens.to(torch::kLong).contiguous(), b = before.to(torch::kLong).contiguous();
    auto p = positions.to(torch::kLong).contiguous();
    const int64_t R = t.numel(), D = tok_w.size(1);
    TORCH_CHECK(b.numel() == R && p.numel() == R, "RowsModel: tokens, before and positions (R,)");
    const int64_t* tp = t.data_ptr<int64_t>();
    const int64_t* bp = b.data_ptr<int64_t>();
    const int64_t* pp = p.data_ptr<int64_t>();
    auto x = torch::empty({R, D}, tok_w.options());
    float* xp = x.data_ptr<float>();
    const bool pair = pair_w.numel() > 0, learned = pos_w.numel() > 0, rotary = cos_t.numel() > 0;
    for (int64_t r = 0; r < R; ++r) {
      TORCH_CHECK(0 <= tp[r] && tp[r] < tok_w.size(0) && 0 <= bp[r] && bp[r] <= vocab, "RowsModel: a token out of range");
      TORCH_CHECK(0 <= pp[r] && (!learned || pp[r] < pos_w.size(0)) && (!rotary || pp[r] < cos_t.size(0)),
                  "RowsModel: a position out of range");
      float* xr = xp + r * D;
      const float* e = tok_w.data_ptr<float>() + tp[r] * D;
      std::copy(e, e + D, xr);
      if (pair) {
        const float* q = pair_w.data_ptr<float>() + ((bp[r] * vocab + tp[r]) % pair_rows) * D;
        for (int64_t d = 0; d < D; ++d) xr[d] = xr[d] + q[d];
      }
      if (learned) {
        const float* q = pos_w.data_ptr<float>() + pp[r] * D;
        for (int64_t d = 0; d < D; ++d) xr[d] = xr[d] + q[d];
      }
    }
    torch::Tensor c = cos_t, s = sin_t;
    if (rotary) {
      c = cos_t.index_select(0, p);
      s = sin_t.index_select(0, p);
    }
    return step(x, c, s, keys, values, rows, positions);
  }

  static c10::optional<torch::Tensor> opt(const torch::Tensor& t) {
    return t.numel() ? c10::optional<torch::Tensor>(t) : c10::nullopt;
  }

  // x (R, D): the rows' embedded tokens; cos and sin (R, hd), empty without rotary positions;
  // keys and values (L, slots, H, ctx, hd). Returns the logits (R, V), before any softcap.
  torch::Tensor step(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor keys, torch::Tensor values,
                     torch::Tensor rows, torch::Tensor positions) const {
    TORCH_CHECK(keys.size(0) == static_cast<int64_t>(blocks.size()), "RowsModel: one cache layer a block");
    for (size_t i = 0; i < blocks.size(); ++i) {
      const auto& b = blocks[i];
      const auto& l = lins[i];
      x = rows_block(x, b[0], opt(b[1]), eps[3 * i], l[0], opt(b[3]), opt(b[4]), opt(b[5]), eps[3 * i + 1], opt(cos),
                     opt(sin), keys[i], values[i], rows, positions, scale, l[1], opt(b[7]), b[8], opt(b[9]),
                     eps[3 * i + 2], l[2], opt(b[11]), l[3], opt(b[13]), l[4], opt(b[15]), mlp_kind, rms);
    }
    return head(rows_norm(x, lnf_w, opt(lnf_b), lnf_eps, rms));
  }
};

// how many threads at::parallel_for spreads 64 items over: 1 where the build ignored its OpenMP
int64_t parallel_width() {
  std::array<int64_t, 64> tid{};
  at::parallel_for(0, 64, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) tid[i] = at::get_thread_num();
  });
  std::sort(tid.begin(), tid.end());
  return std::unique(tid.begin(), tid.end()) - tid.begin();
}

// the GIL is let go while a kernel runs: the server's event loop (another thread) goes on
// sending what the last tick made while this one computes
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_width", &parallel_width);
  m.def("rows_linear", &rows_linear, py::call_guard<py::gil_scoped_release>());
  m.def("pack_linear", &pack_linear);
  m.def("packed_linear", &packed_linear, py::call_guard<py::gil_scoped_release>());
  m.def("rows_attend", &rows_attend, py::call_guard<py::gil_scoped_release>());
  m.def("rows_norm", &rows_norm, py::call_guard<py::gil_scoped_release>());
  py::class_<RowsModel>(m, "RowsModel", py::module_local())  // local: two builds in one process may both hold one
      .def(py::init<std::vector<std::vector<torch::Tensor>>, std::vector<double>, torch::Tensor, torch::Tensor, double,
                    torch::Tensor, double, int64_t, bool>())
      .def("set_embedding", &RowsModel::set_embedding)
      .def("step", &RowsModel::step, py::call_guard<py::gil_scoped_release>())
      .def("step_tokens", &RowsModel::step_tokens, py::call_guard<py::gil_scoped_release>());
}
"""


def openmp_runtime() -> Path | None:
    """The OpenMP library torch's own kernels run on in this process (libgomp, Intel's or
    LLVM's), read from the loaded libraries; None where there is none or it cannot be told."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = Path(line.split(maxsplit=5)[-1]) if "/" in line else None
        if path is not None and path.name.startswith(("libgomp", "libiomp5", "libomp")) and ".so" in path.name:
            return path
    return None


def build_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags. ``at::parallel_for`` is OpenMP written inline in ATen's headers:
    built without ``-fopenmp`` its pragma is ignored and every kernel runs on one thread (as
    they did until 2026-12-03: 1 row's products read 18 GB/s at 1 or 2 threads, against 40
    for a plain read at 2). With it, the build links the very library torch runs on, so one
    pool of threads and one ``torch.set_num_threads`` serve both."""
    flags = ["-O3", "-march=native"]
    runtime = openmp_runtime()
    if runtime is None:
        return flags, []
    return flags + ["-fopenmp"], [str(runtime), f"-Wl,-rpath,{runtime.parent}"]


def kernels_dir(root: Path, flags: tuple[list[str], list[str]] | None = None) -> Path:
    """Where this source, built for this CPU and torch (with these flags), is kept under ``root``."""
    from trainlab.engine.precision import cpu_identity

    cflags, ldflags = flags if flags is not None else build_flags()
    key = hashlib.sha256("\n".join([SOURCE, torch.__version__, cpu_identity(), " ".join(cflags),
                                     " ".join(ldflags)]).encode()).hexdigest()[:16]
    return root / f"kernels-{key}"


def _find_ninja() -> None:
    """torch builds with ninja from PATH; the ``ninja`` package's binary sits in this Python's
    environment, which need not be on PATH (``.venv/bin/python`` run directly)."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # noqa: PLC0415

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


@contextlib.contextmanager
def _building(folder: Path) -> Iterator[None]:
    """Held around a build: one process at a time builds or loads ``folder``. torch's own lock
    (a ``lock`` file it removes when done) outlives a build that was killed, and every later
    start then waited on it forever; this lock (``filelock``, which the system frees when its
    holder dies) is held by no one else here, so a ``lock`` file found under it is such a
    leftover and is removed."""
    from filelock import FileLock

    with FileLock(str(folder) + ".lock"):
        (folder / "lock").unlink(missing_ok=True)
        yield


def load_kernels(root: Path) -> tuple[ModuleType | None, str]:
    """The built kernels (built now if this machine has none yet) and one line on what was
    done; (None, why) where they cannot be built. A damaged build folder is wiped and built
    again once, never trusted; where the build with torch's OpenMP fails (a compiler whose
    OpenMP calls that library lacks, say), they are built for one thread instead."""
    import time

    from torch.utils.cpp_extension import load_inline

    flags = build_flags()
    variants = [(flags, "threads shared with torch" if flags[1] else
                 "one thread: no OpenMP runtime found beside torch")]
    if flags[1]:
        variants.append(((flags[0][:-1], []), "one thread: the build with torch's OpenMP failed"))
    _find_ninja()
    t0 = time.perf_counter()
    why = "no build tried"
    for (cflags, ldflags), threads in variants:
        folder = kernels_dir(root, (cflags, ldflags))
        for attempt in (1, 2):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                # the real path: ninja keys a build by its command, source path included, so the same
                # folder reached through a link was built again (62-85 s on a 2-core AVX2 EPYC)
                folder = folder.resolve()
                with _building(folder):
                    module = load_inline(name=f"trainlab_rows_{folder.name[8:]}", cpp_sources=[SOURCE],
                                         extra_cflags=cflags, extra_ldflags=ldflags, build_directory=str(folder),
                                         verbose=False)
                return module, f"row kernels ready in {time.perf_counter() - t0:.1f} s ({folder}; {threads})"
            except Exception as e:  # noqa: BLE001 (no compiler, no ninja, a damaged build: the plain pass serves)
                why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                if attempt == 1 and folder.exists():
                    shutil.rmtree(folder, ignore_errors=True)
                    continue
                break
    return None, f"row kernels unavailable ({why})"
