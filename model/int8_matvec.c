/* The product that sets the speed of generation in 8 bits, written out in C.

   y[m][n] = scale[n] * sum_k values[n][k] * x[m][k]

   for a few rows x (float32: one row per new token), a weight matrix stored as int8 values
   with one float32 scale per output row (model/quant.py's quantize_rows), and y float32.
   Each int8 number is turned into a float32 in a register and multiplied there: the matrix
   is read from memory once, at a quarter of float32's bytes, and nothing is rounded but the
   float32 sums. PyTorch's own int8 kernel (torch._weight_int8pack_mm) computes the same
   product in bfloat16 at about half this speed on the CPUs we measured: its arithmetic, not
   its memory, is what it waits on.

   model/int8_matvec.py compiles this file once with the machine's C compiler (-O3
   -march=native, and -fopenmp where the compiler has it) and calls int8_matvec through ctypes.
   The output rows are shared among the OpenMP threads (the same runtime, and so the same
   thread count, as PyTorch's). One dot product of one weight row with one x row is computed
   the same way whatever `rows` is, so a prompt's tokens and generated ones get the same numbers. */

#include <stdint.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define INSTRUCTIONS "avx512"

/* 32 numbers a step, as two sums of 16 lanes (two chains of additions keep the FMA unit busy) */
static float dot(const int8_t *w, const float *x, long n) {
    __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
    long k = 0;
    for (; k + 32 <= n; k += 32) {
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 16))));
        sum0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), sum0);
        sum1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), sum1);
    }
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
    for (; k < n; k++) sum += (float)w[k] * x[k];
    return sum;
}

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define INSTRUCTIONS "avx2"

/* 16 numbers a step, as two sums of 8 lanes */
static float dot(const int8_t *w, const float *x, long n) {
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    long k = 0;
    for (; k + 16 <= n; k += 16) {
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k))));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k + 8))));
        sum0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), sum0);
        sum1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), sum1);
    }
    __m256 both = _mm256_add_ps(sum0, sum1);
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    float sum = _mm_cvtss_f32(half);
    for (; k < n; k++) sum += (float)w[k] * x[k];
    return sum;
}

#else
#define INSTRUCTIONS "portable"

/* plain C for any other processor: eight independent sums, which compilers turn into
   vector instructions where they can (and which are correct where they cannot) */
static float dot(const int8_t *w, const float *x, long n) {
    float lanes[8] = {0};
    long k = 0;
    for (; k + 8 <= n; k += 8)
        for (int j = 0; j < 8; j++)
            lanes[j] += (float)w[k + j] * x[k + j];
    float sum = 0;
    for (int j = 0; j < 8; j++) sum += lanes[j];
    for (; k < n; k++) sum += (float)w[k] * x[k];
    return sum;
}
#endif

void int8_matvec(const float *x, const int8_t *values, const float *scale, float *y,
                 long rows, long out_features, long in_features) {
    #pragma omp parallel for schedule(static)
    for (long n = 0; n < out_features; n++) {
        const int8_t *weight_row = values + n * in_features;
        /* (the weight row is read from memory once; for the other x rows it is in the cache) */
        for (long m = 0; m < rows; m++)
            y[m * out_features + n] = scale[n] * dot(weight_row, x + m * in_features, in_features);
    }
}

/* which of the three versions above this build is: "avx512", "avx2" or "portable" */
const char *int8_matvec_instructions(void) { return INSTRUCTIONS; }
