// 3x3 (2D) and 3x3x3 (3D), stride-1, zero-padded ("SAME") convolutions on channels-last float32
// data: forward pass and weight gradient as XLA FFI custom calls for the CPU backend (see
// segjax/kernels/conv3x3.py).
//
//   y[n, h, w, co]    = sum over kh, kw, ci of x[n, h + kh - 1, w + kw - 1, ci] * k[kh, kw, ci, co]
//   dw[kh, kw, ci, co] = sum over n, h, w of x[n, h + kh - 1, w + kw - 1, ci] * dy[n, h, w, co]
//
// and in 3D the same with a depth axis (NDHWC, DHWIO): a 2D image is a volume of depth 1 with a
// kernel of depth 1. An output row (n, z, h) reads up to 3 x 3 input rows (z + kz - 1, h + kh - 1),
// each against the kernel's contiguous [3 x Ci, Co] matrix k[kz, kh]. The input gradient is the
// forward pass of dy with the kernel flipped and transposed.
//
// Forward: for one output row and one kernel row kh, the taps (kw, ci) of R neighbouring pixels
// are R overlapping windows of 3 x Ci contiguous floats of one input row, and k[kh] is a
// contiguous [3 x Ci, Co] matrix: one small matrix product per kernel row, accumulated in
// registers over the three rows, with no im2col copy (XLA:CPU's Eigen convolution reaches about
// two thirds of the cores' peak at 16-128 channels).
//
// Weight gradient: XLA:CPU computes it as one Eigen convolution whose output is only 9 x Ci x Co
// values; Eigen splits a convolution between threads by output blocks, so at 16-64 channels one
// core does nearly all the work, and XLA first transposes both operands. Here each thread takes
// whole image rows: for one output row and one (kh, kw) tap the operands are two contiguous row
// segments of x and dy (no copies, no transposes), a small matrix product accumulated in
// registers. Each chunk of rows sums into its own buffer; the buffers are added in chunk order.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 or 8 floats; the compiler maps a v16 to one AVX-512 register or two AVX2 ones, a v8 to one
// AVX2 register (GCC/Clang vectors). Output channels go in tiles of 16 or 32, and the last 8 of a
// count that is not a multiple of 16 (8, 24, 40, ...) in an 8-wide tile. The tiles' sizes follow
// the registers: with AVX-512 (32 registers of 16 floats) 24 accumulating v16s; without it (AVX2:
// 16 registers of 8 floats) 12 accumulating v8s. AVX-512's tiles built for AVX2 spill to memory:
// a training step 6-10x slower than XLA's convolutions on a Zen 3 CPU (benchmarks/RESULTS.md,
// session 41), 1.1-1.4x faster with the AVX2 tiles.
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
template <typename T>
inline T load(const float* p) { T v; std::memcpy(&v, p, sizeof v); return v; }
template <typename T>
inline void store(float* p, T v) { std::memcpy(p, &v, sizeof v); }
template <typename T>
constexpr int kLanes = sizeof(T) / sizeof(float);

// c[r, :] += sum_k a[k * lda + r] * b[k * ldb + :] for R rows and L V columns (vectors T of L
// floats), in registers.
template <typename T, int R, int V>
void Tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t k_len, float* c, int64_t ldc) {
  constexpr int L = kLanes<T>;
  T acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = load<T>(c + r * ldc + L * v);
  for (int64_t k = 0; k < k_len; ++k) {
    T bk[V];
    for (int v = 0; v < V; ++v) bk[v] = load<T>(b + k * ldb + L * v);
    for (int r = 0; r < R; ++r) {
      const float s = a[k * lda + r];
      for (int v = 0; v < V; ++v) acc[r][v] += s * bk[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store<T>(c + r * ldc + L * v, acc[r][v]);
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);

// Tile<T, 1, V> ... Tile<T, R, V>: row blocks of every height, so any Ci works.
template <typename T, int V, int... Rows>
const TileFn* Tiles(std::integer_sequence<int, Rows...>) {
  static const TileFn fns[] = {Tile<T, Rows + 1, V>...};
  return fns;
}

// One kind of tile: its functions (by height - 1), its greatest height and its width in channels.
template <typename Fn>
struct TileSet {
  const Fn* fns;
  int max_rows;
  int64_t width;
};

// The tile for the output channels from c0 on: 32 or 16 wide while 16 are left, then 8 wide.
template <typename Fn>
const TileSet<Fn>& Columns(const TileSet<Fn>& wide, const TileSet<Fn>& narrow, int64_t co, int64_t c0) {
  return co - c0 >= wide.width ? wide : narrow;
}

struct Shape {
  int64_t d, h, w, ci, co;
  int64_t kd;  // the kernel's depth: 1 (2D; d = 1) or 3
};

// The input rows (index (n * D + z) * H + h) that output row `row` reads inside the volume, and
// the kernel row kz * 3 + kh each one meets: up to 9; returns how many.
int InputRows(const Shape& s, int64_t row, int64_t (&rows)[9], int64_t (&kernel_rows)[9]) {
  const int64_t h = row % s.h, z = (row / s.h) % s.d, n = row / (s.h * s.d);
  int count = 0;
  for (int64_t kz = 0; kz < s.kd; ++kz) {
    const int64_t zi = z + kz - s.kd / 2;
    if (zi < 0 || zi >= s.d) continue;  // the zero padding contributes nothing
    for (int64_t kh = 0; kh < 3; ++kh) {
      const int64_t hi = h + kh - 1;
      if (hi < 0 || hi >= s.h) continue;
      rows[count] = (n * s.d + zi) * s.h + hi;
      kernel_rows[count++] = kz * 3 + kh;
    }
  }
  return count;
}

// Adds the products of output rows [begin, end) (index (n * D + z) * H + h) to acc[kd * 9, Ci, Co].
void Rows(const float* x, const float* dy, float* acc, const Shape& s, int64_t begin, int64_t end) {
  // Tiles of 32 columns and 12 rows, or 16 x 24, and 8 x 24 for the last 8 channels of a count
  // that is not a multiple of 16: 24 accumulating registers (64-column tiles of 6 rows were
  // slower: 7.6 vs 6.7 ms at 8 x 64^2 x 64 -> 64).
#ifdef __AVX512F__
  static const TileSet<TileFn> t32{Tiles<v16, 2>(std::make_integer_sequence<int, 12>()), 12, 32},
      t16{Tiles<v16, 1>(std::make_integer_sequence<int, 24>()), 24, 16},
      t8{Tiles<v8, 1>(std::make_integer_sequence<int, 24>()), 24, 8};
#else  // AVX2: 16 registers of 8 floats, so 12 accumulating registers
  static const TileSet<TileFn> t32{Tiles<v8, 4>(std::make_integer_sequence<int, 3>()), 3, 32},
      t16{Tiles<v8, 2>(std::make_integer_sequence<int, 6>()), 6, 16},
      t8{Tiles<v8, 1>(std::make_integer_sequence<int, 12>()), 12, 8};
#endif
  const TileSet<TileFn>& wide = s.co % 32 == 0 ? t32 : t16;
  int64_t in_rows[9], kernel_rows[9];
  for (int64_t row = begin; row < end; ++row) {
    const float* dy_row = dy + row * s.w * s.co;
    const int taps = InputRows(s, row, in_rows, kernel_rows);
    for (int t = 0; t < taps; ++t) {
      const float* x_row = x + in_rows[t] * s.w * s.ci;
      for (int64_t kw = 0; kw < 3; ++kw) {
        const int64_t shift = kw - 1, w0 = shift < 0 ? 1 : 0, k_len = s.w - (shift == 0 ? 0 : 1);
        const float* a = x_row + (w0 + shift) * s.ci;
        const float* b = dy_row + w0 * s.co;
        float* c = acc + (kernel_rows[t] * 3 + kw) * s.ci * s.co;
        for (int64_t c0 = 0; c0 < s.co;) {
          const TileSet<TileFn>& tile = Columns(wide, t8, s.co, c0);
          for (int64_t r0 = 0; r0 < s.ci; r0 += tile.max_rows) {
            const int64_t rows = s.ci - r0 < tile.max_rows ? s.ci - r0 : tile.max_rows;
            tile.fns[rows - 1](a + r0, s.ci, b + c0, s.co, k_len, c + r0 * s.co + c0, s.co);
          }
          c0 += tile.width;
        }
      }
    }
  }
}

// Calls fn(c, begin, end) for chunks c = 0 .. chunks - 1 of the rows [0, rows) (chunk c: rows
// [rows * c / chunks, rows * (c + 1) / chunks)) from the calling thread and participants - 1 tasks
// of the pool. Chunks are claimed from an atomic counter, so the caller never waits for a task
// that has not started (it does the unclaimed chunks itself): no deadlock however busy the pool
// is. A task that starts after the last chunk was claimed touches only the shared counters. Which
// thread runs a chunk varies from call to call; what a chunk computes must depend on c only.
void ParallelRows(ffi::ThreadPool& pool, int participants, int64_t rows, int64_t chunks,
                  std::function<void(int64_t, int64_t, int64_t)> fn) {
  struct Shared {
    std::function<void(int64_t, int64_t, int64_t)> fn;
    int64_t rows, chunks;
    std::atomic<int64_t> next{0}, finished{0};

    void Participate() {
      for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
        fn(c, rows * c / chunks, rows * (c + 1) / chunks);
        finished.fetch_add(1);
      }
    }
  };
  auto shared = std::make_shared<Shared>();
  shared->fn = std::move(fn);
  shared->rows = rows;
  shared->chunks = rows < chunks ? rows : chunks;
  for (int t = 1; t < participants; ++t) pool.Schedule([shared] { shared->Participate(); });
  shared->Participate();
  while (shared->finished.load() < shared->chunks) std::this_thread::yield();
}

int Participants(ffi::ThreadPool& pool) {
  return pool.num_threads() > 1 ? static_cast<int>(pool.num_threads()) : 1;
}

// The shape of a convolution of x [N, (D,) H, W, Ci] with a kernel [(3,) 3, 3, Ci, Co] giving
// y [N, (D,) H, W, Co], or false when the three do not fit together (Co must be a multiple of 8).
template <typename A, typename B, typename C>
bool ConvShape(const A& xd, const B& kd, const C& yd, Shape& s) {
  const size_t rank = xd.size();
  if ((rank != 4 && rank != 5) || kd.size() != rank || yd.size() != rank) return false;
  for (size_t i = 0; i + 1 < rank; ++i)
    if (xd[i] != yd[i]) return false;
  for (size_t i = 0; i + 2 < rank; ++i)
    if (kd[i] != 3) return false;
  const int64_t co = yd[rank - 1];
  if (kd[rank - 2] != xd[rank - 1] || kd[rank - 1] != co || co % 8 != 0) return false;
  s = Shape{rank == 5 ? xd[1] : 1, xd[rank - 3], xd[rank - 2], xd[rank - 1], co, rank == 5 ? 3 : 1};
  return true;
}

ffi::Error Conv3x3WeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                             ffi::ResultBuffer<ffi::F32> dw) {
  Shape shape;
  if (!ConvShape(x.dimensions(), dw->dimensions(), dy.dimensions(), shape))
    return ffi::Error::InvalidArgument(
        "conv3x3 weight gradient: shapes do not fit (x NHWC / NDHWC, dy of x's size, dw HWIO / DHWIO of "
        "3s; Co must be a multiple of 8)");
  const int participants = Participants(pool);
  const int64_t size = shape.kd * 9 * shape.ci * shape.co;
  const int64_t rows = x.dimensions()[0] * shape.d * shape.h;
  float* out = dw->typed_data();
  if (rows == 0) {
    std::fill(out, out + size, 0.0f);
    return ffi::Error::Success();
  }
  // One [kd * 9, Ci, Co] sum per chunk of rows, added in chunk order: the same numbers whichever
  // thread takes which chunk (resumed runs repeat bit for bit). Chunks: 4 per participant.
  const int64_t chunks = rows < 4 * participants ? rows : 4 * participants;
  std::unique_ptr<float[]> buffers(new float[chunks * size]);
  const float* x_data = x.typed_data();
  const float* dy_data = dy.typed_data();
  ParallelRows(pool, participants, rows, chunks, [&](int64_t c, int64_t begin, int64_t end) {
    float* sum = buffers.get() + c * size;
    std::fill(sum, sum + size, 0.0f);
    Rows(x_data, dy_data, sum, shape, begin, end);
  });
  ParallelRows(pool, participants, size, 8 * participants, [&](int64_t, int64_t begin, int64_t end) {
    std::copy(buffers.get() + begin, buffers.get() + end, out + begin);
    for (int64_t c = 1; c < chunks; ++c)
      for (int64_t i = begin; i < end; ++i) out[i] += buffers[c * size + i];
  });
  return ffi::Error::Success();
}

// c[r, :] (+)= sum over taps t, k of a[t][r * lda + k] * b[t][k * ldb + :] for R pixels and
// L V output channels, in registers: R overlapping input windows times a kernel row, per tap.
// `add`: add to c (a later block of k) instead of overwriting it.
template <typename T, int R, int V>
void ForwardTile(const float* const* a, const float* const* b, int taps, int64_t lda, int64_t ldb, int64_t k_len,
                 float* c, int64_t ldc, bool add) {
  constexpr int L = kLanes<T>;
  T acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = add ? load<T>(c + r * ldc + L * v) : T{};
  for (int t = 0; t < taps; ++t) {
    const float* at = a[t];
    const float* bt = b[t];
    for (int64_t k = 0; k < k_len; ++k) {
      T bk[V];
      for (int v = 0; v < V; ++v) bk[v] = load<T>(bt + k * ldb + L * v);
      for (int r = 0; r < R; ++r) {
        const float s = at[r * lda + k];
        for (int v = 0; v < V; ++v) acc[r][v] += s * bk[v];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store<T>(c + r * ldc + L * v, acc[r][v]);
}

using ForwardTileFn = void (*)(const float* const*, const float* const*, int, int64_t, int64_t, int64_t, float*,
                               int64_t, bool);

template <typename T, int V, int... Rows>
const ForwardTileFn* ForwardTiles(std::integer_sequence<int, Rows...>) {
  static const ForwardTileFn fns[] = {ForwardTile<T, Rows + 1, V>...};
  return fns;
}

// Output rows [begin, end) (index (n * D + z) * H + h) of y = conv(x, k).
void ForwardRows(const float* x, const float* k, float* y, const Shape& s, int64_t begin, int64_t end) {
  // Tiles of 12 pixels x 32 channels, or 14 x 16: 24 or 14 accumulating registers (24 x 16
  // spilled); the last 8 channels of a count that is not a multiple of 16 in tiles of 14 x 8.
#ifdef __AVX512F__
  static const TileSet<ForwardTileFn> t32{ForwardTiles<v16, 2>(std::make_integer_sequence<int, 12>()), 12, 32},
      t16{ForwardTiles<v16, 1>(std::make_integer_sequence<int, 14>()), 14, 16},
      t8{ForwardTiles<v8, 1>(std::make_integer_sequence<int, 14>()), 14, 8};
#else  // AVX2: 16 registers of 8 floats, so 12 accumulating registers
  static const TileSet<ForwardTileFn> t32{ForwardTiles<v8, 4>(std::make_integer_sequence<int, 3>()), 3, 32},
      t16{ForwardTiles<v8, 2>(std::make_integer_sequence<int, 6>()), 6, 16},
      t8{ForwardTiles<v8, 1>(std::make_integer_sequence<int, 12>()), 12, 8};
#endif
  const TileSet<ForwardTileFn>& wide = s.co % 32 == 0 ? t32 : t16;
  const int64_t row_len = s.w * s.ci, kernel_row = 3 * s.ci * s.co, k_total = 3 * s.ci;
  // The kernel's columns for one tile, all its kernel rows, are read once per pixel tile: in
  // blocks of k of at most ~40 KB they stay in the L1 cache.
  const int64_t blocks = (s.kd * 3 * k_total * wide.width * 4 + 40959) / 40960;
  const int64_t k_block = (k_total + blocks - 1) / blocks;
  // Rows in groups of at least 128 pixels, so that narrow images reuse a block as often.
  const int64_t group = s.w >= 128 ? 1 : (128 + s.w - 1) / s.w;
  for (int64_t g0 = begin; g0 < end; g0 += group) {
    const int64_t g1 = g0 + group < end ? g0 + group : end;
    for (int64_t c0 = 0, width = 0; c0 < s.co; c0 += width) {
      const TileSet<ForwardTileFn>& tile = Columns(wide, t8, s.co, c0);
      const ForwardTileFn* tiles = tile.fns;
      const int64_t max_pixels = tile.max_rows;
      width = tile.width;
      for (int64_t k0 = 0; k0 < k_total; k0 += k_block) {
        const int64_t k1 = k0 + k_block < k_total ? k0 + k_block : k_total;
        const bool add = k0 > 0;
        for (int64_t row = g0; row < g1; ++row) {
          int64_t in_rows[9], kernel_rows[9];
          const int taps = InputRows(s, row, in_rows, kernel_rows);
          const float* rows[9];
          const float* kernels[9];
          for (int t = 0; t < taps; ++t) {
            rows[t] = x + in_rows[t] * row_len;
            kernels[t] = k + kernel_rows[t] * kernel_row + c0;
          }
          float* y_row = y + row * s.w * s.co + c0;
          const float* a[9];
          const float* b[9];
          // Pixel p's window starts at input pixel p - 1: k in [lo, hi) of it lies in the image.
          auto edge = [&](int64_t p, int64_t lo, int64_t hi) {
            const int64_t from = k0 > lo ? k0 : lo, stop = k1 < hi ? k1 : hi;
            const int64_t len = stop > from ? stop - from : 0;
            const int64_t start = len > 0 ? from : lo;  // no taps in this block: pointers stay in the row
            for (int t = 0; t < taps; ++t) a[t] = rows[t] + (p - 1) * s.ci + start, b[t] = kernels[t] + start * s.co;
            tiles[0](a, b, taps, s.ci, s.co, len, y_row + p * s.co, s.co, add);
          };
          const int64_t last = s.w - 1;
          edge(0, s.ci, last > 0 ? k_total : 2 * s.ci);
          if (last == 0) continue;
          for (int t = 0; t < taps; ++t) b[t] = kernels[t] + k0 * s.co;
          for (int64_t p0 = 1; p0 < last; p0 += max_pixels) {
            const int64_t pixels = last - p0 < max_pixels ? last - p0 : max_pixels;
            for (int t = 0; t < taps; ++t) a[t] = rows[t] + (p0 - 1) * s.ci + k0;
            tiles[pixels - 1](a, b, taps, s.ci, s.co, k1 - k0, y_row + p0 * s.co, s.co, add);
          }
          edge(last, 0, 2 * s.ci);
        }
      }
    }
  }
}

ffi::Error Conv3x3Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                          ffi::ResultBuffer<ffi::F32> y) {
  Shape shape;
  if (!ConvShape(x.dimensions(), k.dimensions(), y->dimensions(), shape))
    return ffi::Error::InvalidArgument(
        "conv3x3 forward: shapes do not fit (x NHWC / NDHWC, kernel HWIO / DHWIO of 3s for x's channels, "
        "y of x's size; Co must be a multiple of 8)");
  const float* x_data = x.typed_data();
  const float* k_data = k.typed_data();
  float* y_data = y->typed_data();
  const int64_t rows = x.dimensions()[0] * shape.d * shape.h;
  const int participants = Participants(pool);
  ParallelRows(pool, participants, rows, 8 * participants, [&](int64_t, int64_t begin, int64_t end) {
    ForwardRows(x_data, k_data, y_data, shape, begin, end);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegjaxConv3x3WeightGrad, Conv3x3WeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());


XLA_FFI_DEFINE_HANDLER_SYMBOL(SegjaxConv3x3Forward, Conv3x3Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
