/* cblas_sgemm that sends matrix-vector products to cblas_sgemv (built by models/backend/blas.py).
 *
 * MLX's CPU backend does every float32 product with cblas_sgemm, including the 1-row ones of
 * single-stream decoding (x @ W.T with x of shape [1, K]). OpenBLAS before 0.3.27 (Debian 12
 * ships 0.3.21) runs such a call as a general matrix product: it packs the weight matrix
 * before using it, so every weight is read about three times. Its sgemv reads each weight
 * once and is 2-5x faster on the same call (bench/RESULTS.md). Newer OpenBLAS builds do this
 * forwarding themselves (GEMM_GEMV_FORWARD); it is harmless on top of them.
 *
 * Loaded into the global symbol scope ahead of the BLAS, this definition of cblas_sgemm is
 * the one MLX binds to. models/backend/blas.py hands it the BLAS's own sgemm and sgemv through
 * moeserve_blas_bind before MLX is imported. Only row-major calls with one row (M == 1) or
 * one column (N == 1) and K > 0 are rerouted; every other call goes to the BLAS unchanged.
 * A NULL sgemv turns the rerouting off (MOESERVE_BLAS_GEMV=0): sgemm then only forwards.
 * moeserve_blas_threads optionally picks the thread count per product (below).
 *
 * The shim also defines cblas_dgemm and cblas_cgemm, the other CBLAS symbols MLX's libmlx.so
 * leaves undefined, and forwards them too. That is what lets it stand in front of a BLAS
 * whose symbols carry a prefix, such as the scipy-openblas32 wheel (scipy_cblas_sgemm, ...),
 * which cannot be loaded in MLX's place by itself.
 */
#include <stddef.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*dgemm_fn)(int, int, int, int, int, int, double, const double *, int,
                         const double *, int, double, double *, int);
/* Complex scalars and matrices travel as pointers in CBLAS. */
typedef void (*cgemm_fn)(int, int, int, int, int, int, const void *, const void *, int,
                         const void *, int, const void *, void *, int);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

static sgemm_fn blas_sgemm;
static sgemv_fn blas_sgemv;
static dgemm_fn blas_dgemm;
static cgemm_fn blas_cgemm;
static long forwarded;

void moeserve_blas_bind(void *sgemm, void *sgemv, void *dgemm, void *cgemm) {
  blas_sgemm = (sgemm_fn)sgemm;
  blas_sgemv = (sgemv_fn)sgemv;
  blas_dgemm = (dgemm_fn)dgemm;
  blas_cgemm = (cgemm_fn)cgemm;
}

/* How many calls went to sgemv (tests read it to know the forwarding is live). */
long moeserve_blas_forwarded(void) { return forwarded; }

/* Threads by product size (MOESERVE_BLAS_SPLIT_ROWS): products of at most split_rows rows
 * (decode steps) run on one thread, larger ones (prefill) on all of them. OpenBLAS's threads
 * hand work over by spinning; for a decode-sized product that costs more than it saves, and
 * on a busy machine a spinning thread waits for a core it cannot get (bench/RESULTS.md).
 * MLX makes its BLAS calls from one thread per stream, so the count is switched only when it
 * changes, and a call in flight never sees it change. */
typedef void (*set_threads_fn)(int);
static set_threads_fn blas_set_threads;
static int threads_all, threads_now, split_rows;
static long single_threaded;

void moeserve_blas_threads(void *setter, int all, int rows) {
  blas_set_threads = (set_threads_fn)setter;
  threads_all = threads_now = all;
  split_rows = rows;
}

/* How many products ran on one thread by that rule (tests read it). */
long moeserve_blas_single_threaded(void) { return single_threaded; }

static void choose_threads(int rows) {
  if (blas_set_threads == NULL || split_rows <= 0) return;
  int want = rows <= split_rows ? 1 : threads_all;
  if (want == 1) __atomic_fetch_add(&single_threaded, 1, __ATOMIC_RELAXED);
  if (want != threads_now) {
    blas_set_threads(want);
    threads_now = want;
  }
}

/* With beta == 0 BLAS must ignore what C holds, but sgemv computes beta * y, and MLX hands
 * over uninitialised (possibly NaN) output buffers: clear them first. */
static void clear(float *y, int n, int inc) {
  for (int i = 0; i < n; i++) y[(size_t)i * inc] = 0.0f;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C,
                 int ldc) {
  choose_threads(order == ROW_MAJOR ? M : N);
  if (order == ROW_MAJOR && K > 0 && blas_sgemv != NULL) {
    if (M == 1) {
      /* C[1, N] = alpha * a[K] . op(B)[K, N]: a matrix-vector product with op(B)^T. */
      int inc_a = trans_a == NO_TRANS ? 1 : lda; /* a transposed 1-row A is a column */
      if (beta == 0.0f) clear(C, N, 1);
      if (trans_b == NO_TRANS) /* B is [K, N] */
        blas_sgemv(ROW_MAJOR, TRANS, K, N, alpha, B, ldb, A, inc_a, beta, C, 1);
      else /* B is stored [N, K] */
        blas_sgemv(ROW_MAJOR, NO_TRANS, N, K, alpha, B, ldb, A, inc_a, beta, C, 1);
      __atomic_fetch_add(&forwarded, 1, __ATOMIC_RELAXED);
      return;
    }
    if (N == 1) {
      /* C[M, 1] = alpha * op(A)[M, K] . b[K]; C's column has stride ldc. */
      int inc_b = trans_b == NO_TRANS ? ldb : 1;
      if (beta == 0.0f) clear(C, M, ldc);
      if (trans_a == NO_TRANS) /* A is [M, K] */
        blas_sgemv(ROW_MAJOR, NO_TRANS, M, K, alpha, A, lda, B, inc_b, beta, C, ldc);
      else /* A is stored [K, M] */
        blas_sgemv(ROW_MAJOR, TRANS, K, M, alpha, A, lda, B, inc_b, beta, C, ldc);
      __atomic_fetch_add(&forwarded, 1, __ATOMIC_RELAXED);
      return;
    }
  }
  blas_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_dgemm(int order, int trans_a, int trans_b, int M, int N, int K, double alpha,
                 const double *A, int lda, const double *B, int ldb, double beta, double *C,
                 int ldc) {
  blas_dgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_cgemm(int order, int trans_a, int trans_b, int M, int N, int K, const void *alpha,
                 const void *A, int lda, const void *B, int ldb, const void *beta, void *C,
                 int ldc) {
  blas_cgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
