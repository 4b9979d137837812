#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// Region code: plane 0 holds bit (x > 0), plane 1 bit (x > top) of element i at byte i / 8, bit i % 8.
// Work is split into blocks of 64 elements so no two threads ever write the same code byte.
static constexpr int64_t BLOCK = 64;

template <typename T, typename C>
static inline void fwd_one(const T* x, T* y, uint8_t* pos, uint8_t* above, int64_t i, C a, C top, C levels,
                           bool nearest) {
  C v = static_cast<C>(x[i]);
  C k = nearest ? std::nearbyint(v / a) : std::ceil(v / a);
  k = k < C(0) ? C(0) : k;  // NaN stays NaN: both comparisons are false
  k = k > levels ? levels : k;
  C out = std::isinf(v) ? v : k * a;
  y[i] = static_cast<T>(out);
  uint8_t bit = uint8_t(1u << (i & 7));
  if (v > C(0)) pos[i >> 3] |= bit;
  if (v > top) above[i >> 3] |= bit;
}

template <typename T, typename C>
static void fwd_range(const T* x, T* y, uint8_t* pos, uint8_t* above, int64_t begin, int64_t end, C a, C top,
                      C levels, bool nearest) {
  int64_t i = begin;
  if constexpr (std::is_same<T, float>::value) {
#if defined(__AVX512F__)
    const __m512 va = _mm512_set1_ps(a), vtop = _mm512_set1_ps(top), vl = _mm512_set1_ps(levels);
    const __m512 zero = _mm512_setzero_ps(), inf = _mm512_set1_ps(INFINITY);
    for (; i + 16 <= end; i += 16) {
      __m512 v = _mm512_loadu_ps(x + i);
      __m512 q = _mm512_div_ps(v, va);
      __m512 k = nearest ? _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                         : _mm512_roundscale_ps(q, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
      k = _mm512_mask_mov_ps(k, _mm512_cmp_ps_mask(k, zero, _CMP_LT_OQ), zero);
      k = _mm512_mask_mov_ps(k, _mm512_cmp_ps_mask(k, vl, _CMP_GT_OQ), vl);
      __m512 out = _mm512_mul_ps(k, va);
      out = _mm512_mask_mov_ps(out, _mm512_cmp_ps_mask(_mm512_abs_ps(v), inf, _CMP_EQ_OQ), v);
      _mm512_storeu_ps(y + i, out);
      uint16_t p = _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), t = _mm512_cmp_ps_mask(v, vtop, _CMP_GT_OQ);
      std::memcpy(pos + (i >> 3), &p, 2);
      std::memcpy(above + (i >> 3), &t, 2);
    }
#elif defined(__AVX2__)
    const __m256 va = _mm256_set1_ps(a), vtop = _mm256_set1_ps(top), vl = _mm256_set1_ps(levels);
    const __m256 zero = _mm256_setzero_ps(), inf = _mm256_set1_ps(INFINITY);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (; i + 8 <= end; i += 8) {
      __m256 v = _mm256_loadu_ps(x + i);
      __m256 q = _mm256_div_ps(v, va);
      __m256 k = nearest ? _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                         : _mm256_round_ps(q, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
      k = _mm256_blendv_ps(k, zero, _mm256_cmp_ps(k, zero, _CMP_LT_OQ));
      k = _mm256_blendv_ps(k, vl, _mm256_cmp_ps(k, vl, _CMP_GT_OQ));
      __m256 out = _mm256_mul_ps(k, va);
      out = _mm256_blendv_ps(out, v, _mm256_cmp_ps(_mm256_and_ps(v, absmask), inf, _CMP_EQ_OQ));
      _mm256_storeu_ps(y + i, out);
      pos[i >> 3] = uint8_t(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ)));
      above[i >> 3] = uint8_t(_mm256_movemask_ps(_mm256_cmp_ps(v, vtop, _CMP_GT_OQ)));
    }
#endif
  }
  // Tail (and every other dtype): the code bytes still to be written start at zero.
  if (i < end) {
    std::memset(pos + (i >> 3), 0, ((end + 7) >> 3) - (i >> 3));
    std::memset(above + (i >> 3), 0, ((end + 7) >> 3) - (i >> 3));
  }
  for (; i < end; ++i) fwd_one<T, C>(x, y, pos, above, i, a, top, levels, nearest);
}

template <typename T, typename C>
static void forward_impl(const at::Tensor& x, at::Tensor& y, at::Tensor& code, double a_, double levels_,
                         bool nearest) {
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t n = x.numel(), nbytes = code.size(1);
  uint8_t* pos = code.data_ptr<uint8_t>();
  uint8_t* above = pos + nbytes;
  const C a = static_cast<C>(a_), levels = static_cast<C>(levels_);
  const C top = a * levels;
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
  at::parallel_for(0, blocks, 2048, [&](int64_t b0, int64_t b1) {
    fwd_range<T, C>(xp, yp, pos, above, b0 * BLOCK, std::min(b1 * BLOCK, n), a, top, levels, nearest);
  });
}

// x: dense (any strides without overlap or gaps); y is allocated with the same strides.
std::vector<at::Tensor> qrelu_forward(const at::Tensor& x, const at::Tensor& alpha, int64_t levels,
                                      bool nearest) {
  TORCH_CHECK(x.device().is_cpu() && x.is_non_overlapping_and_dense(), "qrelu_forward: dense CPU tensor");
  at::Tensor y = at::empty_like(x);
  const int64_t nbytes = (x.numel() + 7) / 8;
  at::Tensor code = at::empty({2, nbytes}, x.options().dtype(at::kByte));
  if (x.numel() == 0) return {y, code};
  const double a = alpha.item<double>();  // a CPU scalar: a plain memory read
  switch (x.scalar_type()) {
    case at::kFloat: forward_impl<float, float>(x, y, code, a, double(levels), nearest); break;
    case at::kDouble: forward_impl<double, double>(x, y, code, a, double(levels), nearest); break;
    case at::kHalf: forward_impl<c10::Half, float>(x, y, code, a, double(levels), nearest); break;
    case at::kBFloat16: forward_impl<c10::BFloat16, float>(x, y, code, a, double(levels), nearest); break;
    default: TORCH_CHECK(false, "qrelu_forward: unsupported dtype ", x.scalar_type());
  }
  return {y, code};
}

template <typename T, typename C>
static void backward_range(const T* g, T* gx, const uint8_t* pos, const uint8_t* above, int64_t begin,
                           int64_t end, C m0, C m1, C m2, bool want_gx, double* s_in, double* s_above) {
  int64_t i = begin;
  double acc_in = 0.0, acc_above = 0.0;
  if constexpr (std::is_same<T, float>::value) {
#if defined(__AVX512F__)
    const __m512 v0 = _mm512_set1_ps(m0), v1 = _mm512_set1_ps(m1), v2 = _mm512_set1_ps(m2);
    while (i + 16 <= end) {
      __m512 a_in = _mm512_setzero_ps(), a_ab = _mm512_setzero_ps();
      const int64_t stop = std::min(end, i + 1024);  // a float partial sum over at most 64 lanes-steps
      for (; i + 16 <= stop; i += 16) {
        __m512 gv = _mm512_loadu_ps(g + i);
        uint16_t p, t;
        std::memcpy(&p, pos + (i >> 3), 2);
        std::memcpy(&t, above + (i >> 3), 2);
        if (want_gx) {
          __m512 m = _mm512_mask_mov_ps(_mm512_mask_mov_ps(v0, p, v1), t, v2);
          _mm512_storeu_ps(gx + i, _mm512_mul_ps(gv, m));
        }
        a_in = _mm512_mask_add_ps(a_in, __mmask16(p & ~t), a_in, gv);
        a_ab = _mm512_mask_add_ps(a_ab, __mmask16(t), a_ab, gv);
      }
      acc_in += _mm512_reduce_add_ps(a_in);
      acc_above += _mm512_reduce_add_ps(a_ab);
    }
#endif
  }
  for (; i < end; ++i) {
    const bool p = (pos[i >> 3] >> (i & 7)) & 1, t = (above[i >> 3] >> (i & 7)) & 1;
    const C gv = static_cast<C>(g[i]);
    if (want_gx) gx[i] = static_cast<T>(gv * (t ? m2 : (p ? m1 : m0)));
    if (t) acc_above += double(gv);
    else if (p) acc_in += double(gv);
  }
  *s_in += acc_in;
  *s_above += acc_above;
}

template <typename T, typename C>
static void backward_impl(const at::Tensor& g, at::Tensor& gx, const at::Tensor& code, double m0, double m1,
                          double m2, bool want_gx, bool want_sums, double* sums) {
  const T* gp = g.data_ptr<T>();
  T* gxp = want_gx ? gx.data_ptr<T>() : nullptr;
  const int64_t n = g.numel(), nbytes = code.size(1);
  const uint8_t* pos = code.data_ptr<uint8_t>();
  const uint8_t* above = pos + nbytes;
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
  const int threads = at::get_num_threads();
  std::vector<double> part(2 * 8 * (threads + 1), 0.0);  // 8 doubles apart: no false sharing
  at::parallel_for(0, blocks, 2048, [&](int64_t b0, int64_t b1) {
    const int t = std::min(at::get_thread_num(), threads);
    backward_range<T, C>(gp, gxp, pos, above, b0 * BLOCK, std::min(b1 * BLOCK, n), C(m0), C(m1), C(m2),
                         want_gx, &part[16 * t], &part[16 * t + 8]);
  });
  if (want_sums) {
    double s_in = 0.0, s_above = 0.0;
    for (int t = 0; t <= threads; ++t) {
      s_in += part[16 * t];
      s_above += part[16 * t + 8];
    }
    sums[0] = s_in;
    sums[1] = s_above;
  }
}

// grad: same shape and strides as the forward input. Returns grad_x (grad * multiplier of the region:
// m0 for x <= 0, m1 inside, m2 above top; undefined unless want_gx) and, as float64, the sums of grad over
// the inside and the above region (for the alpha gradient).
std::vector<at::Tensor> qrelu_backward(const at::Tensor& g, const at::Tensor& code, double m0, double m1,
                                       double m2, bool want_gx, bool want_sums) {
  TORCH_CHECK(g.device().is_cpu() && g.is_non_overlapping_and_dense(), "qrelu_backward: dense CPU tensor");
  at::Tensor gx = want_gx ? at::empty_like(g) : at::Tensor();
  at::Tensor sums = at::zeros({2}, g.options().dtype(at::kDouble));
  if (g.numel() == 0) return {want_gx ? gx : sums.new_empty({0}), sums};
  double* local_t = sums.data_ptr<double>();
  switch (g.scalar_type()) {
    case at::kFloat: backward_impl<float, float>(g, gx, code, m0, m1, m2, want_gx, want_sums, local_t); break;
    case at::kDouble: backward_impl<double, double>(g, gx, code, m0, m1, m2, want_gx, want_sums, local_t); break;
    case at::kHalf: backward_impl<c10::Half, float>(g, gx, code, m0, m1, m2, want_gx, want_sums, local_t); break;
    case at::kBFloat16:
      backward_impl<c10::BFloat16, float>(g, gx, code, m0, m1, m2, want_gx, want_sums, local_t);
      break;
    default: TORCH_CHECK(false, "qrelu_backward: unsupported dtype ", g.scalar_type());
  }
  return {want_gx ? gx : sums.new_empty({0}), sums};
}

// ---------------------------------------------------------------------------------- binary weights

// mean |w| of a contiguous tensor, accumulated in double, returned in w's dtype (0-dim).
at::Tensor abs_mean(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous(), "abs_mean: contiguous CPU tensor");
  const int64_t n = w.numel();
  const int threads = at::get_num_threads();
  std::vector<double> part(8 * (threads + 1), 0.0);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "abs_mean", [&] {
    const scalar_t* p = w.data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t b, int64_t e) {
      double acc = 0.0;
      int64_t i = b;
      // 16 independent lanes (vectorizable without reassociation), flushed to double every 4096 elements
      for (; i + 16 <= e;) {
        scalar_t lane[16] = {0};
        const int64_t stop = i + std::min<int64_t>((e - i) / 16, 256) * 16;
        for (; i < stop; i += 16)
          for (int j = 0; j < 16; ++j) lane[j] += std::abs(p[i + j]);
        for (int j = 0; j < 16; ++j) acc += double(lane[j]);
      }
      for (; i < e; ++i) acc += double(std::abs(p[i]));
      part[8 * std::min(at::get_thread_num(), threads)] += acc;
    });
  });
  double total = 0.0;
  for (int t = 0; t <= threads; ++t) total += part[8 * t];
  return at::scalar_tensor(n ? total / double(n) : std::nan(""), w.options());
}

// sign(w) * scale in one pass into q, with torch.sign's sign(0) = sign(NaN) = 0.
at::Tensor sign_scale_out(const at::Tensor& w, const at::Tensor& scale, at::Tensor q) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous(), "sign_scale: contiguous CPU tensor");
  TORCH_CHECK(q.is_contiguous() && q.sizes() == w.sizes() && q.scalar_type() == w.scalar_type(),
              "sign_scale_out: out must be a contiguous tensor of w's shape and dtype");
  const int64_t n = w.numel();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "sign_scale", [&] {
    const scalar_t* p = w.data_ptr<scalar_t>();
    scalar_t* out = q.data_ptr<scalar_t>();
    // sign(w) * s is one of s, -s and 0 * s (torch.sign(NaN) is 0 too): selects vectorize, products less so
    const scalar_t s = scale.item<scalar_t>(), ns = -s, zs = scalar_t(0) * s;
    at::parallel_for(0, n, 32768, [&](int64_t b, int64_t e) {
      int64_t i = b;
      if constexpr (std::is_same<scalar_t, float>::value) {
#if defined(__AVX512F__)
        const __m512 vs = _mm512_set1_ps(s), vns = _mm512_set1_ps(ns), vzs = _mm512_set1_ps(zs);
        const __m512 zero = _mm512_setzero_ps();
        for (; i + 16 <= e; i += 16) {
          const __m512 v = _mm512_loadu_ps(p + i);
          __m512 o = _mm512_mask_mov_ps(vzs, _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), vs);
          o = _mm512_mask_mov_ps(o, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), vns);
          _mm512_storeu_ps(out + i, o);
        }
#elif defined(__AVX2__)
        const __m256 vs = _mm256_set1_ps(s), vns = _mm256_set1_ps(ns), vzs = _mm256_set1_ps(zs);
        const __m256 zero = _mm256_setzero_ps();
        for (; i + 8 <= e; i += 8) {
          const __m256 v = _mm256_loadu_ps(reinterpret_cast<const float*>(p + i));
          __m256 o = _mm256_blendv_ps(vzs, vs, _mm256_cmp_ps(v, zero, _CMP_GT_OQ));
          o = _mm256_blendv_ps(o, vns, _mm256_cmp_ps(v, zero, _CMP_LT_OQ));
          _mm256_storeu_ps(reinterpret_cast<float*>(out + i), o);
        }
#endif
      }
      for (; i < e; ++i) {
        const scalar_t v = p[i];
        out[i] = v > scalar_t(0) ? s : (v < scalar_t(0) ? ns : zs);
      }
    });
  });
  return q;
}

at::Tensor sign_scale(const at::Tensor& w, const at::Tensor& scale) {
  return sign_scale_out(w, scale, at::empty_like(w));
}

// BCGD19 blend for binary weights, in place: w <- w * (1 - rho) + (sign(w) * mean|w|) * rho, in exactly the
// order of operations (and the float32 rounding) of latent.mul_(1 - rho).add_(q * rho).
// scale: mean|w| when the caller has it already (the forward computed it for this same w), else computed.
at::Tensor binary_blend_(at::Tensor w, double rho, const c10::optional<at::Tensor>& known_scale) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous(), "binary_blend_: contiguous CPU tensor");
  const at::Tensor scale = known_scale.has_value() ? *known_scale : abs_mean(w);
  const int64_t n = w.numel();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "binary_blend_", [&] {
    scalar_t* p = w.data_ptr<scalar_t>();
    const scalar_t s = scale.item<scalar_t>(), zs = scalar_t(0) * s;
    const scalar_t keep = scalar_t(1.0 - rho), r = scalar_t(rho);
    const scalar_t up = s * r, down = (-s) * r, zero = zs * r;
    at::parallel_for(0, n, 32768, [=](int64_t b, int64_t e) {
      int64_t i = b;
      if constexpr (std::is_same<scalar_t, float>::value) {
#if defined(__AVX512F__)
        const __m512 vup = _mm512_set1_ps(up), vdown = _mm512_set1_ps(down), vzero = _mm512_set1_ps(zero);
        const __m512 vkeep = _mm512_set1_ps(keep), z = _mm512_setzero_ps();
        for (; i + 16 <= e; i += 16) {
          const __m512 v = _mm512_loadu_ps(p + i);
          __m512 qr = _mm512_mask_mov_ps(vzero, _mm512_cmp_ps_mask(v, z, _CMP_GT_OQ), vup);
          qr = _mm512_mask_mov_ps(qr, _mm512_cmp_ps_mask(v, z, _CMP_LT_OQ), vdown);
          _mm512_storeu_ps(p + i, _mm512_add_ps(_mm512_mul_ps(v, vkeep), qr));
        }
#elif defined(__AVX2__)
        const __m256 vup = _mm256_set1_ps(up), vdown = _mm256_set1_ps(down), vzero = _mm256_set1_ps(zero);
        const __m256 vkeep = _mm256_set1_ps(keep), z = _mm256_setzero_ps();
        for (; i + 8 <= e; i += 8) {
          const __m256 v = _mm256_loadu_ps(reinterpret_cast<const float*>(p + i));
          __m256 qr = _mm256_blendv_ps(vzero, vup, _mm256_cmp_ps(v, z, _CMP_GT_OQ));
          qr = _mm256_blendv_ps(qr, vdown, _mm256_cmp_ps(v, z, _CMP_LT_OQ));
          _mm256_storeu_ps(reinterpret_cast<float*>(p + i), _mm256_add_ps(_mm256_mul_ps(v, vkeep), qr));
        }
#endif
      }
      for (; i < e; ++i) {
        const scalar_t v = p[i];
        const scalar_t qr = v > scalar_t(0) ? up : (v < scalar_t(0) ? down : zero);
        p[i] = v * keep + qr;
      }
    });
  });
  return w;
}

TORCH_LIBRARY(lightning_ste_kernels, m) {
  m.def("binary_blend_(Tensor(a!) w, float rho, Tensor? scale=None) -> Tensor(a!)");
  m.def("abs_mean(Tensor w) -> Tensor");
  m.def("sign_scale(Tensor w, Tensor scale) -> Tensor");
  m.def("sign_scale_out(Tensor w, Tensor scale, Tensor(a!) out) -> Tensor(a!)");
  m.def("qrelu_forward(Tensor x, Tensor alpha, int levels, bool nearest) -> Tensor[]");
  m.def("qrelu_backward(Tensor g, Tensor code, float m0, float m1, float m2, bool want_gx, bool want_sums) -> Tensor[]");
}

// CPU kernels (not CompositeImplicit), so torch.compile can take fake implementations and call them opaquely.
TORCH_LIBRARY_IMPL(lightning_ste_kernels, CPU, m) {
  m.impl("binary_blend_", &binary_blend_);
  m.impl("abs_mean", &abs_mean);
  m.impl("sign_scale", &sign_scale);
  m.impl("sign_scale_out", &sign_scale_out);
  m.impl("qrelu_forward", &qrelu_forward);
  m.impl("qrelu_backward", &qrelu_backward);
}
