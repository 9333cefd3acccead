"""Small C++ kernels for decoding several rows at once, each row's numbers depending on
nothing but the row: not on how many rows share the pass, nor on the thread count.

Why C++. A served stream must get the same text alone and among others (``chat serve``'s
guarantee). MKL's products round a row differently with the row count and the threads, so
the server ran every pass over a fixed 8 rows: one stream paid for eight. Inductor's
compiled products (``decoding.rowwise_linear``) keep a row's order alone, but inside a
whole pass of several rows it laid the products out feature-major and vectorised across
the rows, and the bits changed with the row count (results/decoding/README.md). Here the
order is written down:

- ``rows_linear(x, w)``: ``x`` (R, K) times ``w`` (N, K) transposed. Each output is one dot
  product, summed in 16 lanes over K and the lanes then added in order: an order fixed by K
  alone. The weights are split among threads by output, so a thread computes whole dot
  products. Rows go four at a time against one weight row, read once for all of them; a
  row in a block of four is summed in the very order of a row alone. (Blocks of four weight
  rows by four rows, tried written plainly and with GCC's vector types, ran 1.5-1.9x slower
  here at 4 and 8 rows, bits unchanged: the products of several rows stay compute-bound, and
  a better blocking is still to find.)
- ``rows_attend(q, k, v, keys, values, rows, positions, scale)``: writes each row's new key
  and value at its position in its cache row, then its query attends to positions
  0..positions[r]: scores, softmax and the weighted sum of values, each in position order,
  one (row, head) per thread at a time.
- ``rows_norm(x, weight, bias, eps, rms)``: RMSNorm or LayerNorm of each row, its sums in
  the order of a dot product: eager norms cost a dozen small ops each, 33 of them a pass.
- ``rows_block(...)``: a whole block from the three above and per-row loops for the rotation,
  the MLP's activation and the residual adds, with no Python between them: the ~30 eager ops
  a block cost between the kernels took about 0.7 ms of a 3 ms pass (results/decoding/).
- ``RowsModel(...)``: a model's weights held once on the C++ side, so that a whole pass (every
  block, the final norm and the head) is one call, ``step``: no per-block argument passing.

Built once per machine with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and
ninja; about 25 s), kept under ``RUNS/.compiled/kernels-<key>`` (the key hashes the source,
torch's version and the CPU, since it is built for this CPU's instructions); a later start
loads it in well under a second. Where it cannot be built, callers keep their plain pass.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
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

// four rows of x against one weight row w, each row summed exactly as dot() sums it;
// out[i * stride] receives row i's sum
inline void dot4(const float* __restrict w, const float* __restrict x, int64_t K, float* out, int64_t stride) {
  float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
  const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;
  int64_t k = 0;
  for (; k + LANES <= K; k += LANES)
    for (int j = 0; j < LANES; ++j) {
      const float wv = w[k + j];
      a0[j] += wv * x0[k + j];
      a1[j] += wv * x1[k + j];
      a2[j] += wv * x2[k + j];
      a3[j] += wv * x3[k + j];
    }
  float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;
  for (; k < K; ++k) {
    t0 += w[k] * x0[k];
    t1 += w[k] * x1[k];
    t2 += w[k] * x2[k];
    t3 += w[k] * x3[k];
  }
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  for (int j = 0; j < LANES; ++j) {
    s0 += a0[j];
    s1 += a1[j];
    s2 += a2[j];
    s3 += a3[j];
  }
  out[0] = s0 + t0;
  out[stride] = s1 + t1;
  out[2 * stride] = s2 + t2;
  out[3 * stride] = s3 + t3;
}

}  // namespace

torch::Tensor rows_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "rows_linear: x (R, K) and w (N, K)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32, "rows_linear: float32 only");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rows_linear: CPU tensors only");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
  auto out = torch::empty({R, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      int64_t r = 0;
      for (; r + 4 <= R; r += 4) dot4(wp + n * K, xp + r * K, K, op + r * N + n, N);
      for (; r < R; ++r) op[r * N + n] = dot(wp + n * K, xp + r * K, K);
    }
  });
  return out;
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
  auto out = torch::zeros({R, H, hd}, q.options());
  const float* qp = q.data_ptr<float>();
  float* kp = keys.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  const float* knew = k.data_ptr<float>();
  const float* vnew = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, R * H, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> w(ctx);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = b / H, h = b % H, last = pp[r];
      const float* qr = qp + b * hd;
      float* kr = kp + (rp[r] * H + h) * ctx * hd;
      float* vr = vp + (rp[r] * H + h) * ctx * hd;
      std::copy(knew + b * hd, knew + (b + 1) * hd, kr + last * hd);  // the new position's key and value
      std::copy(vnew + b * hd, vnew + (b + 1) * hd, vr + last * hd);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s <= last; ++s) {
        w[s] = dot(qr, kr + s * hd, hd) * sc;
        top = std::max(top, w[s]);
      }
      float z = 0.f;
      for (int64_t s = 0; s <= last; ++s) {
        w[s] = std::exp(w[s] - top);
        z += w[s];
      }
      float* o = op + b * hd;
      for (int64_t s = 0; s <= last; ++s) {
        const float ws = w[s] / z;
        const float* v = vr + s * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] += ws * v[d];
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
torch::Tensor rows_block(torch::Tensor x, torch::Tensor ln1_w, c10::optional<torch::Tensor> ln1_b, double ln1_eps,
                         torch::Tensor qkv_w, c10::optional<torch::Tensor> qkv_b,
                         c10::optional<torch::Tensor> qn_w, c10::optional<torch::Tensor> kn_w, double qk_eps,
                         c10::optional<torch::Tensor> cos, c10::optional<torch::Tensor> sin,
                         torch::Tensor keys, torch::Tensor values, torch::Tensor rows, torch::Tensor positions,
                         double scale, torch::Tensor proj_w, c10::optional<torch::Tensor> proj_b,
                         torch::Tensor ln2_w, c10::optional<torch::Tensor> ln2_b, double ln2_eps,
                         torch::Tensor up_w, c10::optional<torch::Tensor> up_b,
                         c10::optional<torch::Tensor> gate_w, c10::optional<torch::Tensor> gate_b,
                         torch::Tensor down_w, c10::optional<torch::Tensor> down_b, int64_t mlp_kind, bool rms) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "rows_block: x (R, D) float32");
  const int64_t R = x.size(0), D = x.size(1), H = keys.size(1), hd = keys.size(3);
  TORCH_CHECK(H * hd == D, "rows_block: the cache's heads do not make the width");
  auto qkv = plus_bias(rows_linear(rows_norm(x, ln1_w, ln1_b, ln1_eps, rms), qkv_w), qkv_b).view({R, 3, H, hd});
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
  x = x + plus_bias(rows_linear(y.view({R, D}), proj_w), proj_b);
  auto h = rows_norm(x, ln2_w, ln2_b, ln2_eps, rms);
  auto up = plus_bias(rows_linear(h, up_w), up_b);
  float* u = up.data_ptr<float>();
  const int64_t n = up.numel();
  if (mlp_kind == 2) {
    TORCH_CHECK(gate_w.has_value() && gate_w->defined(), "rows_block: SwiGLU needs its gate");
    auto gate = plus_bias(rows_linear(h, *gate_w), gate_b);
    const float* g = gate.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) u[i] *= g[i] / (1.f + std::exp(-g[i]));
  } else if (mlp_kind == 1) {
    for (int64_t i = 0; i < n; ++i) u[i] = u[i] > 0.f ? u[i] * u[i] : 0.f;
  } else {
    for (int64_t i = 0; i < n; ++i) u[i] = 0.5f * u[i] * (1.f + std::erf(u[i] * 0.70710678118654752f));
  }
  return x + plus_bias(rows_linear(up, down_w), down_b);
}

// A model's weights held once, so a whole pass is one call: per block (in order) ln1_w, ln1_b,
// qkv_w, qkv_b, qn_w, kn_w, proj_w, proj_b, ln2_w, ln2_b, up_w, up_b, gate_w, gate_b, down_w,
// down_b, an empty tensor where the model has none; then the final norm and the head.
struct RowsModel {
  std::vector<std::vector<torch::Tensor>> blocks;
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
    for (const auto& b : blocks) TORCH_CHECK(b.size() == 16, "RowsModel: sixteen tensors a block");
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
      x = rows_block(x, b[0], opt(b[1]), eps[3 * i], b[2], opt(b[3]), opt(b[4]), opt(b[5]), eps[3 * i + 1], opt(cos),
                     opt(sin), keys[i], values[i], rows, positions, scale, b[6], opt(b[7]), b[8], opt(b[9]),
                     eps[3 * i + 2], b[10], opt(b[11]), opt(b[12]), opt(b[13]), b[14], opt(b[15]), mlp_kind, rms);
    }
    return rows_linear(rows_norm(x, lnf_w, opt(lnf_b), lnf_eps, rms), head_w);
  }
};

// the GIL is let go while a kernel runs: the server's event loop (another thread) goes on
// sending what the last tick made while this one computes
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rows_linear", &rows_linear, py::call_guard<py::gil_scoped_release>());
  m.def("rows_attend", &rows_attend, py::call_guard<py::gil_scoped_release>());
  m.def("rows_norm", &rows_norm, py::call_guard<py::gil_scoped_release>());
  m.def("rows_block", &rows_block, py::call_guard<py::gil_scoped_release>());
  py::class_<RowsModel>(m, "RowsModel", py::module_local())  // local: two builds in one process may both hold one
      .def(py::init<std::vector<std::vector<torch::Tensor>>, std::vector<double>, torch::Tensor, torch::Tensor, double,
                    torch::Tensor, double, int64_t, bool>())
      .def("step", &RowsModel::step, py::call_guard<py::gil_scoped_release>());
}
"""


def kernels_dir(root: Path) -> Path:
    """Where this source, built for this CPU and torch, is kept under ``root``."""
    from trainlab.engine.precision import cpu_identity

    key = hashlib.sha256("\n".join([SOURCE, torch.__version__, cpu_identity()]).encode()).hexdigest()[:16]
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


def load_kernels(root: Path) -> tuple[ModuleType | None, str]:
    """The built kernels (built now if this machine has none yet) and one line on what was
    done; (None, why) where they cannot be built. A damaged build folder is wiped and built
    again once, never trusted."""
    import time

    from torch.utils.cpp_extension import load_inline

    folder = kernels_dir(root)
    _find_ninja()
    t0 = time.perf_counter()
    for attempt in (1, 2):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            module = load_inline(name=f"trainlab_rows_{folder.name[8:]}", cpp_sources=[SOURCE],
                                 extra_cflags=["-O3", "-march=native"], build_directory=str(folder), verbose=False)
            return module, f"row kernels ready in {time.perf_counter() - t0:.1f} s ({folder})"
        except Exception as e:  # noqa: BLE001 (no compiler, no ninja, a damaged build: the plain pass serves)
            if attempt == 1 and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
                continue
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            return None, f"row kernels unavailable ({why})"
    return None, "row kernels unavailable"
