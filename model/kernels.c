/* Generation on a CPU, written out in C: the 8-bit product, and one token through the whole model.

   Generating a token multiplies one vector by every weight matrix: little arithmetic for each
   number read, so a token's time should be the time it takes to read the weights from memory.
   In PyTorch it is that plus about a thousand small operations (norms, rotations, attention over
   a few hundred cached keys, residual sums), each costing microseconds of set-up for nanoseconds
   of work: 6 ms a token on SmolLM2-135M, as long as reading its 8-bit weights. Here each of those
   is a short loop, and a token costs the reading of its weights and little more.

   Two functions are called from Python (model/kernels.py compiles this file once with the
   machine's C compiler, -O3 -march=native and -fopenmp where it has them, and calls them through
   ctypes):

     int8_matvec    y = x W^T for a few rows x and an int8 matrix W with one scale per output row
                    (model/quant.py's Int8Linear: a prompt's first tokens, a chat turn)
     decode_token   the logits of one new token, given the model's weights and its KV cache
                    (GPT.generate, for every token after the prompt)

   Both read the model's own tensors in place (nothing is copied) and compute in float32: the same
   arithmetic as model/gpt.py's forward pass, up to the order of float32 sums. Each weight matrix's
   output rows are shared among the OpenMP threads (the same runtime, and so the same thread count,
   as PyTorch's); everything else in a token is too small to share. */

#include <math.h>
#include <stdint.h>
#include <string.h>

/* ---- dot products: one weight row (int8 or float32) with one row of float32 activations ---- */

/* Two versions: 256-bit AVX2 with FMA, and plain C. Processors with AVX-512 run the AVX2 loops
   too: on the AMD EPYC (Zen 4) measured here, 512-bit versions of these loops were slower (one
   token of SmolLM2-135M in 8 bits: 6.3 ms against 4.9 ms; in float32 18.2 against 17.5 ms). */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define INSTRUCTIONS "avx2"

static float sum_lanes(__m256 lanes) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half);
}

/* 16 numbers a step, as two sums of 8 lanes */
static float dot_int8(const int8_t *w, const float *x, int64_t n) {
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k))));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k + 8))));
        sum0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), sum0);
        sum1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), sum1);
    }
    float sum = sum_lanes(_mm256_add_ps(sum0, sum1));
    for (; k < n; k++) sum += (float)w[k] * x[k];
    return sum;
}

static float dot_float(const float *w, const float *x, int64_t n) {
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        sum0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), sum0);
        sum1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), sum1);
    }
    float sum = sum_lanes(_mm256_add_ps(sum0, sum1));
    for (; k < n; k++) sum += w[k] * x[k];
    return sum;
}

#else
#define INSTRUCTIONS "portable"

/* plain C for any other processor: eight independent sums, which compilers turn into
   vector instructions where they can (and which are correct where they cannot) */
#define PORTABLE_DOT(name, type)                                            \
    static float name(const type *w, const float *x, int64_t n) {              \
        float lanes[8] = {0};                                               \
        int64_t k = 0;                                                         \
        for (; k + 8 <= n; k += 8)                                          \
            for (int j = 0; j < 8; j++) lanes[j] += (float)w[k + j] * x[k + j]; \
        float sum = 0;                                                      \
        for (int j = 0; j < 8; j++) sum += lanes[j];                        \
        for (; k < n; k++) sum += (float)w[k] * x[k];                       \
        return sum;                                                         \
    }
PORTABLE_DOT(dot_int8, int8_t)
PORTABLE_DOT(dot_float, float)
#endif

/* which of the two versions above this build is: "avx2" or "portable" */
const char *kernels_instructions(void) { return INSTRUCTIONS; }

/* ---- the 8-bit product, for a few rows at a time ---- */

/* y[m][n] = scale[n] * sum_k values[n][k] * x[m][k]. One dot product of one weight row with one
   x row is computed the same way whatever `rows` is (and as decode_token computes it), so a
   prompt's tokens and generated ones get the same numbers. */
void int8_matvec(const float *x, const int8_t *values, const float *scale, float *y,
                 int64_t rows, int64_t out_features, int64_t in_features) {
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < out_features; n++) {
        const int8_t *weight_row = values + n * in_features;
        /* (the weight row is read from memory once; for the other x rows it is in the cache) */
        for (int64_t m = 0; m < rows; m++)
            y[m * out_features + n] = scale[n] * dot_int8(weight_row, x + m * in_features, in_features);
    }
}

/* ---- one token through the whole model ---- */

/* A weight matrix as a Linear layer holds it: (out_features, in_features), row after row. */
typedef struct {
    const void *weight;   /* float32, or int8 when scale is set */
    const float *scale;   /* one per output row (int8 weights), or NULL (float32 weights) */
    const float *bias;    /* (out_features,) or NULL */
    int64_t out_features, in_features;
} Matrix;

typedef struct {
    const float *weight, *bias;  /* bias: LayerNorm's (gpt2), NULL for RMSNorm (llama) */
} Norm;

typedef struct {
    Norm norm_1;
    Matrix qkv, attn_proj;  /* c_attn: n_head query heads, then n_kv_head key and value heads */
    Norm norm_2;
    Matrix fc, gate, mlp_proj;  /* gate: SwiGLU's second widening (weight NULL for gelu, relu2) */
} Layer;

enum { GELU = 0, SWIGLU = 1, RELU2 = 2 };

typedef struct {
    int64_t n_layer, n_embd, n_head, n_kv_head, head_size, mlp_hidden, vocab_size;
    int activation;        /* GELU, SWIGLU or RELU2 (config.mlp_activation) */
    int qk_norm;           /* unit-RMS queries and keys before RoPE */
    float norm_eps, logit_softcap;
    Matrix embedding;      /* wte as a matrix (a token's vector is its row times its scale) */
    const float *positions;  /* gpt2's learned positions (block_size, n_embd), or NULL */
    const float *rope_cos, *rope_sin;  /* llama: (max_length, head_size / 2) angles per position, or NULL */
    Layer *layers;
    Norm norm_f;
    Matrix lm_head;        /* out_features vocab_size: the padding rows past it are never read */
    float *keys, *values;  /* KVCache: (n_layer, n_kv_head, max_length, head_size) */
    int64_t max_length;
    float *scratch;        /* work space: see decode_token */
} Model;

/* y = W x (+ bias), the rows of W shared among the threads */
static void matvec(const Matrix *m, const float *x, float *y) {
    const int64_t in = m->in_features;
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < m->out_features; n++) {
        float sum = m->scale ? m->scale[n] * dot_int8((const int8_t *)m->weight + n * in, x, in)
                             : dot_float((const float *)m->weight + n * in, x, in);
        y[n] = m->bias ? sum + m->bias[n] : sum;
    }
}

/* RMSNorm (no bias) or LayerNorm (with one); weight NULL: unit RMS, no gain (qk_norm) */
static void normalize(const Norm *norm, const float *x, float *out, int64_t n, float eps) {
    float mean = 0, variance = 0;
    if (norm->bias) {
        for (int64_t i = 0; i < n; i++) mean += x[i];
        mean /= n;
    }
    for (int64_t i = 0; i < n; i++) variance += (x[i] - mean) * (x[i] - mean);
    const float inverse = 1.0f / sqrtf(variance / n + eps);
    for (int64_t i = 0; i < n; i++) {
        float y = (x[i] - mean) * inverse;
        if (norm->weight) y *= norm->weight[i];
        out[i] = norm->bias ? y + norm->bias[i] : y;
    }
}

/* RoPE: pair (x[i], x[i + half]) turned by its angle (model/gpt.py's apply_rope) */
static void rotate(float *x, const float *cos, const float *sin, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos[i] - x2 * sin[i];
        x[i + half] = x2 * cos[i] + x1 * sin[i];
    }
}

/* The new token's query, key and value (qkv) -> its attention output (out, n_head * head_size),
   its key and value stored at position pos of this layer's cache first. */
static void attend(const Model *m, int64_t layer, int64_t pos, float *qkv, float *out, float *scores) {
    const int64_t D = m->head_size, half = D / 2, group = m->n_head / m->n_kv_head;
    const Norm unit = {NULL, NULL};
    float *key = qkv + m->n_head * D, *value = key + m->n_kv_head * D;
    for (int64_t h = 0; h < m->n_head + m->n_kv_head; h++) {  /* the query heads, then the key heads */
        if (m->qk_norm) normalize(&unit, qkv + h * D, qkv + h * D, D, m->norm_eps);
        if (m->rope_cos) rotate(qkv + h * D, m->rope_cos + pos * half, m->rope_sin + pos * half, half);
    }
    const int64_t per_head = m->max_length * D, per_layer = m->n_kv_head * per_head;
    float *keys = m->keys + layer * per_layer, *values = m->values + layer * per_layer;
    for (int64_t h = 0; h < m->n_kv_head; h++) {
        memcpy(keys + h * per_head + pos * D, key + h * D, D * sizeof(float));
        memcpy(values + h * per_head + pos * D, value + h * D, D * sizeof(float));
    }
    const float inverse_sqrt = 1.0f / sqrtf((float)D);
    #pragma omp parallel for schedule(static)
    for (int64_t h = 0; h < m->n_head; h++) {
        /* query heads h of one group share key/value head h / group (grouped-query attention) */
        const float *q = qkv + h * D, *k = keys + (h / group) * per_head, *v = values + (h / group) * per_head;
        float *weights = scores + h * m->max_length, *y = out + h * D, largest = -INFINITY, total = 0;
        for (int64_t t = 0; t <= pos; t++) {
            weights[t] = dot_float(k + t * D, q, D) * inverse_sqrt;
            if (weights[t] > largest) largest = weights[t];
        }
        for (int64_t t = 0; t <= pos; t++) total += weights[t] = expf(weights[t] - largest);
        for (int64_t d = 0; d < D; d++) y[d] = 0;
        for (int64_t t = 0; t <= pos; t++) {
            const float w = weights[t] / total;
            for (int64_t d = 0; d < D; d++) y[d] += w * v[t * D + d];
        }
    }
}

static float gelu(float x) {  /* GPT-2's tanh approximation */
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

/* The logits (vocab_size) of token at position pos, whose earlier positions are in the cache.
   scratch holds n_embd * 2 + qkv + n_head * head_size + n_head * max_length + mlp_hidden * 2
   floats (model/kernels.py's Decoder sizes it). */
void decode_token(const Model *m, int64_t token, int64_t pos, float *logits) {
    const int64_t C = m->n_embd, D = m->head_size;
    float *x = m->scratch, *h = x + C;
    float *qkv = h + C, *attention = qkv + (m->n_head + 2 * m->n_kv_head) * D;
    float *scores = attention + m->n_head * D, *hidden = scores + m->n_head * m->max_length;
    float *gate = hidden + m->mlp_hidden;

    const Matrix *e = &m->embedding;
    for (int64_t i = 0; i < C; i++) {
        x[i] = e->scale ? (float)((const int8_t *)e->weight)[token * C + i] * e->scale[token]
                        : ((const float *)e->weight)[token * C + i];
        if (m->positions) x[i] += m->positions[pos * C + i];
    }
    for (int64_t l = 0; l < m->n_layer; l++) {
        const Layer *layer = &m->layers[l];
        /* x + attention(norm(x)) */
        normalize(&layer->norm_1, x, h, C, m->norm_eps);
        matvec(&layer->qkv, h, qkv);
        attend(m, l, pos, qkv, attention, scores);
        matvec(&layer->attn_proj, attention, h);
        for (int64_t i = 0; i < C; i++) x[i] += h[i];
        /* x + mlp(norm(x)) */
        normalize(&layer->norm_2, x, h, C, m->norm_eps);
        matvec(&layer->fc, h, hidden);
        if (m->activation == SWIGLU) {
            matvec(&layer->gate, h, gate);
            for (int64_t i = 0; i < m->mlp_hidden; i++) hidden[i] *= gate[i] / (1.0f + expf(-gate[i]));  /* silu */
        } else if (m->activation == RELU2) {
            for (int64_t i = 0; i < m->mlp_hidden; i++) hidden[i] = hidden[i] > 0 ? hidden[i] * hidden[i] : 0;
        } else {
            for (int64_t i = 0; i < m->mlp_hidden; i++) hidden[i] = gelu(hidden[i]);
        }
        matvec(&layer->mlp_proj, hidden, h);
        for (int64_t i = 0; i < C; i++) x[i] += h[i];
    }
    normalize(&m->norm_f, x, h, C, m->norm_eps);
    matvec(&m->lm_head, h, logits);
    if (m->logit_softcap > 0)
        for (int64_t i = 0; i < m->vocab_size; i++) logits[i] = m->logit_softcap * tanhf(logits[i] / m->logit_softcap);
}
