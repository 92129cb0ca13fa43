// A 2-D float32 transpose into a new row-major buffer, as an XLA FFI handler for
// jaxnets.onednn.transposed_copy (built into the same library as the oneDNN convolutions).
//
// Why a handler for something XLA has an op for: XLA folds a transpose into the dot that
// consumes it, and XLA:CPU's dot with a transposed operand is several times slower when that
// operand's rows are a multiple of 1 KB apart (jaxnets.layers.linear_dot_general has the
// figures). XLA cannot fold through a custom call, so the dot gets a row-major operand.
//
// 32 x 32 tiles, each transposed in 4 x 4 SSE blocks (scalar at the edges).
#include <cstdint>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 32;

// b (cols x rows) = a (rows x cols)^T over the rectangle [i0, i1) x [j0, j1) of a.
void transpose_tile(const float* a, float* b, int64_t rows, int64_t cols, int64_t i0,
                    int64_t i1, int64_t j0, int64_t j1) {
  int64_t i = i0;
#if defined(__SSE__)
  for (; i + 4 <= i1; i += 4) {
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
      const float* src = a + i * cols + j;
      __m128 r0 = _mm_loadu_ps(src), r1 = _mm_loadu_ps(src + cols);
      __m128 r2 = _mm_loadu_ps(src + 2 * cols), r3 = _mm_loadu_ps(src + 3 * cols);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      float* dst = b + j * rows + i;
      _mm_storeu_ps(dst, r0);
      _mm_storeu_ps(dst + rows, r1);
      _mm_storeu_ps(dst + 2 * rows, r2);
      _mm_storeu_ps(dst + 3 * rows, r3);
    }
    for (; j < j1; ++j)
      for (int64_t k = i; k < i + 4; ++k) b[j * rows + k] = a[k * cols + j];
  }
#endif
  for (; i < i1; ++i)
    for (int64_t j = j0; j < j1; ++j) b[j * rows + i] = a[i * cols + j];
}

ffi::Error Transpose(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("transpose: x must be 2-D");
  const int64_t rows = dims[0], cols = dims[1];
  const float* a = x.typed_data();
  float* b = y->typed_data();
  for (int64_t i0 = 0; i0 < rows; i0 += kTile)
    for (int64_t j0 = 0; j0 < cols; j0 += kTile)
      transpose_tile(a, b, rows, cols, i0, i0 + kTile < rows ? i0 + kTile : rows, j0,
                     j0 + kTile < cols ? j0 + kTile : cols);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetsTranspose, Transpose,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
