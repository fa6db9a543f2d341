/* fastrelu CPU kernels: the contract of every op, SIMD dispatch, and the driver.
 *
 * A call is an fr_job: n elements in memory order, element k in channel (k / inner) % C (C = 1,
 * inner = n when nothing is per channel).  fr_run lays it out as either
 *   - "runs": each run of `inner` elements takes its channel's parameter (and bias), the loops
 *     see one constant; sums per channel are register reductions; or
 *   - "rows" (short runs): a periodic pattern of L columns, element k taking column k % L's
 *     parameter; sums per column, folded into channels at the end.
 * It cuts [0, n) into contiguous chunks that threads claim (_threads.h), with boundaries on cache
 * lines so that threads never share a line of output, and adds the per-chunk partial sums in a
 * fixed order (results do not depend on which thread ran what).
 *
 * float16 and bfloat16 are staged through small float32 buffers (they are computed in float32), so
 * each op's loop exists only for float and double; outputs of 64 MiB and more are staged too, and written with
 * non-temporal stores.
 */
#ifndef FASTRELU_KERNELS_H
#define FASTRELU_KERNELS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include "_threads.h"

#if !defined(__x86_64__)
#error "fastrelu's CPU kernels target x86-64"
#endif
#if !defined(__FLT16_MAX__)
#error "fastrelu needs a C compiler with _Float16 support (GCC >= 12 or Clang >= 15)"
#endif

#define FR_CAT_(a, b) a##b
#define FR_CAT(a, b) FR_CAT_(a, b)
#define FR_INLINE inline __attribute__((always_inline))
/* a float's bits, read or written in place of the float (the type may alias it) */
typedef uint32_t __attribute__((may_alias)) fr_bits32;
/* 0, but not a constant to the compiler (see FR_DX) */
int64_t fr_opaque_zero = 0;

/* The constants every backend shares, defined here only: fastrelu._cpu exports them to Python
 * (the argument checks and the GPU kernels use those). */
enum { FR_F16 = 0, FR_F32 = 1, FR_F64 = 2, FR_BF16 = 3 };
/* FR_COPY is the benchmarks' roofline; FR_ELU_FROM_Y is ELU's backward given its output y. */
enum { FR_RELU = 0, FR_LEAKY = 1, FR_ELU = 2, FR_COPY = 3, FR_ELU_FROM_Y = 4, FR_NOPS = 5 };
/* forward flags; FR_WEIGHT (per-channel weights) is a flag of the GPU kernels only: here a
 * weight array's presence says it */
enum { FR_COUNT = 1, FR_BIAS = 2, FR_WEIGHT = 4 };
/* backward sums; FR_SUM_BIAS_WEIGHT: x is PReLU's input before a per-channel bias, whose gradient
 * is summed beside the weight's */
enum { FR_SUM_NONE = 0, FR_SUM_WEIGHT = 1, FR_SUM_GRAD = 2, FR_SUM_BIAS_WEIGHT = 3 };

/* The contract (the README's contract table), evaluated exactly as written: NaN, signed zeros and infinities
 * follow from the comparisons.  p is negative_slope, the PReLU weight, or ELU's alpha.  ELU's
 * backward from its output y: y <= 0 exactly when x <= 0 (alpha >= 0), and y + alpha = alpha*e^x. */
#define FR_Y(op, v, p, T, EXPM1)                                                                \
    ((op) == FR_RELU    ? ((v) < 0 ? (T)0 : (v))                                                \
     : (op) == FR_LEAKY ? ((v) > 0 ? (v) : (v) * (p))                                           \
     : (op) == FR_COPY  ? (v)                                                                   \
                        : ((v) <= 0 ? (p) * EXPM1(v) : (v)))
/* ZERO is +0 computed from g (its bits ANDed with fr_opaque_zero, a zero the compiler cannot
 * see): g is then loaded for both sides of ReLU's select, which AVX-512 code would otherwise fold
 * into a masked load of g, and masked loads stream from memory at about half speed on AMD's Zen 5
 * (relu_backward at STREAM size took twice leaky_relu_backward's time there). */
#define FR_DX(op, v, g, p, T, EXP, ZERO)                                                        \
    ((op) == FR_RELU    ? ((v) <= 0 ? (ZERO) : (g))                                             \
     : (op) == FR_LEAKY ? ((v) > 0 ? (g) : (g) * (p))                                           \
     : (op) == FR_ELU   ? ((v) <= 0 ? (g) * (p) * EXP(v) : (g))                                 \
                        : ((v) <= 0 ? (g) * ((v) + (p)) : (g)))

/* ---- exp and expm1 that vectorize ------------------------------------------------------------
 * ELU evaluates exp/expm1 only where x <= 0, but a vector loop computes both sides of the select,
 * and libm's scalar calls stop the loop from vectorizing.  These are branch-free: x is clamped to
 * [lo, 0] (positive x gives 0 and NaN gives lo: the select discards those), reduced as
 * x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite), and e^r - 1 comes from its Taylor series, to
 * within 2 ulp of the correctly rounded result (tests/test_elu_accuracy.py).  2^n is built in the
 * exponent bits; exp's results below the normal range are scaled in two steps so that subnormal
 * results round once.
 */
#define FR_DEFINE_EXP(T, U, SUFFIX, MANT, BIAS, ROUND, LN2_HI, LN2_LO, LOG2E, EXP_LO, EXPM1_LO,   \
                      TAYLOR)                                                                   \
    static FR_INLINE T fr_pow2##SUFFIX(U n) { /* 2^n for normal results */                        \
        U bits = (n + BIAS) << MANT;                                                            \
        T r;                                                                                    \
        memcpy(&r, &bits, sizeof r);                                                            \
        return r;                                                                               \
    }                                                                                           \
    /* n = round(x / ln2) (as an integer and as T) and r = x - n*ln2, for x in [EXP_LO, 0] */   \
    static FR_INLINE T fr_reduce##SUFFIX(T x, U *n, T *nf) {                                    \
        T shifted = x * LOG2E + ROUND; /* the rounding constant leaves n in the low bits */     \
        U sb, rb;                                                                               \
        T round_ = ROUND;                                                                       \
        memcpy(&sb, &shifted, sizeof sb);                                                       \
        memcpy(&rb, &round_, sizeof rb);                                                        \
        *n = sb - rb;                                                                           \
        *nf = shifted - ROUND;                                                                  \
        return (x - *nf * LN2_HI) - *nf * LN2_LO;                                               \
    }                                                                                           \
    /* e^r - 1 = r * (1 + r/2 + ...), the series by Estrin's scheme: pairs of terms, then pairs \
     * of pairs (with r^2, r^4, r^8), so that its dependency chain is 4 steps deep, not one step   \
     * a term as in Horner's, and a vector loop is not bound by that chain's latency (the fully   \
     * unrolled loops fold every condition away; up to 16 terms) */                             \
    static FR_INLINE T fr_expm1_reduced##SUFFIX(T r) {                                          \
        static const T c[] = TAYLOR;                                                            \
        const int terms = (int)(sizeof c / sizeof c[0]);                                        \
        T p[16], power = r;                                                                     \
        _Pragma("GCC unroll 16")                                                                \
        for (int i = 0; i < 16; i++) p[i] = i < terms ? c[terms - 1 - i] : 0; /* lowest first */ \
        _Pragma("GCC unroll 4")                                                                 \
        for (int level = 0, m = terms; level < 4; level++, m = (m + 1) / 2, power *= power)     \
            _Pragma("GCC unroll 8")                                                             \
            for (int i = 0; i < 8; i++)                                                         \
                if (2 * i < m)                                                                  \
                p[i] = 2 * i + 1 < m ? p[2 * i] + p[2 * i + 1] * power : p[2 * i];              \
        return r * p[0];                                                                        \
    }                                                                                           \
    static FR_INLINE T fr_exp##SUFFIX(T x) {                                                    \
        T t = x > 0 ? 0 : x > EXP_LO ? x : EXP_LO, nf;                                          \
        U n;                                                                                    \
        T r = fr_reduce##SUFFIX(t, &n, &nf);                                                    \
        T er = fr_expm1_reduced##SUFFIX(r) + 1;                                                 \
        U half = n >> 1; /* two normal factors, so results below the normal range round once */ \
        return er * fr_pow2##SUFFIX(half) * fr_pow2##SUFFIX(n - half);                          \
    }                                                                                           \
    static FR_INLINE T fr_expm1##SUFFIX(T x) {                                                  \
        T t = x > 0 ? 0 : x > EXPM1_LO ? x : EXPM1_LO, nf;                                      \
        U n;                                                                                    \
        T r = fr_reduce##SUFFIX(t, &n, &nf);                                                    \
        T em1 = fr_expm1_reduced##SUFFIX(r), scale = fr_pow2##SUFFIX(n);                        \
        /* n == 0 keeps e^r - 1 itself, so tiny and signed-zero x come out exact */              \
        return n == 0 ? em1 : scale * em1 + (scale - 1);                                        \
    }

/* Taylor coefficients of (e^r - 1)/r = 1 + r/2! + r^2/3! + ..., highest first */
#define FR_TAYLOR_F32                                                                           \
    { 1.0f / 40320, 1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 1.0f / 2, 1.0f }
#define FR_TAYLOR_F64                                                                           \
    { 1.0 / 1307674368000.0, 1.0 / 87178291200.0, 1.0 / 6227020800.0, 1.0 / 479001600.0,          \
      1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0,             \
      1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 1.0 / 2.0, 1.0 }

/* ln2 = LN2_HI + LN2_LO, both positive so that r keeps the sign of a zero x; LN2_HI has trailing
 * zero bits, so n * LN2_HI is exact.  e^-104 and e^-745.2 round to 0; e^-20 - 1 and e^-40 - 1 to -1. */
FR_DEFINE_EXP(float, int32_t, f, 23, 127, 12582912.0f, 6.9314575195e-01f, 1.4286067653e-06f,
              1.44269504088896341f, -104.0f, -20.0f, FR_TAYLOR_F32)
FR_DEFINE_EXP(double, int64_t, d, 52, 1023, 6755399441055744.0, 6.93147180369123816490e-01,
              1.90821492927058770002e-10, 1.44269504088896338700e+00, -745.2, -40.0,
              FR_TAYLOR_F64)

typedef struct {
    int64_t (*fwd_flat[FR_NOPS])(const void *x, void *y, ptrdiff_t n, double p, double b,
                                 int flags);
    double (*bwd_flat[FR_NOPS])(const void *g, const void *x, void *dx, ptrdiff_t n, double p,
                                double b, int sum, double *bias_sum);
    /* counts: in lanes as wide as the compute type's (int32 for float, int64 for double) */
    void (*fwd_rows[FR_NOPS])(const void *x, void *y, ptrdiff_t n, ptrdiff_t L, ptrdiff_t j0,
                              const void *pw, const void *pb, void *counts);
    void (*bwd_rows[FR_NOPS])(const void *g, const void *x, void *dx, ptrdiff_t n, ptrdiff_t L,
                              ptrdiff_t j0, const void *pw, const void *pb, double *sums,
                              double *bias_sums, int sum);
} fr_loops;

typedef struct {
    const char *name;
    fr_loops f32, f64;
    void (*half_to_float)(const void *src, float *dst, ptrdiff_t n);
    void (*float_to_half)(const float *src, void *dst, ptrdiff_t n);
    void (*bf16_to_float)(const void *src, float *dst, ptrdiff_t n);
    void (*float_to_bf16)(const float *src, void *dst, ptrdiff_t n);
    void (*stream_copy)(char *dst, const char *src, size_t nbytes);
} fr_isa;

/* The same loops for three instruction sets.  The baseline's half conversions are the
 * compiler's _Float16 casts; the SIMD levels convert 16 or 8 lanes at a time.  stream_copy writes
 * with non-temporal stores, which skip reading the destination's cache lines before overwriting
 * them (write-allocate): a third less memory traffic for outputs far larger than the caches. */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define FR_ISA avx512
/* PReLU backward on rows, float32, Intel Xeon: 0.85x the time at 10^6 on two threads and 0.93x on
 * one with the weight sums grouped; on AVX2, whose float64 conversions take twice the
 * instructions, the grouped sums loop is compute-bound on its own, 1.17x on one thread */
#define FR_GROUP_WEIGHTS 1
#include "_loops.h"
#undef FR_GROUP_WEIGHTS
#undef FR_ISA
static void fr_half_to_float_avx512(const void *src, float *dst, ptrdiff_t n) {
    const uint16_t *s = src;
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i))));
    for (; i < n; i++) dst[i] = (float)((const _Float16 *)src)[i];
}
static void fr_float_to_half_avx512(const float *src, void *dst, ptrdiff_t n) {
    uint16_t *d = dst;
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(d + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) ((_Float16 *)dst)[i] = (_Float16)src[i];
}
static void fr_stream_copy_avx512(char *dst, const char *src, size_t nbytes) {
    size_t head = (size_t)(-(uintptr_t)dst & 63), i;
    head = head < nbytes ? head : nbytes;
    memcpy(dst, src, head);
    for (i = head; i + 64 <= nbytes; i += 64)
        _mm512_stream_si512((void *)(dst + i), _mm512_loadu_si512((const void *)(src + i)));
    memcpy(dst + i, src + i, nbytes - i);
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FR_ISA avx2
#define FR_GROUP_WEIGHTS 0
#include "_loops.h"
#undef FR_GROUP_WEIGHTS
#undef FR_ISA
static void fr_half_to_float_avx2(const void *src, float *dst, ptrdiff_t n) {
    const uint16_t *s = src;
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    for (; i < n; i++) dst[i] = (float)((const _Float16 *)src)[i];
}
static void fr_float_to_half_avx2(const float *src, void *dst, ptrdiff_t n) {
    uint16_t *d = dst;
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) ((_Float16 *)dst)[i] = (_Float16)src[i];
}
static void fr_stream_copy_avx2(char *dst, const char *src, size_t nbytes) {
    size_t head = (size_t)(-(uintptr_t)dst & 31), i;
    head = head < nbytes ? head : nbytes;
    memcpy(dst, src, head);
    for (i = head; i + 32 <= nbytes; i += 32)
        _mm256_stream_si256((__m256i *)(dst + i), _mm256_loadu_si256((const __m256i *)(src + i)));
    memcpy(dst + i, src + i, nbytes - i);
}
#pragma GCC pop_options

#define FR_ISA baseline
#define FR_GROUP_WEIGHTS 0
#include "_loops.h"
#undef FR_GROUP_WEIGHTS
#undef FR_ISA
static void fr_half_to_float_baseline(const void *src, float *dst, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i++) dst[i] = (float)((const _Float16 *)src)[i];
}
static void fr_float_to_half_baseline(const float *src, void *dst, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i++) ((_Float16 *)dst)[i] = (_Float16)src[i];
}
static void fr_stream_copy_baseline(char *dst, const char *src, size_t nbytes) {
    size_t head = (size_t)(-(uintptr_t)dst & 15), i;
    head = head < nbytes ? head : nbytes;
    memcpy(dst, src, head);
    for (i = head; i + 16 <= nbytes; i += 16)
        _mm_stream_si128((__m128i *)(dst + i), _mm_loadu_si128((const __m128i *)(src + i)));
    memcpy(dst + i, src + i, nbytes - i);
}

enum { FR_ISA_BASELINE = 0, FR_ISA_AVX2 = 1, FR_ISA_AVX512 = 2 };
static const fr_isa fr_isas[3] = {
    {"baseline", loops_f32_baseline, loops_f64_baseline, fr_half_to_float_baseline,
     fr_float_to_half_baseline, fr_bf16_to_float_baseline, fr_float_to_bf16_baseline,
     fr_stream_copy_baseline},
    {"avx2", loops_f32_avx2, loops_f64_avx2, fr_half_to_float_avx2, fr_float_to_half_avx2,
     fr_bf16_to_float_avx2, fr_float_to_bf16_avx2, fr_stream_copy_avx2},
    {"avx512", loops_f32_avx512, loops_f64_avx512, fr_half_to_float_avx512,
     fr_float_to_half_avx512, fr_bf16_to_float_avx512, fr_float_to_bf16_avx512,
     fr_stream_copy_avx512},
};
static const fr_isa *fr_isa_in_use = &fr_isas[FR_ISA_BASELINE];

static int fr_isa_supported(int level) {
    __builtin_cpu_init();
    if (level >= FR_ISA_AVX512 &&
        !(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")))
        return 0;
    if (level >= FR_ISA_AVX2 && !(__builtin_cpu_supports("avx2") &&
                                  __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
        return 0;
    return 1;
}

/* Picks the best level the CPU supports, at most `cap` (cap < 0: no cap). */
static int fr_select_isa(int cap) {
    int level = FR_ISA_AVX512;
    if (cap >= 0 && cap < level) level = cap;
    while (level > FR_ISA_BASELINE && !fr_isa_supported(level)) level--;
    fr_isa_in_use = &fr_isas[level];
    return level;
}

static const char *fr_isa_name(void) { return fr_isa_in_use->name; }

/* Outputs at least this large are written with non-temporal stores: they cannot stay in cache
 * anyway, and skipping write-allocate saves a third of the memory traffic. */
#ifndef FR_STREAM_MIN_BYTES
#define FR_STREAM_MIN_BYTES ((size_t)64 << 20)
#endif

/* ---- one share: type dispatch, float16 and streaming stages ------------------------------- */

/* Elements per staged step (float16, streamed outputs): buffers in L1.  Short stages keep reads
 * and streamed writes overlapping: on Zen 5, stages of 4096 elements took 1.3x the time of 1024
 * at STREAM size. */
#define FR_STAGE 1024

static size_t fr_itemsize(int dt) { return dt == FR_F16 || dt == FR_BF16 ? 2 : dt == FR_F32 ? 4 : 8; }

/* Element c of parameters in the compute type: float, or double for float64. */
static double fr_param(int dt, const void *pw, ptrdiff_t c) {
    return dt == FR_F64 ? ((const double *)pw)[c] : ((const float *)pw)[c];
}

/* Stores v, rounded once, as element c of an array of dtype dt. */
static void fr_store(int dt, void *a, ptrdiff_t c, double v) {
    if (dt == FR_F64)
        ((double *)a)[c] = v;
    else if (dt == FR_F32)
        ((float *)a)[c] = (float)v;
    else if (dt == FR_BF16) {
        /* rounded once: to float32 by rounding to odd (toward zero, the last bit set when
         * inexact), which keeps the bits that decide bfloat16's rounding to nearest even */
        float f = (float)v;
        if (f - f == 0 && (double)f != v) {
            uint32_t u;
            memcpy(&u, &f, sizeof u);
            if (fabs((double)f) > fabs(v)) u -= 1;
            u |= 1;
            memcpy(&f, &u, sizeof f);
        }
        fr_float_to_bf16_baseline(&f, (uint16_t *)a + c, 1);
    } else
        ((_Float16 *)a)[c] = (_Float16)v;
}

/* One call of an op.  The caller fills the first group; fr_run fills the rest. */
typedef struct {
    int dt, op, backward;
    const char *g, *x; /* g: the incoming gradient (backward only) */
    char *y;           /* the output: y, or dx */
    ptrdiff_t n;
    ptrdiff_t C, inner; /* n = outer * C * inner; element k is in channel (k / inner) % C */
    double p;           /* the parameter of every element, when pw is NULL */
    const void *pw;     /* C parameters in the compute type (float; double for float64), or NULL */
    const void *bias;   /* C values added to x first (y = op(x + b)), or NULL; in a backward,
                           with FR_SUM_BIAS_WEIGHT only */
    int64_t *counts;    /* forward: C counts of x (+ b) > 0, or NULL */
    int sum;            /* backward: what param_grad sums per channel:                        */
    void *param_grad;   /* FR_SUM_WEIGHT: x > 0 ? 0 : x * g (PReLU); FR_SUM_GRAD: dx (a bias), */
                        /* in dtype dt; or NULL                                                 */
    void *bias_grad;    /* FR_SUM_BIAS_WEIGHT: the sums of dx (x + b's gradient), in dtype dt;  */
                        /* param_grad then has C sums, or one when the weight is shared (p)   */

    int stream;         /* write the output with non-temporal stores */
    ptrdiff_t L;        /* 0: runs layout; else the rows layout's period */
    const void *pw_row; /* rows layout: the parameter of each column */
    const void *pb_row; /* rows layout: the bias of each column, or NULL */
} fr_job;

/* PReLU after a bias with one shared weight (p, no pw): the bias is per channel, the weight's
 * gradient one sum. */
static int fr_shared_weight_sum(const fr_job *job) {
    return job->backward && job->sum == FR_SUM_BIAS_WEIGHT && !job->pw;
}

static int fr_want_sums(const fr_job *job) {
    return job->backward ? job->param_grad != NULL && job->sum != FR_SUM_NONE
                         : job->counts != NULL;
}

typedef struct {
    int64_t count; /* forward: elements > 0 */
    double wsum;   /* backward: the sum param_grad takes (x*g over elements not > 0, or dx) */
    double bsum;   /* backward, FR_SUM_BIAS_WEIGHT: the sum of dx */
} fr_sum;

/* m contiguous elements already in the compute type.  Runs layout: all take p, and the sum is
 * returned when `want_sum`; rows: the first is column col, and sums go to row_sums if not NULL. */
static fr_sum fr_run_native(const fr_job *job, const fr_loops *loops, const void *g,
                            const void *x, void *y, ptrdiff_t m, double p, double b,
                            ptrdiff_t col, int want_sum, void *row_sums, double *row_bias_sums) {
    fr_sum r = {0};
    const int flags = (want_sum ? FR_COUNT : 0) | (job->bias ? FR_BIAS : 0);
    const int sum = want_sum || row_sums ? job->sum : FR_SUM_NONE;
    if (!job->L && !job->backward)
        r.count = loops->fwd_flat[job->op](x, y, m, p, b, flags);
    else if (!job->L)
        r.wsum = loops->bwd_flat[job->op](g, x, y, m, p, b, sum, &r.bsum);
    else if (!job->backward)
        loops->fwd_rows[job->op](x, y, m, job->L, col, job->pw_row, job->pb_row, row_sums);
    else
        loops->bwd_rows[job->op](g, x, y, m, job->L, col, job->pw_row, job->pb_row, row_sums,
                                 row_bias_sums, sum);
    return r;
}

/* n contiguous elements from element `at`.  Runs in place on the arrays, or in stages through
 * buffers in cache: float16 is converted to float32 and back, and streamed outputs are computed
 * into a buffer and then written with non-temporal stores. */
static fr_sum fr_run_stretch(const fr_job *job, ptrdiff_t at, ptrdiff_t n, double p, double b,
                             int want_sum, void *row_sums, double *row_bias_sums) {
    const fr_isa *isa = fr_isa_in_use;
    const size_t isz = fr_itemsize(job->dt);
    /* float16 and bfloat16 are computed in float32, converted in stages */
    const int half = job->dt == FR_F16 || job->dt == FR_BF16;
    void (*to_float)(const void *, float *, ptrdiff_t) =
        job->dt == FR_BF16 ? isa->bf16_to_float : isa->half_to_float;
    void (*from_float)(const float *, void *, ptrdiff_t) =
        job->dt == FR_BF16 ? isa->float_to_bf16 : isa->float_to_half;
    const fr_loops *loops = job->dt == FR_F64 ? &isa->f64 : &isa->f32;
    const char *g = job->g ? job->g + at * isz : NULL, *x = job->x + at * isz;
    char *y = job->y + at * isz;
    const ptrdiff_t col = job->L ? at % job->L : 0;
    if (!half && !job->stream)
        return fr_run_native(job, loops, g, x, y, n, p, b, col, want_sum, row_sums,
                             row_bias_sums);
    float gbuf[FR_STAGE], xbuf[FR_STAGE];
    _Alignas(64) char ybuf[FR_STAGE * sizeof(double) + 64];
    const ptrdiff_t stage = FR_STAGE;
    fr_sum total = {0};
    /* stages after the first start on a cache line of the output, so that streamed stores never
     * share a line with ordinary ones */
    const ptrdiff_t first = stage - (ptrdiff_t)(((uintptr_t)y & 63) / isz);
    for (ptrdiff_t s = 0, m; s < n; s += m) {
        m = s == 0 ? first : stage;
        m = n - s < m ? n - s : m;
        const void *gs = g ? g + s * isz : NULL, *xs = x + s * isz;
        /* the staged output sits at the destination's offset within a cache line, so that the
         * non-temporal copy's loads are aligned like its stores */
        char *ystage = ybuf + ((uintptr_t)(y + s * isz) & 63);
        void *ys = job->stream ? (void *)ystage : (void *)(y + s * isz);
        if (half) {
            if (g) to_float(gs, gbuf, m);
            to_float(xs, xbuf, m);
            gs = gbuf, xs = xbuf;
        }
        /* a half result is computed over its input in xbuf, then narrowed */
        fr_sum r = fr_run_native(job, loops, gs, xs, half ? xbuf : ys, m, p, b,
                                 job->L ? (col + s) % job->L : 0, want_sum, row_sums,
                                 row_bias_sums);
        total.wsum += r.wsum;
        total.bsum += r.bsum;
        total.count += r.count;
        if (half) from_float(xbuf, ys, m);
        if (job->stream) isa->stream_copy(y + s * isz, ystage, (size_t)m * isz);
    }
    return total;
}

/* int32 lanes count at most this many rows before they are added into the int64 sums */
#define FR_LANE_ROWS ((ptrdiff_t)1 << 30)

/* The lanes' counts into sums: stored (the first block; sums need no zeroing then) or added,
 * then zeroed again when more blocks follow. */
static void fr_add_lanes(int64_t *restrict sums, int32_t *restrict lanes, ptrdiff_t n, int first,
                         int more) {
    if (first)
        for (ptrdiff_t j = 0; j < n; j++) sums[j] = lanes[j];
    else
        for (ptrdiff_t j = 0; j < n; j++) sums[j] += lanes[j];
    if (more) memset(lanes, 0, (size_t)n * sizeof *lanes);
}

/* Elements [a, b) of the job; sums (and bias_sums, for FR_SUM_BIAS_WEIGHT): this chunk's
 * partials, or NULL.  lanes: L zeroed int32 counts, with which a forward in the rows layout on
 * float data counts before adding into sums, or NULL. */
static void fr_run_share(const fr_job *job, ptrdiff_t a, ptrdiff_t b, void *sums,
                         double *bias_sums, int32_t *lanes) {
    if (job->L) {
        for (ptrdiff_t at = a, end; at < b; at = end) {
            end = lanes && b - at > FR_LANE_ROWS * job->L ? at + FR_LANE_ROWS * job->L : b;
            fr_run_stretch(job, at, end - at, 0.0, 0.0, 0, lanes ? (void *)lanes : sums,
                           bias_sums);
            if (lanes) fr_add_lanes(sums, lanes, job->L, at == a, end < b);
        }
        return;
    }
    for (ptrdiff_t pos = a; pos < b;) { /* one run of `inner` elements of channel c at a time */
        ptrdiff_t run = pos / job->inner, c = run % job->C;
        ptrdiff_t end = (run + 1) * job->inner < b ? (run + 1) * job->inner : b;
        double p = job->pw ? fr_param(job->dt, job->pw, c) : job->p;
        double bias = job->bias ? fr_param(job->dt, job->bias, c) : 0.0;
        fr_sum r = fr_run_stretch(job, pos, end - pos, p, bias, sums != NULL, NULL, NULL);
        if (bias_sums) bias_sums[c] += r.bsum;
        if (sums && job->backward)
            ((double *)sums)[c] += r.wsum;
        else if (sums)
            ((int64_t *)sums)[c] += r.count;
        pos = end;
    }
}

/* row[from:to] = v in the compute type of dt. */
static void fr_fill(int dt, char *row, ptrdiff_t from, ptrdiff_t to, double v) {
    const float f = (float)v;
    for (ptrdiff_t i = from; i < to; i++) {
        if (dt == FR_F64)
            ((double *)row)[i] = v;
        else
            ((float *)row)[i] = f;
    }
}

/* The first C * inner columns of a rows layout's row, in the compute type: each channel's value
 * (per_channel: C values in the compute type) repeated `inner` times, or p in every column. */
static void fr_fill_row(int dt, char *row, const void *per_channel, double p, ptrdiff_t C,
                        ptrdiff_t inner) {
    if (!per_channel)
        fr_fill(dt, row, 0, C * inner, p);
    else if (inner == 1)
        memcpy(row, per_channel, (size_t)C * (dt == FR_F64 ? sizeof(double) : sizeof(float)));
    else
        for (ptrdiff_t c = 0; c < C; c++)
            fr_fill(dt, row, c * inner, (c + 1) * inner, fr_param(dt, per_channel, c));
}

/* Partial sums are float64 (backward) or int64 counts (forward): each loop below is written once
 * for both. */
#define FR_SUMS(backward, LOOP)                                                                 \
    do {                                                                                        \
        if (backward) {                                                                         \
            typedef double T;                                                                   \
            LOOP;                                                                               \
        } else {                                                                                \
            typedef int64_t T;                                                                  \
            LOOP;                                                                               \
        }                                                                                       \
    } while (0)

/* dst[j] += src[j] for n partial sums. */
static void fr_fold(int backward, char *dst, const char *src, size_t n) {
    FR_SUMS(backward, for (size_t j = 0; j < n; j++) ((T *)dst)[j] += ((const T *)src)[j]);
}

/* sums[c] = the sum of sums[c * inner + i] for i < inner, in place (every read of a channel's
 * columns comes before the write over any of them). */
static void fr_channel_sums(int backward, char *sums, ptrdiff_t C, ptrdiff_t inner) {
    FR_SUMS(backward, for (ptrdiff_t c = 0; c < C; c++) {
        T total = 0;
        for (ptrdiff_t i = c * inner; i < (c + 1) * inner; i++) total += ((const T *)sums)[i];
        ((T *)sums)[c] = total;
    });
}
#undef FR_SUMS

/* Adds up a region of partial sums, `len` for each chunk, `stride` slots apart: every chunk's,
 * and in rows every copy of the period, in a fixed order into the first period; then each
 * channel's columns.  Returns the C totals. */
static const char *fr_total(const fr_job *job, char *sums, int chunks, size_t stride,
                            size_t len) {
    const size_t width = job->L ? (size_t)job->C * (size_t)job->inner : (size_t)job->C;
    for (int c = 0; c < chunks; c++)
        for (size_t part = c ? 0 : width; part < len; part += width)
            fr_fold(job->backward, sums, sums + (c * stride + part) * 8, width);
    if (job->L && job->inner > 1) fr_channel_sums(job->backward, sums, job->C, job->inner);
    return sums;
}

/* C float64 totals into an array of dtype dt, each rounded once. */
static void fr_store_sums(int dt, void *dst, const char *totals, ptrdiff_t C) {
    if (dt == FR_F64)
        memcpy(dst, totals, (size_t)C * sizeof(double));
    else
        for (ptrdiff_t c = 0; c < C; c++) fr_store(dt, dst, c, ((const double *)totals)[c]);
}

/* Channel runs of at least FR_MIN_RUN elements are walked one run at a time, each with its own
 * parameter (the runs layout).  Shorter runs would spend more on the per-run call than on the data,
 * so they are laid out as rows of C * inner columns, with one parameter per column read alongside
 * the data, unless a row's parameters would outgrow the caches (FR_MAX_ROW).  Rows are repeated
 * to at least FR_MIN_ROW columns and a multiple of 16, so that the vector loops over a row rarely
 * end in a scalar tail, but no further than the data reaches: a short call would spend more on
 * the longer row's parameters and sums than on its data. */
#define FR_MIN_RUN 256
#define FR_MIN_ROW 256
#define FR_MAX_ROW ((ptrdiff_t)1 << 20)

/* Chunks per thread: a thread the OS deschedules mid-chunk keeps the others waiting for at most
 * one chunk, and the caller takes over the chunks of a thread that never starts. */
#define FR_CHUNKS_PER_THREAD 8

/* How many chunks a job of n elements on nt threads is cut into: a function of n, nt and the
 * partial sums' length only, so that its sums (added chunk by chunk, in order) never depend on
 * which thread ran what.  Chunks hold at least FR_PARALLEL_MIN_ELEMENTS / 2 elements, and their
 * partial sums (sum_len each) stay small beside the data they sum. */
static int fr_chunks_for(ptrdiff_t n, int nt, size_t sum_len) {
    if (nt <= 1) return 1;
    ptrdiff_t chunks = (ptrdiff_t)nt * FR_CHUNKS_PER_THREAD;
    const ptrdiff_t by_size = n / (FR_PARALLEL_MIN_ELEMENTS / 2);
    chunks = by_size < chunks ? by_size : chunks;
    if (sum_len) {
        const ptrdiff_t by_sums = n / (16 * (ptrdiff_t)sum_len);
        chunks = by_sums < chunks ? by_sums : chunks;
    }
    chunks = chunks < nt ? nt : chunks / nt * nt; /* whole rounds: every thread as many */
    return chunks < FR_MAX_CHUNKS ? (int)chunks : FR_MAX_CHUNKS;
}

/* Rows too few to give every thread two chunks, each with a row of partial sums, are cut into
 * stripes of columns instead, each run down every row by one chunk, into the one row of sums; on
 * one thread, rows so long that their parameters and sums would not stay in cache from one row to
 * the next.  With more rows, whole rows a chunk are faster: stripes' strided stretches slow the
 * prefetch (stripes of 256 columns took 1.8-2x the time at 10^6 elements in rows of 4096).
 * Returns the number of stripes (a multiple of the threads, at least FR_MIN_STRIPE columns and at
 * most FR_STRIPE_COLS where the rows allow), or 0 to cut whole rows. */
#define FR_STRIPE_COLS 8192
#define FR_MIN_STRIPE 1024
static int fr_stripes_for(ptrdiff_t n, ptrdiff_t L, int nt) {
    if (n / (16 * L) >= 2 * (ptrdiff_t)nt) return 0;
    const ptrdiff_t most = (ptrdiff_t)nt * FR_CHUNKS_PER_THREAD;
    const ptrdiff_t cached = (L + FR_STRIPE_COLS - 1) / FR_STRIPE_COLS, wide = L / FR_MIN_STRIPE;
    ptrdiff_t stripes = nt == 1 ? 1 : (wide < most ? wide : most) / nt * nt;
    stripes = cached > stripes ? cached : stripes;
    if (stripes < 2 || stripes < nt) return 0;
    return stripes < FR_MAX_CHUNKS ? (int)stripes : FR_MAX_CHUNKS;
}

typedef struct {
    const fr_job *job;
    int chunks;
    int striped;   /* chunks are stripes of columns, sharing one row of sums (fr_stripes_for) */
    char *sums;    /* each chunk's partial sums (len 8-byte slots, stride apart), or NULL */
    size_t len, stride;
    size_t region; /* bytes of one region: the bias gradient's partials follow the first */
    int with_bias_grad;
    int32_t *lanes; /* each chunk's len int32 counts (see fr_run_share), stride apart, or NULL */
    /* every chunk zeroes its own sums and lanes */
} fr_split;

/* Columns [c0, c1) of every row; sums, bias_sums and lanes: the whole row's. */
static void fr_run_stripe(const fr_job *job, ptrdiff_t c0, ptrdiff_t c1, void *sums,
                          double *bias_sums, int32_t *lanes) {
    for (ptrdiff_t row = 0; row < job->n; row += job->L) {
        const ptrdiff_t end = row + c1 < job->n ? row + c1 : job->n;
        if (row + c0 < end)
            fr_run_stretch(job, row + c0, end - row - c0, 0.0, 0.0, 0,
                           lanes ? (void *)lanes : sums, bias_sums);
    }
    if (lanes) fr_add_lanes((int64_t *)sums + c0, lanes + c0, c1 - c0, 1, 0);
}

static void fr_run_chunk(void *arg, int chunk) {
    const fr_split *split = arg;
    const fr_job *job = split->job;
    ptrdiff_t a, b;
    if (split->striped) { /* this stripe's columns of the one row of sums, zeroed here */
        fr_share(job->L, chunk, split->chunks, &a, &b);
        char *sums = split->sums;
        if (split->lanes)
            memset(split->lanes + a, 0, (size_t)(b - a) * 4);
        else if (sums)
            memset(sums + a * 8, 0, (size_t)(b - a) * 8);
        double *bias_sums = split->with_bias_grad ? (double *)(sums + split->region) : NULL;
        if (bias_sums) memset(bias_sums + a, 0, (size_t)(b - a) * 8);
        fr_run_stripe(job, a, b, sums, bias_sums, split->lanes);
        if (job->stream) _mm_sfence();
        return;
    }
    fr_share(job->n, chunk, split->chunks, &a, &b);
    char *mine = NULL, *bias_sums = NULL;
    int32_t *lanes = NULL;
    if (split->sums) { /* zeroed here, by the thread that writes them */
        mine = split->sums + (size_t)chunk * split->stride * 8;
        memset(mine, 0, split->len * 8);
        if (split->with_bias_grad) memset(bias_sums = mine + split->region, 0, split->len * 8);
        if (split->lanes)
            memset(lanes = split->lanes + (size_t)chunk * split->stride, 0, split->len * 4);
    }
    fr_run_share(job, a, b, mine, (double *)bias_sums, lanes);
    if (job->stream) _mm_sfence(); /* streamed stores are visible before the call returns */
}

/* Runs a job on the right number of threads.  Returns 0, or -1 when memory for the rows layout or
 * the per-chunk partial sums could not be allocated (nothing is written then). */
static int fr_run(fr_job *job) {
    const int dt = job->dt, want = fr_want_sums(job);
    const size_t csz = dt == FR_F64 ? sizeof(double) : sizeof(float); /* compute type */
    job->stream = (size_t)job->n * fr_itemsize(dt) >= FR_STREAM_MIN_BYTES;
    job->L = 0;
    job->pw_row = job->pb_row = NULL;
    const int with_bias_grad = job->backward && want && job->sum == FR_SUM_BIAS_WEIGHT;
    if (job->n == 0) {
        if (job->counts) memset(job->counts, 0, (size_t)job->C * sizeof(int64_t));
        if (want && job->backward) {
            const int shared = fr_shared_weight_sum(job); /* a sum over no units at all is 0 too */
            if (shared) fr_store(dt, job->param_grad, 0, 0.0);
            for (ptrdiff_t c = 0; c < job->C; c++) {
                if (!shared) fr_store(dt, job->param_grad, c, 0.0);
                if (with_bias_grad) fr_store(dt, job->bias_grad, c, 0.0);
            }
        }
        return 0;
    }
    if (job->C == 1) job->inner = job->n; /* one channel: a single run, whatever the shape */
    const ptrdiff_t period = job->C * job->inner;
    char *rows = NULL; /* the rows layout's parameters and biases that need a row of their own */
    /* runs of one element are rows however many channels: their parameters are read as they
     * are, and a run per element would cost a call per element */
    if ((job->pw || job->bias || want) && job->inner < FR_MIN_RUN &&
        (period <= FR_MAX_ROW || job->inner == 1)) {
        ptrdiff_t L = period; /* repeated no further than the data, nor FR_MAX_ROW, reach */
        while ((L % 16 || L < FR_MIN_ROW) && L + period <= job->n && L + period <= FR_MAX_ROW)
            L += period;
        /* one parameter per column already: C values, one per channel, not repeated */
        const int as_is = job->inner == 1 && L == period;
        const void *per_channel[2] = {job->pw, job->bias};
        const void **row_of[2] = {&job->pw_row, &job->pb_row};
        const int parts = job->bias ? 2 : 1;
        int built = 0;
        for (int part = 0; part < parts; part++)
            built += !(as_is && per_channel[part]);
        if (built && !(rows = malloc((size_t)L * csz * (size_t)built))) return -1;
        for (int part = 0, b = 0; part < parts; part++) {
            if (as_is && per_channel[part]) {
                *row_of[part] = per_channel[part];
                continue;
            }
            char *row = rows + (size_t)(b++) * (size_t)L * csz;
            fr_fill_row(dt, row, per_channel[part], job->p, job->C, job->inner);
            for (ptrdiff_t j = period; j < L; j += period) /* copies of the first period */
                memcpy(row + (size_t)j * csz, row, (size_t)period * csz);
            *row_of[part] = row;
        }
        job->L = L;
    }
    /* per-chunk sums, 8 bytes a column (rows) or channel (runs) */
    const size_t len = job->L ? (size_t)job->L : (size_t)job->C;
    const int nt = fr_threads_for(job->n);
    const int stripes = want && job->L ? fr_stripes_for(job->n, job->L, nt) : 0;
    const int chunks = stripes ? stripes : fr_chunks_for(job->n, nt, want ? len : 0);
    const int copies = stripes ? 1 : chunks; /* rows of partial sums */
    /* one region of partial sums (two with a bias gradient), each holding every copy; then,
     * for counts over rows of float data, every copy's int32 lanes.  Each chunk's sums start on
     * a cache line of their own: threads running neighbouring chunks write them at every element,
     * and a shared line would bounce between their cores (16 slots: a line of int32 lanes;
     * stripes are 64 columns apart). */
    const size_t stride = (len + 15) / 16 * 16;
    const size_t region = (size_t)copies * stride * 8;
    const size_t lane_bytes = want && !job->backward && job->L && dt != FR_F64 ? region / 2 : 0;
    /* one copy of the counts, one column a channel: gathered in the counts themselves (the caller's
     * new array), with no memory of their own to fault in and copy */
    const int direct = want && !job->backward && copies == 1 && len == (size_t)job->C;
    const size_t own_bytes = direct ? lane_bytes : region * (with_bias_grad ? 2 : 1) + lane_bytes;
    char *own = NULL;
    if (want && own_bytes && !(own = aligned_alloc(64, own_bytes))) {
        free(rows);
        return -1;
    }
    char *sums = direct ? (char *)job->counts : own;
    fr_split split = {job, chunks, stripes > 0, sums, len, stride, region, with_bias_grad,
                      lane_bytes ? (int32_t *)(direct ? own : own + region) : NULL};
    fr_parallel(nt, chunks, fr_run_chunk, &split);
    if (sums && !job->backward) {
        if (!direct)
            memcpy(job->counts, fr_total(job, sums, copies, stride, len),
                   (size_t)job->C * sizeof(int64_t));
    } else if (sums) {
        if (fr_shared_weight_sum(job)) { /* the channels' sums, added in float64 */
            const double *totals = (const double *)fr_total(job, sums, copies, stride, len);
            double all = 0.0;
            for (ptrdiff_t c = 0; c < job->C; c++) all += totals[c];
            fr_store(dt, job->param_grad, 0, all);
        } else
            fr_store_sums(dt, job->param_grad, fr_total(job, sums, copies, stride, len), job->C);
        if (with_bias_grad)
            fr_store_sums(dt, job->bias_grad, fr_total(job, sums + region, copies, stride, len),
                          job->C);
    }
    free(own);
    free(rows);
    return 0;
}

#endif /* FASTRELU_KERNELS_H */
