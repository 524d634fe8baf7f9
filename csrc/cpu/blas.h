// Row-major GEMM for the CPU kernels' block products, on the BLAS that torch links.
//
// PyTorch's x86 wheels link MKL and export its Fortran `sgemm_` / `dgemm_`; we bind them
// weakly so the extension still loads against a torch without them, and fall back to a
// plain loop nest the compiler vectorises. (at::native::cpublas::gemm is not exported.)
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace flashattn::cpu {

enum class Op { N, T };

// Row-major C (m x n) = alpha * op(A) * op(B) + beta * C, where op(A) is m x k and op(B)
// is k x n; lda/ldb/ldc are row strides of the matrices as stored.
template <typename acc_t>
void gemm(Op op_a, Op op_b, int64_t m, int64_t n, int64_t k, acc_t alpha, const acc_t* a,
          int64_t lda, const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands;
  // a row-major matrix read column-major is its own transpose, so the flags stay.
  const char ta = op_b == Op::N ? 'N' : 'T';
  const char tb = op_a == Op::N ? 'N' : 'T';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  // BLAS takes int sizes and strides: a row stride past INT_MAX (a view into a huge
  // tensor, read in place) goes through the loop below instead of wrapping. So does a row
  // stride under a row's length (overlapping rows: a legal view, e.g. expanded along the
  // sequence, that an exported program passes on uncopied), which BLAS refuses.
  const bool int_sizes = std::max({m, n, k, lda, ldb, ldc}) <= std::numeric_limits<int>::max();
  const bool rows_apart = lda >= std::max<int64_t>(1, op_a == Op::N ? k : m) &&
                          ldb >= std::max<int64_t>(1, op_b == Op::N ? n : k) && ldc >= std::max<int64_t>(1, n);
  const bool blas = k > 0 && int_sizes && rows_apart;
  if constexpr (sizeof(acc_t) == 4) {
    if (sgemm_ != nullptr && blas) {
      sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
      return;
    }
  } else {
    if (dgemm_ != nullptr && blas) {
      dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
      return;
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    acc_t* crow = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) crow[j] = beta == acc_t(0) ? acc_t(0) : beta * crow[j];
    for (int64_t p = 0; p < k; ++p) {
      const acc_t av = alpha * (op_a == Op::N ? a[i * lda + p] : a[p * lda + i]);
      if (op_b == Op::N) {
        const acc_t* brow = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) crow[j] += av * brow[j];
      } else {
        for (int64_t j = 0; j < n; ++j) crow[j] += av * b[j * ldb + p];
      }
    }
  }
}

}  // namespace flashattn::cpu
