// int8/int4 weights times int8 activations with AVX-512 VNNI or AVX2 (the way llama.cpp's q4_0 x q8_0 dot products
// work), registered as the PyTorch operators hemat::int8_linear and hemat::int4_linear. Each token's
// activations are quantized to int8 in blocks of 32 against int8 weights, and in blocks of the group size
// against int4 weights (128 for larger groups, as llama.cpp's q8_K blocks of 256 serve its k-quants), one scale
// a block; the weights stay packed, and `vpdpbusd` multiplies 64 unsigned weight bytes by 64 signed activation
// bytes into 16 int32 sums per instruction.
// Decoding reads each weight once per token, so this runs at memory speed where a weight-only kernel that
// converts every weight to float is bound by that conversion. hemat::int4_dequantize gives the int4 weight in
// bf16 for the dense path (prefill, eval, large batches).
//
// Layouts (row-major over the N output rows; K inputs a multiple of 64):
//   int4: uint8 [N, K/2]. Each block of 128 inputs is 64 bytes, byte j holding input j (low nibble) and
//         j + 64 (high); a last block of 64 inputs is 32 bytes, byte j holding inputs j and j + 32.
//         scale, offset fp32 [N, K/g], g a power of two >= 32: w = q * scale - offset.
//   int8: uint8 [N, K] holding q + 128; scale fp32 [N]: w = (u - 128) * scale.
// Output fp32 [M, N]. Threads: at::parallel_for over tiles of ROWS output rows.
// Written over simd.h's vectors; native.py builds it with AVX-512 VNNI where the CPU's flags show it, else with
// AVX2 and FMA, where a vpdpbusd is two instructions (vpmaddubsw, vpmaddwd) on each half of the 64 bytes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "simd.h"

namespace {

using namespace simd;

constexpr int64_t BLOCK = 32, WIDE_BLOCK = 128;  // inputs per activation scale: see Activations
constexpr int ROWS = 4;  // output rows per tile: each activation chunk loaded once for all of them

// The activations of M tokens in int8, in blocks of `block` inputs (32 against int8 weights, else the int4
// group size up to 128: a group's dot product then stays in integers until its end, with one scale): q [M, K],
// scale [M, K/block] and sum [M, K/block] = scale * sum(q) per block
struct Activations {
    int64_t block;
    std::vector<int8_t> q;
    std::vector<float> scale, sum;

    Activations(const float* x, int64_t M, int64_t K, int64_t block)
        : block(block), q(M * K), scale(M * K / block), sum(M * K / block) {
        for (int64_t b = 0; b < M * K / block; b++) {
            const float* xb = x + b * block;
            Floats amax = zeros();
            for (int64_t i = 0; i < block; i += 16) amax = max(amax, abs(load(xb + i)));
            const float top = reduce_max(amax);
            const Floats inv = set1(top > 0 ? 127.0f / top : 0.0f);
            Ints total = zero_ints();
            for (int64_t i = 0; i < block; i += 16)
                total = add(total, to_int8(mul(load(xb + i), inv), &q[b * block + i]));
            scale[b] = top / 127.0f;
            sum[b] = scale[b] * static_cast<float>(reduce_add(total));
        }
    }

    // Per token, the sums of `sum` over each group of `group` inputs: [M, K/group]
    std::vector<float> group_sums(int64_t group) const {
        const int64_t per_group = group / block;
        std::vector<float> sums(sum.size() / per_group, 0.0f);
        for (size_t b = 0; b < sum.size(); b++) sums[b / per_group] += sum[b];
        return sums;
    }
};

// The int8 activations of the tokens from `first` on (see Activations), and where their outputs go
struct Tokens {
    const int8_t* q;
    const float *scale, *group_sum;
    float* out;
    int64_t K, block, groups, N;

    const int8_t* q_of(int t) const { return q + t * K; }
    const float* scale_of(int t) const { return scale + t * (K / block); }
    const float* group_sum_of(int t) const { return group_sum + t * groups; }
    float* out_of(int t) const { return out + t * N; }
};

// `rows` output rows (ROWS, or 1 for the last few) of `tokens` tokens (TOKENS, or 1): each block of weights is
// unpacked once for all the tokens. Inlined with constants, so that the accumulators stay in registers.
// groups_of: 32, 64 or 128+ inputs per weight scale (so 4, 2 or 1 scales per block of 128 inputs); the
// activations come in blocks of the same size (128 for larger groups), so one product of scales covers each
// dot product of a group (of 32 inputs, two of them per 64 bytes: see simd.h's halves)
template <int rows, int tokens, int groups_of>
inline void int4_tile(const uint8_t* w, int64_t ahead, const float* scale, const float* offset, int shift,
                      const Tokens& x) {
    const int64_t K = x.K, groups = x.groups, whole = K / 128 * 128;
    Sums acc[tokens][rows];
    for (int t = 0; t < tokens; t++)
        for (int r = 0; r < rows; r++) acc[t][r] = zero_sums();
    // the scales of the 64 inputs from `first` on in groups of 32: activation times weight, lanes as in halves
    auto scales_32 = [](const float* sx, const float* s, int64_t first) {
        return mul(halves(sx[first / 32], sx[first / 32 + 1]), halves(s[first / 32], s[first / 32 + 1]));
    };
    for (int64_t c = 0; c < whole; c += 128) {  // 64 bytes of each row: inputs c..c+63 low, c+64..c+127 high
        for (int r = 0; r < rows; r++) {
            const Bytes packed = load_bytes(w + r * (K / 2) + c / 2);
            if (ahead) _mm_prefetch(reinterpret_cast<const char*>(w + r * (K / 2) + c / 2 + ahead), _MM_HINT_T0);
            const Bytes low = low_nibbles(packed), high = high_nibbles(packed);
            const float* s = scale + r * groups;
            for (int t = 0; t < tokens; t++) {
                const float* sx = x.scale_of(t);
                const int8_t* xq = x.q_of(t) + c;
                Sums& sum = acc[t][r];
                if constexpr (groups_of >= 128) {
                    sum = accumulate_nibbles(low, high, xq, sx[c / 128] * s[c >> shift], sum);
                } else if constexpr (groups_of == 64) {
                    sum = accumulate_nibbles(low, xq, sx[c / 64] * s[c / 64], sum);
                    sum = accumulate_nibbles(high, xq + 64, sx[c / 64 + 1] * s[c / 64 + 1], sum);
                } else {
                    sum = accumulate(dot(zero_ints(), low, xq), scales_32(sx, s, c), sum);
                    sum = accumulate(dot(zero_ints(), high, xq + 64), scales_32(sx, s, c + 64), sum);
                }
            }
        }
    }
    if (whole < K) {  // a last block of 64 inputs (so groups of 32 or 64): 32 bytes, inputs j and j + 32 in byte j
        for (int r = 0; r < rows; r++) {
            const Bytes q = nibbles_of_32(w + r * (K / 2) + whole / 2);
            const float* s = scale + r * groups;
            for (int t = 0; t < tokens; t++) {
                const float* sx = x.scale_of(t);
                if constexpr (groups_of == 32)
                    acc[t][r] = accumulate(dot(zero_ints(), q, x.q_of(t) + whole), scales_32(sx, s, whole), acc[t][r]);
                else
                    acc[t][r] = accumulate_nibbles(q, x.q_of(t) + whole, sx[whole / 64] * s[whole / 64], acc[t][r]);
            }
        }
    }
    for (int t = 0; t < tokens; t++)  // less the offsets times each group's sum of dequantized activations
        for (int r = 0; r < rows; r++)
            x.out_of(t)[r] = reduce_add(minus_products(acc[t][r], offset + r * groups, x.group_sum_of(t), groups));
}

template <int rows, int tokens>
inline void int8_tile(const uint8_t* w, int64_t ahead, const float* scale, const Tokens& x) {
    const int64_t K = x.K;
    Sums acc[tokens][rows];
    for (int t = 0; t < tokens; t++)
        for (int r = 0; r < rows; r++) acc[t][r] = zero_sums();
    for (int64_t c = 0; c < K; c += 64) {
        Bytes weights[rows];
        for (int r = 0; r < rows; r++) {
            weights[r] = load_bytes(w + r * K + c);
            if (ahead) _mm_prefetch(reinterpret_cast<const char*>(w + r * K + c + ahead), _MM_HINT_T0);
        }
        for (int t = 0; t < tokens; t++) {
            const Floats s = halves(x.scale_of(t)[c / BLOCK], x.scale_of(t)[c / BLOCK + 1]);
            for (int r = 0; r < rows; r++)
                acc[t][r] = accumulate(int8_dot(zero_ints(), weights[r], x.q_of(t) + c), s, acc[t][r]);
        }
    }
    // the dot products give sum((q + INT8_DOT_BIAS) x): the bias term comes off with the one group's sum of x
    for (int t = 0; t < tokens; t++)
        for (int r = 0; r < rows; r++)
            x.out_of(t)[r] = scale[r] * (reduce_add(acc[t][r]) - INT8_DOT_BIAS * x.group_sum_of(t)[0]);
}

constexpr int TOKENS = 4;  // tokens per tile: a block of weights unpacked once for all of them

void check(const at::Tensor& rows, const at::Tensor& weight, int64_t packed_width) {
    TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kFloat && rows.is_contiguous(),
                "hemat int8/int4 kernels: rows must be contiguous fp32 [M, K]");
    TORCH_CHECK(rows.size(1) % 64 == 0 && weight.size(1) == packed_width && weight.is_contiguous(),
                "hemat int8/int4 kernels: K must be a multiple of 64 and match the weight");
}

// log2 of an int4 group size, which must be a power of two >= 32 dividing K (no division per chunk)
int group_shift(int64_t group_size, int64_t K) {
    TORCH_CHECK(group_size >= 32 && (group_size & (group_size - 1)) == 0 && K % group_size == 0,
                "hemat int8/int4 kernels: the group size must be a power of two >= 32 dividing K");
    return __builtin_ctzll(group_size);
}

constexpr int64_t AHEAD = 4096;  // bytes of weights requested ahead of those being read, at least

// Runs tile(first row, rows, first token, tokens, ahead) over tiles of up to ROWS output rows and TOKENS tokens,
// the rows across threads. Each thread reads its rows of `weights` (row_bytes each) in one sequential pass, and
// the tile requests each cache line `ahead` bytes (whole tiles, >= AHEAD) before it reads it: the hardware
// prefetchers stop at each 4 KiB page, and a decode step's weights come from memory, not cache. ahead is 0
// (no requests) where that would pass the thread's rows, and for all but the first tokens of a tile.
template <typename Tile>
void over_tiles(int64_t N, int64_t M, int64_t row_bytes, const Tile& tile) {
    const int64_t tiles_ahead = (AHEAD + ROWS * row_bytes - 1) / (ROWS * row_bytes);
    at::parallel_for(0, (N + ROWS - 1) / ROWS, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i++) {
            const int64_t ahead = i + tiles_ahead < end ? tiles_ahead * ROWS * row_bytes : 0;
            for (int64_t m = 0; m < M; m += TOKENS)
                tile(i * ROWS, std::min<int64_t>(ROWS, N - i * ROWS), m, std::min<int64_t>(TOKENS, M - m),
                     m == 0 ? ahead : 0);
        }
    });
}

// kernel<rows, tokens>(first row offset, tokens view) for a tile: whole tiles at once, the rest one by one
template <typename Kernel>
void dispatch(int rows, int tokens, const Tokens& x, const Kernel& kernel) {
    if (rows == ROWS && tokens == TOKENS) return kernel.template operator()<ROWS, TOKENS>(0, x);
    for (int t = 0; t < tokens; t++) {
        Tokens one = x;
        one.q = x.q_of(t), one.scale = x.scale_of(t), one.group_sum = x.group_sum_of(t), one.out = x.out_of(t);
        if (rows == ROWS) {
            kernel.template operator()<ROWS, 1>(0, one);
        } else {
            for (int r = 0; r < rows; r++) {
                Tokens row = one;
                row.out = one.out + r;
                kernel.template operator()<1, 1>(r, row);
            }
        }
    }
}

at::Tensor int4_linear(const at::Tensor& rows, const at::Tensor& packed, const at::Tensor& scale,
                       const at::Tensor& offset, int64_t group_size) {
    const int64_t M = rows.size(0), K = rows.size(1), N = packed.size(0);
    check(rows, packed, K / 2);
    const int shift = group_shift(group_size, K);
    const int64_t groups = K / group_size;
    const Activations a(rows.data_ptr<float>(), M, K, std::min(group_size, WIDE_BLOCK));
    const std::vector<float> group_sum = a.group_sums(group_size);
    at::Tensor out = at::empty({M, N}, rows.options());
    const uint8_t* w = packed.data_ptr<uint8_t>();
    const float *s = scale.data_ptr<float>(), *o = offset.data_ptr<float>();
    float* y = out.data_ptr<float>();  // once: data_ptr checks the tensor on every call
    over_tiles(N, M, K / 2, [&](int64_t n, int count, int64_t m, int tokens, int64_t ahead) {
        const Tokens x{a.q.data() + m * K, a.scale.data() + m * (K / a.block), group_sum.data() + m * groups,
                       y + m * N + n, K, a.block, groups, N};
        auto tile = [&]<int groups_of>() {
            dispatch(count, tokens, x, [&]<int rows_, int tokens_>(int r, const Tokens& view) {
                const int64_t row = n + r;
                int4_tile<rows_, tokens_, groups_of>(w + row * (K / 2), ahead, s + row * groups, o + row * groups, shift, view);
            });
        };
        if (shift == 5)
            tile.template operator()<32>();
        else if (shift == 6)
            tile.template operator()<64>();
        else
            tile.template operator()<128>();
    });
    return out;
}

at::Tensor int8_linear(const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& scale) {
    const int64_t M = rows.size(0), K = rows.size(1), N = weight.size(0);
    check(rows, weight, K);
    const Activations a(rows.data_ptr<float>(), M, K, BLOCK);
    const std::vector<float> total = a.group_sums(K);
    at::Tensor out = at::empty({M, N}, rows.options());
    const uint8_t* w = weight.data_ptr<uint8_t>();
    const float* s = scale.data_ptr<float>();
    float* y = out.data_ptr<float>();
    over_tiles(N, M, K, [&](int64_t n, int count, int64_t m, int tokens, int64_t ahead) {
        const Tokens x{a.q.data() + m * K, a.scale.data() + m * (K / a.block), total.data() + m,
                       y + m * N + n, K, a.block, 1, N};
        dispatch(count, tokens, x, [&]<int rows_, int tokens_>(int r, const Tokens& view) {
            int8_tile<rows_, tokens_>(w + (n + r) * K, ahead, s + n + r, view);
        });
    });
    return out;
}

// 16 int4 values (one a byte) → q * scale - offset in bf16 (rounded to nearest even) at `out`
inline void store_dequantized(__m128i q, float scale, float offset, at::BFloat16* out) {
    store_bf16(fmsub(from_bytes(q), set1(scale), set1(offset)), out);
}

// The int4 weight in bf16 [N, K], for the dense path's bf16 matmul (prefill, eval, large batches)
at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& offset,
                           int64_t group_size) {
    const int64_t N = packed.size(0), K = packed.size(1) * 2, whole = K / 128 * 128;
    TORCH_CHECK(packed.is_contiguous() && scale.is_contiguous() && offset.is_contiguous() && K % 64 == 0,
                "hemat int8/int4 kernels: int4_dequantize takes contiguous rows of whole blocks of 64 inputs");
    const int shift = group_shift(group_size, K);
    const int64_t groups = K / group_size;
    at::Tensor out = at::empty({N, K}, packed.options().dtype(at::kBFloat16));
    const uint8_t* w = packed.data_ptr<uint8_t>();
    const float *s = scale.data_ptr<float>(), *o = offset.data_ptr<float>();
    at::BFloat16* y = out.data_ptr<at::BFloat16>();
    const __m128i nibble = _mm_set1_epi8(0x0F);
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; n++) {
            const uint8_t* row = w + n * (K / 2);
            const float *rs = s + n * groups, *ro = o + n * groups;
            at::BFloat16* yr = y + n * K;
            // byte j of a block of 2h inputs holds input j (low nibble) and j + h (high): h = 64, or 32 at the end
            auto block = [&](int64_t first, int64_t half) {
                for (int64_t i = 0; i < half; i += 16) {
                    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + first / 2 + i));
                    const int64_t low = first + i, high = first + half + i;
                    store_dequantized(_mm_and_si128(bytes, nibble), rs[low >> shift], ro[low >> shift], yr + low);
                    store_dequantized(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), rs[high >> shift],
                                      ro[high >> shift], yr + high);
                }
            };
            for (int64_t c = 0; c < whole; c += 128) block(c, 64);
            if (whole < K) block(whole, 32);
        }
    });
    return out;
}

}  // namespace

TORCH_LIBRARY(hemat, m) {
    m.def("int8_linear(Tensor rows, Tensor weight, Tensor scale) -> Tensor");
    m.def("int4_linear(Tensor rows, Tensor packed, Tensor scale, Tensor offset, int group_size) -> Tensor");
    m.def("int4_dequantize(Tensor packed, Tensor scale, Tensor offset, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(hemat, CPU, m) {
    m.impl("int8_linear", int8_linear);
    m.impl("int4_linear", int4_linear);
    m.impl("int4_dequantize", int4_dequantize);
}
