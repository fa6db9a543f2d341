/* The contiguous inner loops, written once.
 *
 * _kernels.h includes this file once per instruction set, with FR_ISA naming it, FR_GROUP_WEIGHTS
 * saying whether its backward gathers weight sums in groups of rows, and `#pragma GCC target`
 * set, so that the same source is compiled for AVX-512, AVX2 and the x86-64 baseline.  The file
 * then includes itself once per element type (float, double) to define the loops for FR_T.  Each loop is an always-inline template whose `op` and flag arguments are
 * compile-time constants at every instantiation, so each op gets its own branch-free loop.
 *
 * "flat" loops give every element the same parameter p; "rows" loops give element k the
 * parameter pw[(j0 + k) % L] (PReLU weights along rows, or one parameter per unit) and may gather
 * per-column sums.  Statistics and weight gradients are gathered in the same pass.
 */
#ifndef FR_T

/* bfloat16 is the top half of a float32: widening shifts the bits up; narrowing rounds to nearest
 * even (adding 0x7FFF plus the lowest kept bit carries exactly when the dropped half is more than
 * half way, or half way with an odd kept half), and a NaN stays a NaN (quieted, sign kept).
 * Plain loops: the target of the including ISA vectorizes them. */
static void FR_CAT(fr_bf16_to_float_, FR_ISA)(const void *src, float *dst, ptrdiff_t n) {
    const uint16_t *s = src;
    fr_bits32 *d = (fr_bits32 *)dst;
    for (ptrdiff_t i = 0; i < n; i++) d[i] = (uint32_t)s[i] << 16;
}
static void FR_CAT(fr_float_to_bf16_, FR_ISA)(const float *src, void *dst, ptrdiff_t n) {
    const fr_bits32 *s = (const fr_bits32 *)src;
    uint16_t *d = dst;
    for (ptrdiff_t i = 0; i < n; i++) {
        const uint32_t u = s[i];
        const int nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
        d[i] = (uint16_t)(nan ? (u >> 16) | 0x0040u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}

/* Forward counts and the weight gradient's sums in a backward gather FR_GROUP_ROWS whole rows at
 * a time, in a loop of their own before those rows' results (which may overwrite the inputs: in
 * place, and half types computed in their buffer), whose loop then finds the inputs in L1.  Kept
 * in the loop that stores the results, updated once per row, counts took 1.3-1.5x the time at
 * 10^6 elements (2 threads, float32, (N, 100), Intel Xeon, AVX-512 and AVX2), and 1.03-1.08x at
 * STREAM size. */
#define FR_GROUP_ROWS 4

#define FR_T float
#define FR_LANE_INT int32_t
#define FR_SFX FR_CAT(_f32_, FR_ISA)
#define FR_EXPM1 fr_expm1f
#define FR_EXP fr_expf
#include "_loops.h"
#undef FR_T
#undef FR_LANE_INT
#undef FR_SFX
#undef FR_EXPM1
#undef FR_EXP

#define FR_T double
#define FR_LANE_INT int64_t
#define FR_SFX FR_CAT(_f64_, FR_ISA)
#define FR_EXPM1 fr_expm1d
#define FR_EXP fr_expd
#include "_loops.h"
#undef FR_T
#undef FR_LANE_INT
#undef FR_SFX
#undef FR_EXPM1
#undef FR_EXP

#else

#define FR_FN(name) FR_CAT(name, FR_SFX)

/* flags (compile-time constants in every instantiation): forward FR_COUNT | FR_BIAS, backward one
 * of FR_SUM_NONE, FR_SUM_WEIGHT, FR_SUM_GRAD, FR_SUM_BIAS_WEIGHT (see fr_job in _kernels.h).
 * FR_SUM_BIAS_WEIGHT: x is the input before a per-channel bias b, so v = x + b, and both the
 * weight gradient and dx's sum (the bias gradient, into bias_sums) are gathered. */
#define FR_SUMS_WEIGHT(sum) ((sum) == FR_SUM_WEIGHT || (sum) == FR_SUM_BIAS_WEIGHT)

/* A term of PReLU's weight gradient, x > 0 ? 0 : x * g, in double: the product of two floats is
 * exact there, so only the sum rounds.  Compared in double too (the same test), so that the
 * vector loop selects in double lanes instead of widening a float mask (a fifth of the loop's
 * time on AVX2). */
static FR_INLINE double FR_FN(weight_term)(FR_T v, FR_T g) {
    const double vd = v, gd = g;
    return vd > 0 ? 0.0 : vd * gd;
}
#define FR_WEIGHT_TERM FR_FN(weight_term)

/* g with its bits ANDed with `zero` (fr_opaque_zero): +0, computed from g (see FR_DX) */
static FR_INLINE FR_T FR_FN(cleared)(FR_T g, FR_LANE_INT zero) {
    union { FR_T f; FR_LANE_INT bits; } u = {g};
    u.bits &= zero;
    return u.f;
}

/* Counts are gathered in int32 lanes, as wide as float32's, one block of at most 2^30 elements at
 * a time, and added up in int64. */
static FR_INLINE int64_t FR_FN(fwd_flat_t)(int op, const FR_T *x, FR_T *y, ptrdiff_t n, FR_T p,
                                          FR_T b, int flags) {
    int64_t npos = 0;
    for (ptrdiff_t start = 0, end; start < n; start = end) {
        end = n - start > ((ptrdiff_t)1 << 30) ? start + ((ptrdiff_t)1 << 30) : n;
        int32_t block = 0;
#pragma omp simd reduction(+ : block)
        for (ptrdiff_t i = start; i < end; i++) {
            FR_T v = x[i];
            if (flags & FR_BIAS) v = v + b;
            y[i] = FR_Y(op, v, p, FR_T, FR_EXPM1);
            if (flags & FR_COUNT) block += v > 0;
        }
        npos += block;
    }
    return npos;
}

static FR_INLINE double FR_FN(bwd_flat_t)(int op, const FR_T *g, const FR_T *x, FR_T *dx,
                                         ptrdiff_t n, FR_T p, FR_T b, int sum,
                                         double *bias_sum) {
    double acc = 0.0, bacc = 0.0;
    const FR_LANE_INT zero = (FR_LANE_INT)fr_opaque_zero;
#pragma omp simd reduction(+ : acc, bacc)
    for (ptrdiff_t i = 0; i < n; i++) {
        FR_T v = x[i], gi = g[i];
        if (sum == FR_SUM_BIAS_WEIGHT) v = v + b;
        FR_T d = FR_DX(op, v, gi, p, FR_T, FR_EXP, FR_FN(cleared)(gi, zero));
        dx[i] = d;
        if (FR_SUMS_WEIGHT(sum)) acc += FR_WEIGHT_TERM(v, gi);
        if (sum == FR_SUM_GRAD) acc += d;
        if (sum == FR_SUM_BIAS_WEIGHT) bacc += d;
    }
    if (sum == FR_SUM_BIAS_WEIGHT) *bias_sum = bacc;
    return acc;
}

/* counts[j] += the number of the `rows` rows of n columns from x (L apart) with x + pb > 0 */
static FR_INLINE void FR_FN(count_rows_t)(const FR_T *x, ptrdiff_t n, ptrdiff_t L, int rows,
                                         const FR_T *pb, FR_LANE_INT *counts, int flags) {
#pragma omp simd
    for (ptrdiff_t j = 0; j < n; j++) {
        FR_LANE_INT c = 0;
        for (int r = 0; r < rows; r++) {
            FR_T v = x[r * L + j];
            if (flags & FR_BIAS) v = v + pb[j];
            c += v > 0;
        }
        counts[j] += c;
    }
}

/* One stretch of a rows loop: columns j0 .. j0+n-1 of one row, n <= L - j0; pw, pb and the sums
 * start at column j0.  Counts are gathered in lanes as wide as the data's (int32 for float: no
 * widening per element), which the driver widens once a chunk. */
static FR_INLINE void FR_FN(fwd_row_t)(int op, const FR_T *x, FR_T *y, ptrdiff_t n,
                                      const FR_T *pw, const FR_T *pb, FR_LANE_INT *counts,
                                      int flags) {
    if (flags & FR_COUNT) FR_FN(count_rows_t)(x, n, 0, 1, pb, counts, flags);
#pragma omp simd
    for (ptrdiff_t j = 0; j < n; j++) {
        FR_T v = x[j];
        if (flags & FR_BIAS) v = v + pb[j];
        y[j] = FR_Y(op, v, pw[j], FR_T, FR_EXPM1);
    }
}

/* n elements that start at column j0 of rows of length L: a first partial row, then with counts
 * FR_GROUP_ROWS whole rows at a time, then row by row. */
static FR_INLINE void FR_FN(fwd_rows_t)(int op, const FR_T *x, FR_T *y, ptrdiff_t n, ptrdiff_t L,
                                       ptrdiff_t j0, const FR_T *pw, const FR_T *pb,
                                       FR_LANE_INT *counts, int flags) {
    ptrdiff_t k = 0;
    if (j0) {
        k = L - j0 < n ? L - j0 : n;
        FR_FN(fwd_row_t)(op, x, y, k, pw + j0, pb ? pb + j0 : NULL, counts ? counts + j0 : NULL,
                         flags);
    }
    if (flags & FR_COUNT)
        for (; n - k >= FR_GROUP_ROWS * L; k += FR_GROUP_ROWS * L) {
            FR_FN(count_rows_t)(x + k, L, L, FR_GROUP_ROWS, pb, counts, flags);
            for (int r = 0; r < FR_GROUP_ROWS; r++)
                FR_FN(fwd_row_t)(op, x + k + r * L, y + k + r * L, L, pw, pb, NULL,
                                 flags & ~FR_COUNT);
        }
    for (ptrdiff_t len; k < n; k += len) {
        len = L < n - k ? L : n - k;
        FR_FN(fwd_row_t)(op, x + k, y + k, len, pw, pb, counts, flags);
    }
}

/* The weight gradient's terms of `rows` whole rows of n columns (L apart), added into the float64
 * sums: a float32 product is exact in float64, so the sums are the contract's (the sum of the
 * exact products in float64, rounded once at the end). */
static FR_INLINE void FR_FN(weight_rows_t)(const FR_T *g, const FR_T *x, ptrdiff_t n, ptrdiff_t L,
                                          int rows, const FR_T *pb, double *sums, int sum) {
#pragma omp simd
    for (ptrdiff_t j = 0; j < n; j++) {
        double terms = 0.0;
        for (int r = 0; r < rows; r++) {
            FR_T v = x[r * L + j];
            if (sum == FR_SUM_BIAS_WEIGHT) v = v + pb[j];
            terms += FR_WEIGHT_TERM(v, g[r * L + j]);
        }
        sums[j] += terms;
    }
}

/* At most one row.  The weight gradient's terms, when `weights`, in the same loop, one row at a
 * time; a bias gradient's always. */
static FR_INLINE void FR_FN(bwd_row_t)(int op, const FR_T *g, const FR_T *x, FR_T *dx,
                                      ptrdiff_t n, const FR_T *pw, const FR_T *pb, double *sums,
                                      double *bias_sums, int sum, int weights) {
    const FR_LANE_INT zero = (FR_LANE_INT)fr_opaque_zero;
#pragma omp simd
    for (ptrdiff_t j = 0; j < n; j++) {
        /* every column's parameter loaded, not only the negative ones': a plain load, not a
         * masked one */
        FR_T v = x[j], gj = g[j], w = pw[j];
        if (sum == FR_SUM_BIAS_WEIGHT) v = v + pb[j];
        FR_T d = FR_DX(op, v, gj, w, FR_T, FR_EXP, FR_FN(cleared)(gj, zero));
        dx[j] = d;
        if (FR_SUMS_WEIGHT(sum) && weights) sums[j] += FR_WEIGHT_TERM(v, gj);
        if (sum == FR_SUM_GRAD) sums[j] += d;
        if (sum == FR_SUM_BIAS_WEIGHT) bias_sums[j] += d;
    }
}

/* n elements that start at column j0 of rows of length L: a first partial row, then with weight
 * sums where FR_GROUP_WEIGHTS (the including ISA's choice) FR_GROUP_ROWS whole rows at a time
 * (their terms first, as the forward's counts), then row by row. */
static FR_INLINE void FR_FN(bwd_rows_t)(int op, const FR_T *g, const FR_T *x, FR_T *dx,
                                       ptrdiff_t n, ptrdiff_t L, ptrdiff_t j0, const FR_T *pw,
                                       const FR_T *pb, double *sums, double *bias_sums, int sum) {
    ptrdiff_t k = 0;
    if (j0) {
        k = L - j0 < n ? L - j0 : n;
        FR_FN(bwd_row_t)(op, g, x, dx, k, pw + j0, pb ? pb + j0 : NULL, sums ? sums + j0 : NULL,
                         bias_sums ? bias_sums + j0 : NULL, sum, 1);
    }
    if (FR_SUMS_WEIGHT(sum) && FR_GROUP_WEIGHTS)
        for (; n - k >= FR_GROUP_ROWS * L; k += FR_GROUP_ROWS * L) {
            FR_FN(weight_rows_t)(g + k, x + k, L, L, FR_GROUP_ROWS, pb, sums, sum);
            for (ptrdiff_t r = k; r < k + FR_GROUP_ROWS * L; r += L)
                FR_FN(bwd_row_t)(op, g + r, x + r, dx + r, L, pw, pb, sums, bias_sums, sum, 0);
        }
    for (ptrdiff_t len; k < n; k += len) {
        len = L < n - k ? L : n - k;
        FR_FN(bwd_row_t)(op, g + k, x + k, dx + k, len, pw, pb, sums, bias_sums, sum, 1);
    }
}

/* The non-inline entry points (the signatures of fr_loops in _kernels.h), made only for the ops
 * that reach them; each runs the instantiation of its flags. */
#define FR_FWD_FLAT(OPNAME, OP)                                                                 \
    static int64_t FR_FN(FR_CAT(fwd_flat_, OPNAME))(const void *x, void *y, ptrdiff_t n,        \
                                                   double p, double b, int flags) {             \
        switch (flags) {                                                                        \
        case 0: return FR_FN(fwd_flat_t)(OP, x, y, n, (FR_T)p, (FR_T)b, 0);                     \
        case FR_COUNT: return FR_FN(fwd_flat_t)(OP, x, y, n, (FR_T)p, (FR_T)b, FR_COUNT);       \
        case FR_BIAS: return FR_FN(fwd_flat_t)(OP, x, y, n, (FR_T)p, (FR_T)b, FR_BIAS);         \
        default:                                                                                \
            return FR_FN(fwd_flat_t)(OP, x, y, n, (FR_T)p, (FR_T)b, FR_COUNT | FR_BIAS);        \
        }                                                                                       \
    }
/* WITH_BIAS: the op serves FR_SUM_BIAS_WEIGHT (PReLU after a bias); for the others that case is
 * compiled away. */
#define FR_BWD_FLAT(OPNAME, OP, WITH_BIAS)                                                      \
    static double FR_FN(FR_CAT(bwd_flat_, OPNAME))(const void *g, const void *x, void *dx,      \
                                                  ptrdiff_t n, double p, double b, int sum,     \
                                                  double *bias_sum) {                           \
        switch (sum) {                                                                          \
        case FR_SUM_NONE:                                                                       \
            return FR_FN(bwd_flat_t)(OP, g, x, dx, n, (FR_T)p, 0, FR_SUM_NONE, NULL);            \
        case FR_SUM_WEIGHT:                                                                     \
            return FR_FN(bwd_flat_t)(OP, g, x, dx, n, (FR_T)p, 0, FR_SUM_WEIGHT, NULL);          \
        case FR_SUM_BIAS_WEIGHT:                                                                \
            if (WITH_BIAS)                                                                      \
                return FR_FN(bwd_flat_t)(OP, g, x, dx, n, (FR_T)p, (FR_T)b, FR_SUM_BIAS_WEIGHT,  \
                                         bias_sum);                                             \
            /* fall through */                                                                  \
        default: return FR_FN(bwd_flat_t)(OP, g, x, dx, n, (FR_T)p, 0, FR_SUM_GRAD, NULL);       \
        }                                                                                       \
    }
#define FR_FWD_ROWS(OPNAME, OP)                                                                 \
    static void FR_FN(FR_CAT(fwd_rows_, OPNAME))(const void *x, void *y, ptrdiff_t n,           \
                                                ptrdiff_t L, ptrdiff_t j0, const void *pw,      \
                                                const void *pb, void *counts) {                 \
        switch ((counts ? FR_COUNT : 0) | (pb ? FR_BIAS : 0)) {                                 \
        case 0: FR_FN(fwd_rows_t)(OP, x, y, n, L, j0, pw, pb, counts, 0); break;                \
        case FR_COUNT: FR_FN(fwd_rows_t)(OP, x, y, n, L, j0, pw, pb, counts, FR_COUNT); break;  \
        case FR_BIAS: FR_FN(fwd_rows_t)(OP, x, y, n, L, j0, pw, pb, counts, FR_BIAS); break;    \
        default: FR_FN(fwd_rows_t)(OP, x, y, n, L, j0, pw, pb, counts, FR_COUNT | FR_BIAS);     \
        }                                                                                       \
    }
#define FR_BWD_ROWS(OPNAME, OP, WITH_BIAS)                                                      \
    static void FR_FN(FR_CAT(bwd_rows_, OPNAME))(const void *g, const void *x, void *dx,        \
                                                ptrdiff_t n, ptrdiff_t L, ptrdiff_t j0,         \
                                                const void *pw, const void *pb, double *sums,   \
                                                double *bias_sums, int sum) {                   \
        switch (sums ? sum : FR_SUM_NONE) {                                                     \
        case FR_SUM_NONE:                                                                       \
            FR_FN(bwd_rows_t)(OP, g, x, dx, n, L, j0, pw, NULL, sums, NULL, FR_SUM_NONE);        \
            break;                                                                              \
        case FR_SUM_WEIGHT:                                                                     \
            FR_FN(bwd_rows_t)(OP, g, x, dx, n, L, j0, pw, NULL, sums, NULL, FR_SUM_WEIGHT);      \
            break;                                                                              \
        case FR_SUM_BIAS_WEIGHT:                                                                \
            if (WITH_BIAS) {                                                                    \
                FR_FN(bwd_rows_t)(OP, g, x, dx, n, L, j0, pw, pb, sums, bias_sums,              \
                                  FR_SUM_BIAS_WEIGHT);                                          \
                break;                                                                          \
            }                                                                                   \
            /* fall through */                                                                  \
        default: FR_FN(bwd_rows_t)(OP, g, x, dx, n, L, j0, pw, NULL, sums, NULL, FR_SUM_GRAD);   \
        }                                                                                       \
    }

/* forward: relu, leaky, elu (flat, and rows for statistics, biases and PReLU weights) and the
 * copy (flat); backward: relu, leaky (flat and rows: bias and weight gradients, both for PReLU
 * after a bias), elu from x (flat), elu from y (flat, and rows: bias_activation_backward) */
FR_FWD_FLAT(relu, FR_RELU)
FR_FWD_FLAT(leaky, FR_LEAKY)
FR_FWD_FLAT(elu, FR_ELU)
FR_FWD_FLAT(copy, FR_COPY)
FR_FWD_ROWS(relu, FR_RELU)
FR_FWD_ROWS(leaky, FR_LEAKY)
FR_FWD_ROWS(elu, FR_ELU)
FR_BWD_FLAT(relu, FR_RELU, 0)
FR_BWD_FLAT(leaky, FR_LEAKY, 1)
FR_BWD_FLAT(elu, FR_ELU, 0)
FR_BWD_FLAT(elu_from_y, FR_ELU_FROM_Y, 0)
FR_BWD_ROWS(relu, FR_RELU, 0)
FR_BWD_ROWS(leaky, FR_LEAKY, 1)
FR_BWD_ROWS(elu_from_y, FR_ELU_FROM_Y, 0)

static const fr_loops FR_FN(loops) = {
    .fwd_flat = {[FR_RELU] = FR_FN(fwd_flat_relu), [FR_LEAKY] = FR_FN(fwd_flat_leaky),
                 [FR_ELU] = FR_FN(fwd_flat_elu), [FR_COPY] = FR_FN(fwd_flat_copy)},
    .bwd_flat = {[FR_RELU] = FR_FN(bwd_flat_relu), [FR_LEAKY] = FR_FN(bwd_flat_leaky),
                 [FR_ELU] = FR_FN(bwd_flat_elu), [FR_ELU_FROM_Y] = FR_FN(bwd_flat_elu_from_y)},
    .fwd_rows = {[FR_RELU] = FR_FN(fwd_rows_relu), [FR_LEAKY] = FR_FN(fwd_rows_leaky),
                 [FR_ELU] = FR_FN(fwd_rows_elu)},
    .bwd_rows = {[FR_RELU] = FR_FN(bwd_rows_relu), [FR_LEAKY] = FR_FN(bwd_rows_leaky),
                 [FR_ELU_FROM_Y] = FR_FN(bwd_rows_elu_from_y)},
};

#undef FR_FWD_FLAT
#undef FR_BWD_FLAT
#undef FR_FWD_ROWS
#undef FR_BWD_ROWS
#undef FR_SUMS_WEIGHT
#undef FR_WEIGHT_TERM
#undef FR_FN

#endif /* FR_T */
