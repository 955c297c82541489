// Fused LPIPS distance step on the CPU: forward and backward kernels.
//
// Per image and pixel p, with x, y the C-vectors of the two feature maps:
//   a = sqrt(sum_c x_c^2) + eps,  b = sqrt(sum_c y_c^2) + eps   (eps outside the sqrt)
//   d = sum_c w_c (x_c / a - y_c / b)^2
// and the (N,) spatial mean or the (N,1,H,W) map of d. The backward gives
//   dx_k =  g (r_k / a - x_k (sum_c r_c x_c) / (a^2 |x|)),  r_c = 2 w_c (x_c/a - y_c/b)
//   dy_k = -g (r_k / b - y_k (sum_c r_c y_c) / (b^2 |y|))
//   dw_c = sum over pixels of g (x_c/a - y_c/b)^2
// with dx = 0 at pixels where |x| = 0 (and dy = 0 where |y| = 0).
//
// Work is split into fixed tiles of PB columns x all C channels, a column being one pixel of one
// image (the flattened index n * H * W + p, so that layers with few pixels still give long
// vectorisable rows). A tile is read from memory once (any strides: NCHW, channels_last, a
// stride-0 broadcast batch) into a local [C][PB] buffer in the accumulation type (fp32, fp64 for
// fp64), then every pass runs over that cache-resident buffer. Channel sums run in chunks of 32
// channels (error grows slowly in C). Tiles do not depend on the thread count, and every
// cross-tile sum (spatial mean in fp64, weight gradient) runs in a fixed order afterwards, so
// results are bitwise repeatable and independent of the number of threads.
//
// The ops are internal (`lpips_fast::_distance_fwd_cpu`, `lpips_fast::_distance_bwd_cpu`); the
// public op, its fake kernel and its autograd live in lpips_fast/ops/__init__.py.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace lpips_fast {
namespace {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

constexpr int64_t kTileElems = 8192;  // C * PB per tensor: 32 KiB of fp32 per buffer (L1/L2)
constexpr int64_t kChunk = 32;        // channels summed before folding into the total (accuracy)

// GCC's loop distribution would turn the tile copies into one memmove call per channel row,
// which costs more than the copy itself for the short rows of small layers: keep them as loops.
#if defined(__GNUC__) && !defined(__clang__)
#define LPIPS_NO_MEMCPY_IDIOM __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define LPIPS_NO_MEMCPY_IDIOM
#endif

// A (N, C, P) view of an (N, C, H, W) tensor with H and W walked as one pixel dimension.
struct Geo {
  int64_t sn, sc, sp;
};

// Stride of the flattened pixel dimension, or -1 when H and W cannot be walked as one.
int64_t pixel_stride(const at::Tensor& t) {
  const int64_t H = t.size(2), W = t.size(3);
  if (H * W <= 1) return 1;
  if (H == 1) return t.stride(3);
  if (W == 1) return t.stride(2);
  if (t.stride(2) == W * t.stride(3)) return t.stride(3);
  return -1;
}

at::Tensor walkable(const at::Tensor& t, Geo& g) {
  at::Tensor u = pixel_stride(t) < 0 ? t.contiguous() : t;
  g = Geo{u.size(0) > 1 ? u.stride(0) : 0, u.stride(1), pixel_stride(u)};
  return u;
}

// Columns per tile: the flattened (image, pixel) index q = n * P + p is cut into fixed tiles of
// this many columns, so that layers with few pixels still give long, vectorisable rows.
int64_t tile_columns(int64_t C, int64_t NP) {
  int64_t pb = std::max<int64_t>(1, kTileElems / std::max<int64_t>(C, 1));
  pb = std::min<int64_t>(std::max<int64_t>(pb, 32), 256);  // rows of 32..256 columns
  if (pb >= 8) pb -= pb % 8;
  return std::max<int64_t>(1, std::min(pb, NP));
}

// Gradient layout rule, mirrored by the fake kernel: channels_last when the channel stride is 1.
at::MemoryFormat grad_format(const at::Tensor& t) {
  return (t.size(1) > 1 && t.stride(1) == 1) ? at::MemoryFormat::ChannelsLast
                                             : at::MemoryFormat::Contiguous;
}

// Copies `len` pixels of one image (base points at the first) into columns col0.. of buf [C][pb].
template <typename scalar_t, typename acc_t>
LPIPS_NO_MEMCPY_IDIOM void load_run(const scalar_t* base, const Geo& g, int64_t C, int64_t len, acc_t* buf, int64_t pb, int64_t col0) {
  if (g.sc == 1 && g.sp != 1) {  // channels_last: each pixel's C-vector is contiguous
    for (int64_t p = 0; p < len; ++p) {
      const scalar_t* src = base + p * g.sp;
      acc_t* dst = buf + col0 + p;
      for (int64_t c = 0; c < C; ++c) dst[c * pb] = static_cast<acc_t>(src[c]);
    }
  } else if (g.sp == 1) {  // NCHW: pixels contiguous within a channel
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* src = base + c * g.sc;
      acc_t* dst = buf + c * pb + col0;
      for (int64_t p = 0; p < len; ++p) dst[p] = static_cast<acc_t>(src[p]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < len; ++p) buf[c * pb + col0 + p] = static_cast<acc_t>(base[c * g.sc + p * g.sp]);
  }
}

template <typename scalar_t, typename acc_t>
LPIPS_NO_MEMCPY_IDIOM void store_run(scalar_t* base, const Geo& g, int64_t C, int64_t len, const acc_t* buf, int64_t pb, int64_t col0) {
  if (g.sc == 1 && g.sp != 1) {
    for (int64_t p = 0; p < len; ++p) {
      scalar_t* dst = base + p * g.sp;
      const acc_t* src = buf + col0 + p;
      for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(src[c * pb]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < len; ++p)
        base[c * g.sc + p * g.sp] = static_cast<scalar_t>(buf[c * pb + col0 + p]);
  }
}

// NCHW rows: copies one channel row of a run and adds its squares to tmp (one pass, restrict).
template <typename scalar_t, typename acc_t>
LPIPS_NO_MEMCPY_IDIOM void copy_row_sq(const scalar_t* __restrict__ src, acc_t* __restrict__ dst, acc_t* __restrict__ tmp, int64_t len) {
  for (int64_t p = 0; p < len; ++p) {
    const acc_t v = static_cast<acc_t>(src[p]);
    dst[p] = v;
    tmp[p] += v * v;
  }
}

// load_run that also writes sum_c v^2 per column into sq (same chunked order as sum_squares, so
// bitwise the same), saving a pass over the tile. Only for NCHW runs; returns false (and only
// loads) for other layouts, after which the caller runs sum_squares.
template <typename scalar_t, typename acc_t>
LPIPS_NO_MEMCPY_IDIOM bool load_run_sq(const scalar_t* base, const Geo& g, int64_t C, int64_t len, acc_t* buf, int64_t pb, int64_t col0,
                 acc_t* sq, acc_t* tmp) {
  if (g.sp != 1) {
    load_run(base, g, C, len, buf, pb, col0);
    return false;
  }
  for (int64_t p = 0; p < len; ++p) sq[col0 + p] = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t c1 = std::min(C, c0 + kChunk);
    for (int64_t p = 0; p < len; ++p) tmp[p] = 0;
    for (int64_t c = c0; c < c1; ++c) copy_row_sq(base + c * g.sc, buf + c * pb + col0, tmp, len);
    for (int64_t p = 0; p < len; ++p) sq[col0 + p] += tmp[p];
  }
  return true;
}

// channels_last forward, one pixel at a time: its two C-vectors are contiguous, so both passes
// (norms, then the weighted distance) are reductions over c in kLanes interleaved lanes (four
// independent 8-wide vectors: vectorised, short dependency chains, fixed order), and the second
// pass reads the vectors from L1. No tile buffer.
constexpr int kLanes = 32;

template <typename acc_t>
acc_t lanes_total(const acc_t* l) {
  acc_t t[8];
  for (int j = 0; j < 8; ++j) t[j] = (l[j] + l[j + 8]) + (l[j + 16] + l[j + 24]);
  return ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
}

template <typename scalar_t, typename acc_t>
void cl_sum_squares(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t C, acc_t& sx, acc_t& sy) {
  acc_t lx[kLanes] = {}, ly[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const acc_t a = static_cast<acc_t>(x[c + j]), b = static_cast<acc_t>(y[c + j]);
      lx[j] += a * a;
      ly[j] += b * b;
    }
  for (int j = 0; c < C; ++c, ++j) {
    const acc_t a = static_cast<acc_t>(x[c]), b = static_cast<acc_t>(y[c]);
    lx[j] += a * a;
    ly[j] += b * b;
  }
  sx = lanes_total(lx);
  sy = lanes_total(ly);
}

template <typename scalar_t, typename acc_t>
acc_t cl_weighted_sq_diff(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                          const acc_t* __restrict__ wv, int64_t C, acc_t ia, acc_t ib) {
  acc_t l[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const acc_t diff = static_cast<acc_t>(x[c + j]) * ia - static_cast<acc_t>(y[c + j]) * ib;
      l[j] += wv[c + j] * (diff * diff);
    }
  for (int j = 0; c < C; ++c, ++j) {
    const acc_t diff = static_cast<acc_t>(x[c]) * ia - static_cast<acc_t>(y[c]) * ib;
    l[j] += wv[c] * (diff * diff);
  }
  return lanes_total(l);
}

// Calls f(n, p, col, len) for each run of one image's pixels inside tile columns [q0, q0 + pb).
template <typename F>
void for_each_run(int64_t q0, int64_t pb, int64_t P, F&& f) {
  int64_t col = 0;
  while (col < pb) {
    const int64_t q = q0 + col, n = q / P, p = q % P;
    const int64_t len = std::min(pb - col, P - p);
    f(n, p, col, len);
    col += len;
  }
}

// sum_c buf[c][p]^2 per pixel, in chunks of kChunk channels so that the error grows slowly in C.
template <typename acc_t>
void sum_squares(const acc_t* __restrict__ buf, int64_t C, int64_t pb, acc_t* __restrict__ out,
                 acc_t* __restrict__ tmp) {
  for (int64_t p = 0; p < pb; ++p) out[p] = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t c1 = std::min(C, c0 + kChunk);
    for (int64_t p = 0; p < pb; ++p) tmp[p] = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t* __restrict__ row = buf + c * pb;
      for (int64_t p = 0; p < pb; ++p) tmp[p] += row[p] * row[p];
    }
    for (int64_t p = 0; p < pb; ++p) out[p] += tmp[p];
  }
}

// d[p] = sum_c w_c (x[c][p] ia[p] - y[c][p] ib[p])^2, chunked like sum_squares.
template <typename acc_t>
void weighted_sq_diff(const acc_t* __restrict__ bx, const acc_t* __restrict__ by, const acc_t* __restrict__ wv,
                      const acc_t* __restrict__ ia, const acc_t* __restrict__ ib, int64_t C, int64_t pb,
                      acc_t* __restrict__ d, acc_t* __restrict__ tmp) {
  for (int64_t p = 0; p < pb; ++p) d[p] = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t c1 = std::min(C, c0 + kChunk);
    for (int64_t p = 0; p < pb; ++p) tmp[p] = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t* __restrict__ rx = bx + c * pb;
      const acc_t* __restrict__ ry = by + c * pb;
      const acc_t wc = wv[c];
      for (int64_t p = 0; p < pb; ++p) {
        const acc_t diff = rx[p] * ia[p] - ry[p] * ib[p];
        tmp[p] += wc * (diff * diff);
      }
    }
    for (int64_t p = 0; p < pb; ++p) d[p] += tmp[p];
  }
}

// Sum of v[0..n) in 8 interleaved lanes (vectorisable without reassociation flags; fixed order).
template <typename out_t, typename acc_t>
out_t lane_sum(const acc_t* __restrict__ v, int64_t n) {
  out_t lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += v[i + j];
  for (int j = 0; i < n; ++i, ++j) lane[j] += v[i];
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

// Backward pass 1 over one channel row: dot products with r = w2 (x ia - y ib), and the
// per-pixel weight-gradient terms g (x ia - y ib)^2 into e.
template <typename acc_t>
void bwd_row_dots(const acc_t* __restrict__ rx, const acc_t* __restrict__ ry, acc_t w2, const acc_t* __restrict__ ia,
                  const acc_t* __restrict__ ib, const acc_t* __restrict__ g, int64_t pb, acc_t* __restrict__ dotx,
                  acc_t* __restrict__ doty, acc_t* __restrict__ e) {
  for (int64_t p = 0; p < pb; ++p) {
    const acc_t diff = rx[p] * ia[p] - ry[p] * ib[p];
    const acc_t r = w2 * diff;
    dotx[p] += r * rx[p];
    doty[p] += r * ry[p];
    e[p] = g[p] * (diff * diff);
  }
}

// Backward pass 2 over one channel row, in place: x row -> dx row, y row -> dy row.
// gx, gy are g masked to 0 where |x| = 0 (resp. |y| = 0); cx, cy the per-pixel coefficients.
template <typename acc_t>
void bwd_row_grads(acc_t* __restrict__ rx, acc_t* __restrict__ ry, acc_t w2, const acc_t* __restrict__ ia,
                   const acc_t* __restrict__ ib, const acc_t* __restrict__ gx, const acc_t* __restrict__ gy,
                   const acc_t* __restrict__ cx, const acc_t* __restrict__ cy, int64_t pb) {
  for (int64_t p = 0; p < pb; ++p) {
    const acc_t r = w2 * (rx[p] * ia[p] - ry[p] * ib[p]);
    const acc_t dx = gx[p] * (r * ia[p] - rx[p] * cx[p]);
    const acc_t dy = gy[p] * (ry[p] * cy[p] - r * ib[p]);
    rx[p] = dx;
    ry[p] = dy;
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& w) {
  TORCH_CHECK(x.dim() == 4 && y.dim() == 4, "lpips_fast: feat0 and feat1 must be 4-D (N,C,H,W)");
  TORCH_CHECK(x.sizes() == y.sizes(), "lpips_fast: feat0 ", x.sizes(), " and feat1 ", y.sizes(),
              " must have the same shape (expand a broadcast batch first)");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "lpips_fast: feat0 and feat1 dtypes differ");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "lpips_fast: CPU kernel got a non-CPU tensor");
  if (w.has_value()) {
    TORCH_CHECK(w->dim() == 1 && w->size(0) == x.size(1), "lpips_fast: weight must have shape (C,)");
    TORCH_CHECK(w->device().is_cpu(), "lpips_fast: weight must be on the CPU");
  }
}

template <typename acc_t>
std::vector<acc_t> weight_vector(const c10::optional<at::Tensor>& w, int64_t C) {
  std::vector<acc_t> out(C, acc_t(1));
  if (w.has_value()) {
    at::Tensor wc = w->to(std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat).contiguous();
    const acc_t* src = wc.data_ptr<acc_t>();
    std::copy(src, src + C, out.begin());
  }
  return out;
}

at::Tensor distance_fwd_cpu(const at::Tensor& feat0, const at::Tensor& feat1,
                            const c10::optional<at::Tensor>& weight, bool spatial, double eps) {
  check_inputs(feat0, feat1, weight);
  Geo gx, gy;
  const at::Tensor x = walkable(feat0, gx);
  const at::Tensor y = walkable(feat1, gy);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W;
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = spatial ? at::empty({N, 1, H, W}, x.options().dtype(acc_dtype))
                           : at::empty({N}, x.options().dtype(acc_dtype));
  if (N == 0) return out;
  if (P == 0) return spatial ? out : out.fill_(NAN);
  const int64_t NP = N * P;
  const int64_t PB = tile_columns(C, NP);
  const int64_t tasks = (NP + PB - 1) / PB;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lpips_distance_fwd_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const std::vector<acc_t> wv = weight_vector<acc_t>(weight, C);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    // The per-pixel map: the output itself when spatial, else a scratch (N*P, 1/C of a feature).
    std::vector<acc_t> scratch(spatial ? 0 : NP);
    acc_t* dmap = spatial ? out.data_ptr<acc_t>() : scratch.data();
    const acc_t e = static_cast<acc_t>(eps);
    // Both inputs channels_last (channel stride 1, pixels apart): the per-pixel direct path.
    const bool cl_direct = C > 1 && gx.sc == 1 && gy.sc == 1 && gx.sp != 1 && gy.sp != 1;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C * PB, 1));
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      if (cl_direct) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t q0 = t * PB, pb = std::min(PB, NP - q0);
          for_each_run(q0, pb, P, [&](int64_t n, int64_t p, int64_t col, int64_t len) {
            for (int64_t j = 0; j < len; ++j) {
              const scalar_t* px = xp + n * gx.sn + (p + j) * gx.sp;
              const scalar_t* py = yp + n * gy.sn + (p + j) * gy.sp;
              acc_t sxx, syy;
              cl_sum_squares(px, py, C, sxx, syy);
              const acc_t ia = acc_t(1) / (std::sqrt(sxx) + e), ib = acc_t(1) / (std::sqrt(syy) + e);
              dmap[q0 + col + j] = cl_weighted_sq_diff(px, py, wv.data(), C, ia, ib);
            }
          });
        }
        return;
      }
      std::vector<acc_t> bx(C * PB), by(C * PB), sx(PB), sy(PB), tmp(PB);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t q0 = t * PB, pb = std::min(PB, NP - q0);
        bool sx_done = true, sy_done = true;
        for_each_run(q0, pb, P, [&](int64_t n, int64_t p, int64_t col, int64_t len) {
          sx_done &= load_run_sq(xp + n * gx.sn + p * gx.sp, gx, C, len, bx.data(), pb, col, sx.data(), tmp.data());
          sy_done &= load_run_sq(yp + n * gy.sn + p * gy.sp, gy, C, len, by.data(), pb, col, sy.data(), tmp.data());
        });
        if (!sx_done) sum_squares(bx.data(), C, pb, sx.data(), tmp.data());
        if (!sy_done) sum_squares(by.data(), C, pb, sy.data(), tmp.data());
        for (int64_t p = 0; p < pb; ++p) {
          sx[p] = acc_t(1) / (std::sqrt(sx[p]) + e);  // now 1/a
          sy[p] = acc_t(1) / (std::sqrt(sy[p]) + e);  // now 1/b
        }
        weighted_sq_diff(bx.data(), by.data(), wv.data(), sx.data(), sy.data(), C, pb, dmap + q0, tmp.data());
      }
    });
    if (!spatial) {
      acc_t* op = out.data_ptr<acc_t>();
      for (int64_t n = 0; n < N; ++n)
        op[n] = static_cast<acc_t>(lane_sum<double>(dmap + n * P, P) / static_cast<double>(P));
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distance_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& feat0, const at::Tensor& feat1,
    const c10::optional<at::Tensor>& weight, bool spatial, double eps, bool need_x, bool need_y,
    bool need_w) {
  check_inputs(feat0, feat1, weight);
  need_w = need_w && weight.has_value();
  Geo gx, gy;
  const at::Tensor x = walkable(feat0, gx);
  const at::Tensor y = walkable(feat1, gy);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W;
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(spatial ? (grad_in.dim() == 4 && grad_in.size(0) == N && grad_in.size(1) == 1 &&
                         grad_in.size(2) == H && grad_in.size(3) == W)
                      : (grad_in.dim() == 1 && grad_in.size(0) == N),
              "lpips_fast: grad has shape ", grad_in.sizes(), ", which does not match the output");
  // The incoming gradient in the accumulation dtype, walked as (N, P).
  at::Tensor grad = grad_in.to(acc_dtype);
  int64_t g_sn = 0, g_sp = 0;
  if (spatial) {
    Geo gg;
    grad = walkable(grad, gg);
    g_sn = N > 1 ? gg.sn : 0;
    g_sp = gg.sp;
  } else {
    g_sn = grad.stride(0);
  }
  at::Tensor dx = need_x ? at::empty(feat0.sizes(), feat0.options().memory_format(grad_format(feat0)))
                         : at::empty({0}, feat0.options());
  at::Tensor dy = need_y ? at::empty(feat1.sizes(), feat1.options().memory_format(grad_format(feat1)))
                         : at::empty({0}, feat1.options());
  at::Tensor dw = need_w ? at::empty({C}, weight->options()) : at::empty({0}, feat0.options());
  if (N * P == 0 || !(need_x || need_y || need_w)) {
    if (need_x) dx.zero_();
    if (need_y) dy.zero_();
    if (need_w) dw.zero_();
    return {dx, dy, dw};
  }
  Geo gdx{0, 0, 0}, gdy{0, 0, 0};
  if (need_x) gdx = Geo{dx.stride(0), dx.stride(1), pixel_stride(dx)};
  if (need_y) gdy = Geo{dy.stride(0), dy.stride(1), pixel_stride(dy)};
  const int64_t NP = N * P;
  const int64_t PB = tile_columns(C, NP);
  const int64_t tasks = (NP + PB - 1) / PB;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lpips_distance_bwd_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const std::vector<acc_t> wv = weight_vector<acc_t>(weight, C);
    std::vector<acc_t> dw_part(need_w ? tasks * C : 0);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* dxp = need_x ? dx.data_ptr<scalar_t>() : nullptr;
    scalar_t* dyp = need_y ? dy.data_ptr<scalar_t>() : nullptr;
    const acc_t* gp = grad.data_ptr<acc_t>();
    const acc_t e = static_cast<acc_t>(eps);
    const acc_t inv_p = static_cast<acc_t>(1.0 / static_cast<double>(P));
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C * PB, 1));
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> bx(C * PB), by(C * PB), nx(PB), ny(PB), ia(PB), ib(PB), tmp(PB), g(PB),
          dotx(PB), doty(PB);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t q0 = t * PB, pb = std::min(PB, NP - q0);
        bool nx_done = true, ny_done = true;
        for_each_run(q0, pb, P, [&](int64_t n, int64_t p, int64_t col, int64_t len) {
          nx_done &= load_run_sq(xp + n * gx.sn + p * gx.sp, gx, C, len, bx.data(), pb, col, nx.data(), tmp.data());
          ny_done &= load_run_sq(yp + n * gy.sn + p * gy.sp, gy, C, len, by.data(), pb, col, ny.data(), tmp.data());
          for (int64_t j = 0; j < len; ++j)
            g[col + j] = spatial ? gp[n * g_sn + (p + j) * g_sp] : gp[n * g_sn] * inv_p;
        });
        if (!nx_done) sum_squares(bx.data(), C, pb, nx.data(), tmp.data());
        if (!ny_done) sum_squares(by.data(), C, pb, ny.data(), tmp.data());
        for (int64_t p = 0; p < pb; ++p) {
          nx[p] = std::sqrt(nx[p]);
          ny[p] = std::sqrt(ny[p]);
          ia[p] = acc_t(1) / (nx[p] + e);
          ib[p] = acc_t(1) / (ny[p] + e);
          dotx[p] = 0;
          doty[p] = 0;
        }
        // Pass over the tile: sum_c r_c x_c, sum_c r_c y_c, and the weight-gradient partials.
        for (int64_t c = 0; c < C; ++c) {
          bwd_row_dots(bx.data() + c * pb, by.data() + c * pb, acc_t(2) * wv[c], ia.data(), ib.data(), g.data(), pb,
                       dotx.data(), doty.data(), tmp.data());
          if (need_w) dw_part[t * C + c] = lane_sum<acc_t>(tmp.data(), pb);
        }
        if (!(need_x || need_y)) continue;
        // Per-pixel coefficients; pixels with a zero feature vector get a zero gradient.
        for (int64_t p = 0; p < pb; ++p) {
          const bool ax = nx[p] > 0, ay = ny[p] > 0;
          dotx[p] = ax ? dotx[p] * ia[p] * ia[p] / nx[p] : acc_t(0);
          doty[p] = ay ? doty[p] * ib[p] * ib[p] / ny[p] : acc_t(0);
          nx[p] = ax ? g[p] : acc_t(0);  // now g masked by |x| > 0
          ny[p] = ay ? g[p] : acc_t(0);  // now g masked by |y| > 0
        }
        // Overwrite the buffers in place with dx and dy, then store them.
        for (int64_t c = 0; c < C; ++c)
          bwd_row_grads(bx.data() + c * pb, by.data() + c * pb, acc_t(2) * wv[c], ia.data(), ib.data(), nx.data(),
                        ny.data(), dotx.data(), doty.data(), pb);
        for_each_run(q0, pb, P, [&](int64_t n, int64_t p, int64_t col, int64_t len) {
          if (need_x) store_run(dxp + n * gdx.sn + p * gdx.sp, gdx, C, len, bx.data(), pb, col);
          if (need_y) store_run(dyp + n * gdy.sn + p * gdy.sp, gdy, C, len, by.data(), pb, col);
        });
      }
    });
    if (need_w) {
      std::vector<double> acc(C, 0.0);
      for (int64_t t = 0; t < tasks; ++t)
        for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<double>(dw_part[t * C + c]);
      at::Tensor dw_acc = at::empty({C}, at::TensorOptions().dtype(at::kDouble));
      std::copy(acc.begin(), acc.end(), dw_acc.data_ptr<double>());
      dw.copy_(dw_acc);
    }
  });
  return {dx, dy, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lpips_fast, m) {
  m.def("_distance_fwd_cpu(Tensor feat0, Tensor feat1, Tensor? weight, bool spatial, float eps) -> Tensor");
  m.def(
      "_distance_bwd_cpu(Tensor grad, Tensor feat0, Tensor feat1, Tensor? weight, bool spatial, "
      "float eps, bool need_feat0, bool need_feat1, bool need_weight) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lpips_fast, CPU, m) {
  m.impl("_distance_fwd_cpu", &distance_fwd_cpu);
  m.impl("_distance_bwd_cpu", &distance_bwd_cpu);
}

}  // namespace lpips_fast
