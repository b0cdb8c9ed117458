// int8/int4 weights times int8 activations with AVX-512 VNNI (the way llama.cpp's q4_0 x q8_0 dot products
// work): each token's activations are quantized to int8 in blocks of 32 (one scale each), the weights stay
// packed, and `vpdpbusd` multiplies 64 unsigned weight bytes by 64 signed activation bytes into 16 int32
// sums per instruction. Decoding reads each weight once per token, so this runs at memory speed where a
// weight-only kernel that converts every weight to float is bound by that conversion.
//
// Layouts (row-major over the output rows, K inputs a multiple of 64):
//   int4: uint8 [N, K/2]: byte j of each 64-input chunk holds input j (low nibble) and j + 32 (high);
//         scale, offset fp32 [N, K/g]: w = q * scale - offset (offset = zero point * scale).
//   int8: uint8 [N, K] holding q + 128; scale fp32 [N]: w = (u - 128) * scale.
// Output fp32 [M, N]. Threads: OpenMP over tiles of ROWS output rows (the process's libgomp: torch's own).
// Built with AVX-512 code generation (see native.py): hemat_vnni_supported, which only reads CPUID, is the
// one function to call before knowing that the CPU has it.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 32  // inputs per activation scale
#define ROWS 4    // output rows per tile: each activation chunk loaded once for all of them

int hemat_vnni_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
}

static inline float block_absmax(const float* x) {
    __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x)), b = _mm512_abs_ps(_mm512_loadu_ps(x + 16));
    return _mm512_reduce_max_ps(_mm512_max_ps(a, b));
}

// One token: x fp32 [K] -> q int8 [K], scale [K/32], block_sum [K/32] = scale * sum(q) (what an offset multiplies)
static void quantize_row(const float* x, int64_t K, int8_t* q, float* scale, float* block_sum) {
    for (int64_t b = 0; b < K / BLOCK; b++) {
        const float* xb = x + b * BLOCK;
        float amax = block_absmax(xb);
        float s = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
        __m512 vinv = _mm512_set1_ps(inv);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb), vinv));  // round to nearest even
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16), vinv));
        _mm_storeu_si128((__m128i*)(q + b * BLOCK), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i*)(q + b * BLOCK + 16), _mm512_cvtsepi32_epi8(q1));
        scale[b] = s;
        block_sum[b] = s * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

typedef struct {
    int8_t* q;
    float* scale;
    float* block_sum;
} Activations;

static int quantize_activations(const float* x, int64_t M, int64_t K, Activations* a) {
    int64_t blocks = M * (K / BLOCK);
    a->q = malloc(M * K);
    a->scale = malloc(blocks * sizeof(float));
    a->block_sum = malloc(blocks * sizeof(float));
    if (!a->q || !a->scale || !a->block_sum) return -1;
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, a->q + m * K, a->scale + m * (K / BLOCK), a->block_sum + m * (K / BLOCK));
    return 0;
}

// Per token, the sums of block_sum over each group of `group` inputs -> [M, K/group]; NULL when out of memory
static float* group_sums(const Activations* a, int64_t M, int64_t K, int64_t group) {
    const int64_t groups = K / group, per_group = group / BLOCK;
    float* sums = malloc(M * groups * sizeof(float));
    for (int64_t i = 0; sums && i < M * groups; i++) {
        sums[i] = 0.0f;
        for (int64_t b = 0; b < per_group; b++) sums[i] += a->block_sum[i * per_group + b];
    }
    return sums;
}

static void free_activations(Activations* a) {
    free(a->q);
    free(a->scale);
    free(a->block_sum);
}

// The scale vector of one 64-input chunk: lanes 0-7 hold the sums of its first 32 inputs, lanes 8-15 the rest
static inline __m512 chunk_scales(float low, float high) {
    return _mm512_insertf32x8(_mm512_set1_ps(low), _mm256_set1_ps(high), 1);
}

static inline void int4_tile(int rows, const uint8_t* w, const float* scale, const float* offset, int64_t K,
                             int64_t group, const int8_t* qx, const float* sx, const float* group_sum, float* out) {
    const int64_t groups = K / group;
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    __m512 acc[ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K; c += 64) {
        const __m512i x = _mm512_loadu_si512(qx + c);
        const float sx_low = sx[c / BLOCK], sx_high = sx[c / BLOCK + 1];
        const int64_t g_low = c / group, g_high = (c + 32) / group;
        for (int r = 0; r < rows; r++) {
            const __m256i packed = _mm256_loadu_si256((const __m256i*)(w + r * (K / 2) + c / 2));
            const __m256i low = _mm256_and_si256(packed, nibble);
            const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
            const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
            const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x);
            const float* s = scale + r * groups;
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), chunk_scales(s[g_low] * sx_low, s[g_high] * sx_high),
                                     acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) {  // the offsets times each group's sum of dequantized activations
        float correction = 0.0f;
        for (int64_t g = 0; g < groups; g++) correction += offset[r * groups + g] * group_sum[g];
        out[r] = _mm512_reduce_add_ps(acc[r]) - correction;
    }
}

static inline void int8_tile(int rows, const uint8_t* w, const float* scale, int64_t K, const int8_t* qx,
                             const float* sx, float total, float* out) {
    __m512 acc[ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K; c += 64) {
        const __m512i x = _mm512_loadu_si512(qx + c);
        const __m512 s = chunk_scales(sx[c / BLOCK], sx[c / BLOCK + 1]);
        for (int r = 0; r < rows; r++) {
            const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(w + r * K + c), x);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[r]);
        }
    }
    // the stored values are q + 128: sum(u x) - 128 sum(x) = sum(q x), with total = sum(x) dequantized
    for (int r = 0; r < rows; r++) out[r] = scale[r] * (_mm512_reduce_add_ps(acc[r]) - 128.0f * total);
}

// x fp32 [M, K] times the int4 weight [N, K] -> out fp32 [M, N]; 0, or -1 when out of memory
int hemat_int4_linear(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* scale,
                      const float* offset, int64_t N, int64_t group, float* out, int threads) {
    Activations a = {0};
    float* group_sum = quantize_activations(x, M, K, &a) ? NULL : group_sums(&a, M, K, group);
    if (!group_sum) return free_activations(&a), -1;
    const int64_t tiles = (N + ROWS - 1) / ROWS, groups = K / group;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n = t * ROWS;
        const int rows = N - n < ROWS ? (int)(N - n) : ROWS;
        for (int64_t m = 0; m < M; m++) {
            float y[ROWS];
            int4_tile(rows, w + n * (K / 2), scale + n * groups, offset + n * groups, K, group, a.q + m * K,
                      a.scale + m * (K / BLOCK), group_sum + m * groups, y);
            for (int r = 0; r < rows; r++) out[m * N + n + r] = y[r];
        }
    }
    free(group_sum);
    free_activations(&a);
    return 0;
}

// x fp32 [M, K] times the int8 weight [N, K] -> out fp32 [M, N]; 0, or -1 when out of memory
int hemat_int8_linear(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* scale, int64_t N,
                      float* out, int threads) {
    Activations a = {0};
    float* total = quantize_activations(x, M, K, &a) ? NULL : group_sums(&a, M, K, K);
    if (!total) return free_activations(&a), -1;
    const int64_t tiles = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n = t * ROWS;
        const int rows = N - n < ROWS ? (int)(N - n) : ROWS;
        for (int64_t m = 0; m < M; m++) {
            float y[ROWS];
            int8_tile(rows, w + n * K, scale + n, K, a.q + m * K, a.scale + m * (K / BLOCK),
                      total[m], y);
            for (int r = 0; r < rows; r++) out[m * N + n + r] = y[r];
        }
    }
    free(total);
    free_activations(&a);
    return 0;
}
