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
// The ops are internal (`lpips_fast::_distance_fwd_cpu` / `_distance_bwd_cpu` for one layer,
// `_distances_fwd_cpu` / `_distances_bwd_cpu` for all layers at once); their schemas, the public
// custom ops with fake kernels and autograd live in lpips_fast/ops/_cpu.py and _schemas.py.

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

// One layer's inputs walked as (N, C, P) pixel columns, cut into fixed tiles of PB columns.
struct Layer {
  at::Tensor x, y;
  Geo gx, gy;
  int64_t N, C, H, W, P, NP, PB, tasks;
};

Layer make_layer(const at::Tensor& feat0, const at::Tensor& feat1) {
  Layer L;
  L.x = walkable(feat0, L.gx);
  L.y = walkable(feat1, L.gy);
  L.N = L.x.size(0);
  L.C = L.x.size(1);
  L.H = L.x.size(2);
  L.W = L.x.size(3);
  L.P = L.H * L.W;
  L.NP = L.N * L.P;
  L.PB = tile_columns(L.C, L.NP);
  L.tasks = L.NP > 0 ? (L.NP + L.PB - 1) / L.PB : 0;
  return L;
}

// Forward of tiles [begin, end) of one layer: the per-pixel distance into dmap (N * P values).
template <typename scalar_t, typename acc_t>
void fwd_tiles(const Layer& L, const acc_t* wv, acc_t e, acc_t* dmap, int64_t begin, int64_t end) {
  const int64_t C = L.C, P = L.P, NP = L.NP, PB = L.PB;
  const Geo gx = L.gx, gy = L.gy;
  const scalar_t* xp = L.x.data_ptr<scalar_t>();
  const scalar_t* yp = L.y.data_ptr<scalar_t>();
  // Both inputs channels_last (channel stride 1, pixels apart): the per-pixel direct path.
  const bool cl_direct = C > 1 && gx.sc == 1 && gy.sc == 1 && gx.sp != 1 && gy.sp != 1;
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
          dmap[q0 + col + j] = cl_weighted_sq_diff(px, py, wv, C, ia, ib);
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
    weighted_sq_diff(bx.data(), by.data(), wv, sx.data(), sy.data(), C, pb, dmap + q0, tmp.data());
  }
}

// Spatial mean per image of one layer's map, summed in fixed order in fp64.
template <typename acc_t>
void layer_means(const Layer& L, const acc_t* dmap, acc_t* out) {
  for (int64_t n = 0; n < L.N; ++n)
    out[n] = static_cast<acc_t>(lane_sum<double>(dmap + n * L.P, L.P) / static_cast<double>(L.P));
}

// Runs f(layer, begin, end) over the tiles of every layer in one parallel region: the global task
// range is the concatenation of the layers' tile ranges, each chunk split at layer boundaries.
// Tiles are independent, so results do not depend on how the range is cut.
template <typename F>
void parallel_over_layers(const std::vector<Layer>& layers, int64_t grain, F&& f) {
  std::vector<int64_t> start(layers.size() + 1, 0);
  for (size_t l = 0; l < layers.size(); ++l) start[l + 1] = start[l] + layers[l].tasks;
  at::parallel_for(0, start.back(), grain, [&](int64_t begin, int64_t end) {
    for (size_t l = 0; l < layers.size(); ++l) {
      const int64_t lo = std::max(begin, start[l]), hi = std::min(end, start[l + 1]);
      if (lo < hi) f(l, lo - start[l], hi - start[l]);
    }
  });
}

int64_t fwd_grain(const Layer& L) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(L.C * L.PB, 1)); }
int64_t bwd_grain(const Layer& L) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(L.C * L.PB, 1)); }

at::ScalarType acc_scalar_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor distance_fwd_cpu(const at::Tensor& feat0, const at::Tensor& feat1,
                            const c10::optional<at::Tensor>& weight, bool spatial, double eps) {
  check_inputs(feat0, feat1, weight);
  const Layer L = make_layer(feat0, feat1);
  const auto opts = L.x.options().dtype(acc_scalar_type(L.x));
  at::Tensor out = spatial ? at::empty({L.N, 1, L.H, L.W}, opts) : at::empty({L.N}, opts);
  if (L.N == 0) return out;
  if (L.P == 0) return spatial ? out : out.fill_(NAN);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.x.scalar_type(), "lpips_distance_fwd_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const std::vector<acc_t> wv = weight_vector<acc_t>(weight, L.C);
    // The per-pixel map: the output itself when spatial, else a scratch (N*P, 1/C of a feature).
    std::vector<acc_t> scratch(spatial ? 0 : L.NP);
    acc_t* dmap = spatial ? out.data_ptr<acc_t>() : scratch.data();
    const acc_t e = static_cast<acc_t>(eps);
    at::parallel_for(0, L.tasks, fwd_grain(L), [&](int64_t begin, int64_t end) {
      fwd_tiles<scalar_t, acc_t>(L, wv.data(), e, dmap, begin, end);
    });
    if (!spatial) layer_means(L, dmap, out.data_ptr<acc_t>());
  });
  return out;
}

// The backward's per-layer inputs and outputs besides the features.
struct LayerGrads {
  const void* grad;     // acc_t incoming gradient, walked with g_sn / g_sp (or a scalar per image)
  int64_t g_sn, g_sp;
  bool per_pixel;       // grad per pixel (spatial) or per image (spatial mean)
  at::Tensor dx, dy;    // (empty when not needed)
  Geo gdx, gdy;
  void* dw_part;        // acc_t [tasks][C] weight-gradient partials (nullptr when not needed)
};

template <typename scalar_t, typename acc_t>
void bwd_tiles(const Layer& L, const LayerGrads& G, const acc_t* wv, acc_t e, bool need_x, bool need_y,
               int64_t begin, int64_t end) {
  const int64_t C = L.C, P = L.P, NP = L.NP, PB = L.PB;
  const Geo gx = L.gx, gy = L.gy, gdx = G.gdx, gdy = G.gdy;
  const scalar_t* xp = L.x.data_ptr<scalar_t>();
  const scalar_t* yp = L.y.data_ptr<scalar_t>();
  scalar_t* dxp = need_x ? G.dx.data_ptr<scalar_t>() : nullptr;
  scalar_t* dyp = need_y ? G.dy.data_ptr<scalar_t>() : nullptr;
  const acc_t* gp = static_cast<const acc_t*>(G.grad);
  acc_t* dw_part = static_cast<acc_t*>(G.dw_part);
  const acc_t inv_p = static_cast<acc_t>(1.0 / static_cast<double>(P));
  std::vector<acc_t> bx(C * PB), by(C * PB), nx(PB), ny(PB), ia(PB), ib(PB), tmp(PB), g(PB), dotx(PB), doty(PB);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t q0 = t * PB, pb = std::min(PB, NP - q0);
    bool nx_done = true, ny_done = true;
    for_each_run(q0, pb, P, [&](int64_t n, int64_t p, int64_t col, int64_t len) {
      nx_done &= load_run_sq(xp + n * gx.sn + p * gx.sp, gx, C, len, bx.data(), pb, col, nx.data(), tmp.data());
      ny_done &= load_run_sq(yp + n * gy.sn + p * gy.sp, gy, C, len, by.data(), pb, col, ny.data(), tmp.data());
      for (int64_t j = 0; j < len; ++j)
        g[col + j] = G.per_pixel ? gp[n * G.g_sn + (p + j) * G.g_sp] : gp[n * G.g_sn] * inv_p;
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
      if (dw_part) dw_part[t * C + c] = lane_sum<acc_t>(tmp.data(), pb);
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
}

// Fixed-order sum of the weight-gradient partials of one layer into dw (weight's dtype).
template <typename acc_t>
void reduce_dw(const Layer& L, const acc_t* dw_part, at::Tensor& dw) {
  std::vector<double> acc(L.C, 0.0);
  for (int64_t t = 0; t < L.tasks; ++t)
    for (int64_t c = 0; c < L.C; ++c) acc[c] += static_cast<double>(dw_part[t * L.C + c]);
  at::Tensor dw_acc = at::empty({L.C}, at::TensorOptions().dtype(at::kDouble));
  std::copy(acc.begin(), acc.end(), dw_acc.data_ptr<double>());
  dw.copy_(dw_acc);
}

at::Tensor empty_grad_like(const at::Tensor& t, bool needed) {
  return needed ? at::empty(t.sizes(), t.options().memory_format(grad_format(t))) : at::empty({0}, t.options());
}

Geo grad_geo(const at::Tensor& d, bool needed) {
  return needed ? Geo{d.stride(0), d.stride(1), pixel_stride(d)} : Geo{0, 0, 0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distance_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& feat0, const at::Tensor& feat1,
    const c10::optional<at::Tensor>& weight, bool spatial, double eps, bool need_x, bool need_y,
    bool need_w) {
  check_inputs(feat0, feat1, weight);
  need_w = need_w && weight.has_value();
  const Layer L = make_layer(feat0, feat1);
  const int64_t N = L.N, C = L.C, H = L.H, W = L.W, P = L.P;
  TORCH_CHECK(spatial ? (grad_in.dim() == 4 && grad_in.size(0) == N && grad_in.size(1) == 1 &&
                         grad_in.size(2) == H && grad_in.size(3) == W)
                      : (grad_in.dim() == 1 && grad_in.size(0) == N),
              "lpips_fast: grad has shape ", grad_in.sizes(), ", which does not match the output");
  // The incoming gradient in the accumulation dtype, walked as (N, P).
  at::Tensor grad = grad_in.to(acc_scalar_type(L.x));
  LayerGrads G;
  G.per_pixel = spatial;
  G.g_sp = 0;
  if (spatial) {
    Geo gg;
    grad = walkable(grad, gg);
    G.g_sn = N > 1 ? gg.sn : 0;
    G.g_sp = gg.sp;
  } else {
    G.g_sn = grad.stride(0);
  }
  G.dx = empty_grad_like(feat0, need_x);
  G.dy = empty_grad_like(feat1, need_y);
  at::Tensor dw = need_w ? at::empty({C}, weight->options()) : at::empty({0}, feat0.options());
  if (N * P == 0 || !(need_x || need_y || need_w)) {
    if (need_x) G.dx.zero_();
    if (need_y) G.dy.zero_();
    if (need_w) dw.zero_();
    return {G.dx, G.dy, dw};
  }
  G.gdx = grad_geo(G.dx, need_x);
  G.gdy = grad_geo(G.dy, need_y);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.x.scalar_type(), "lpips_distance_bwd_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const std::vector<acc_t> wv = weight_vector<acc_t>(weight, C);
    std::vector<acc_t> dw_part(need_w ? L.tasks * C : 0);
    G.grad = grad.data_ptr<acc_t>();
    G.dw_part = need_w ? dw_part.data() : nullptr;
    const acc_t e = static_cast<acc_t>(eps);
    at::parallel_for(0, L.tasks, bwd_grain(L), [&](int64_t begin, int64_t end) {
      bwd_tiles<scalar_t, acc_t>(L, G, wv.data(), e, need_x, need_y, begin, end);
    });
    if (need_w) reduce_dw(L, dw_part.data(), dw);
  });
  return {G.dx, G.dy, dw};
}

// ---------------------------------------------------------------------------- grouped (all layers)
// The same per-layer tiles as above, all layers in one parallel region, so each layer's numbers
// are bitwise those of the per-layer op. Non-spatial: the (N,) sum over layers of the per-layer
// means, added in layer order in the accumulation dtype (as the module adds per-layer results).
// Spatial: every layer's (N, 1, H_l, W_l) map, concatenated flat in layer order.

std::vector<Layer> make_layers(const at::TensorList& feats0, const at::TensorList& feats1, const at::TensorList& weights) {
  TORCH_CHECK(feats0.size() == feats1.size() && !feats0.empty(), "lpips_fast: feats0 and feats1 must be non-empty lists of equal length");
  TORCH_CHECK(weights.empty() || weights.size() == feats0.size(), "lpips_fast: weights must be empty or one per layer");
  std::vector<Layer> layers;
  for (size_t l = 0; l < feats0.size(); ++l) {
    check_inputs(feats0[l], feats1[l], weights.empty() ? c10::optional<at::Tensor>() : c10::optional<at::Tensor>(weights[l]));
    TORCH_CHECK(feats0[l].scalar_type() == feats0[0].scalar_type(), "lpips_fast: all layers must share a dtype");
    TORCH_CHECK(feats0[l].size(0) == feats0[0].size(0), "lpips_fast: all layers must share the batch size");
    layers.push_back(make_layer(feats0[l], feats1[l]));
  }
  return layers;
}

c10::optional<at::Tensor> layer_weight(const at::TensorList& weights, size_t l) {
  return weights.empty() ? c10::optional<at::Tensor>() : c10::optional<at::Tensor>(weights[l]);
}

at::Tensor distances_fwd_cpu(at::TensorList feats0, at::TensorList feats1, at::TensorList weights, bool spatial,
                             double eps) {
  const std::vector<Layer> layers = make_layers(feats0, feats1, weights);
  const at::Tensor& x0 = layers[0].x;
  const int64_t N = layers[0].N;
  int64_t total_np = 0;
  bool empty_map = false;
  for (const Layer& L : layers) {
    total_np += L.NP;
    empty_map |= L.P == 0;
  }
  const auto opts = x0.options().dtype(acc_scalar_type(x0));
  at::Tensor out = spatial ? at::empty({total_np}, opts) : at::empty({N}, opts);
  if (N == 0) return out;
  if (empty_map && !spatial) return out.fill_(NAN);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "lpips_distances_fwd_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    std::vector<std::vector<acc_t>> wv;
    std::vector<int64_t> offset(layers.size() + 1, 0);
    int64_t grain = INT64_MAX;
    for (size_t l = 0; l < layers.size(); ++l) {
      wv.push_back(weight_vector<acc_t>(layer_weight(weights, l), layers[l].C));
      offset[l + 1] = offset[l] + layers[l].NP;
      grain = std::min(grain, fwd_grain(layers[l]));
    }
    std::vector<acc_t> scratch(spatial ? 0 : total_np);
    acc_t* dmap = spatial ? out.data_ptr<acc_t>() : scratch.data();
    const acc_t e = static_cast<acc_t>(eps);
    parallel_over_layers(layers, grain, [&](size_t l, int64_t begin, int64_t end) {
      fwd_tiles<scalar_t, acc_t>(layers[l], wv[l].data(), e, dmap + offset[l], begin, end);
    });
    if (!spatial) {
      acc_t* total = out.data_ptr<acc_t>();
      std::vector<acc_t> mean(N);
      for (size_t l = 0; l < layers.size(); ++l) {
        layer_means(layers[l], dmap + offset[l], mean.data());
        for (int64_t n = 0; n < N; ++n) total[n] = l == 0 ? mean[n] : total[n] + mean[n];
      }
    }
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> distances_bwd_cpu(
    const at::Tensor& grad_in, at::TensorList feats0, at::TensorList feats1, at::TensorList weights, bool spatial,
    double eps, bool need_x, bool need_y, bool need_w) {
  const std::vector<Layer> layers = make_layers(feats0, feats1, weights);
  need_w = need_w && !weights.empty();
  const at::Tensor& x0 = layers[0].x;
  const int64_t N = layers[0].N;
  int64_t total_np = 0;
  for (const Layer& L : layers) total_np += L.NP;
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == (spatial ? total_np : N), "lpips_fast: grad has shape ",
              grad_in.sizes(), ", which does not match the output");
  const at::Tensor grad = grad_in.to(acc_scalar_type(x0)).contiguous();
  std::vector<at::Tensor> dxs, dys, dws;
  std::vector<LayerGrads> grads(layers.size());
  bool any_work = false;
  for (size_t l = 0; l < layers.size(); ++l) {
    const Layer& L = layers[l];
    LayerGrads& G = grads[l];
    G.dx = empty_grad_like(feats0[l], need_x);
    G.dy = empty_grad_like(feats1[l], need_y);
    G.gdx = grad_geo(G.dx, need_x);
    G.gdy = grad_geo(G.dy, need_y);
    G.per_pixel = spatial;
    G.g_sn = spatial ? L.P : 1;
    G.g_sp = spatial ? 1 : 0;
    G.dw_part = nullptr;
    dxs.push_back(G.dx);
    dys.push_back(G.dy);
    dws.push_back(need_w ? at::empty({L.C}, weights[l].options()) : at::empty({0}, feats0[l].options()));
    if (L.NP == 0) {
      if (need_x) G.dx.zero_();
      if (need_y) G.dy.zero_();
      if (need_w) dws[l].zero_();
    } else {
      any_work = true;
    }
  }
  if (!any_work || !(need_x || need_y || need_w)) {
    for (size_t l = 0; l < layers.size(); ++l) {
      if (need_x) dxs[l].zero_();
      if (need_y) dys[l].zero_();
      if (need_w) dws[l].zero_();
    }
    return {dxs, dys, dws};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "lpips_distances_bwd_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    std::vector<std::vector<acc_t>> wv, dw_part;
    const acc_t* gp = grad.data_ptr<acc_t>();
    int64_t offset = 0, grain = INT64_MAX;
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& L = layers[l];
      wv.push_back(weight_vector<acc_t>(layer_weight(weights, l), L.C));
      dw_part.emplace_back(need_w ? L.tasks * L.C : 0);
      grads[l].grad = spatial ? gp + offset : gp;
      grads[l].dw_part = need_w ? dw_part[l].data() : nullptr;
      offset += L.NP;
      if (L.tasks > 0) grain = std::min(grain, bwd_grain(L));
    }
    const acc_t e = static_cast<acc_t>(eps);
    parallel_over_layers(layers, grain, [&](size_t l, int64_t begin, int64_t end) {
      bwd_tiles<scalar_t, acc_t>(layers[l], grads[l], wv[l].data(), e, need_x, need_y, begin, end);
    });
    if (need_w)
      for (size_t l = 0; l < layers.size(); ++l)
        if (layers[l].NP > 0) reduce_dw(layers[l], dw_part[l].data(), dws[l]);
  });
  return {dxs, dys, dws};
}

}  // namespace

// The schemas are defined once, in Python (lpips_fast/ops/_schemas.py), so that the ops exist (and
// TorchScript traces that call them load) before this library is built; this file only implements
// them for the CPU.
TORCH_LIBRARY_IMPL(lpips_fast, CPU, m) {
  m.impl("_distance_fwd_cpu", &distance_fwd_cpu);
  m.impl("_distance_bwd_cpu", &distance_bwd_cpu);
  m.impl("_distances_fwd_cpu", &distances_fwd_cpu);
  m.impl("_distances_bwd_cpu", &distances_bwd_cpu);
}

}  // namespace lpips_fast
