// Decode attention read straight from the paged KV cache (cache.py's layout), registered as the PyTorch
// operator hemat::paged_attention. Each query reads its own sequence's keys and values slot by slot through
// the block table, so no [B, S, ...] copy of the cache is gathered first and padding costs nothing.
//
// q [B, T, Hq, D]; k [slots, Hkv, D] and v [slots, Hkv, Dv], any row and head strides, the last dimension
// contiguous (MLA passes its one store as k and the store's first Dv columns as v); table int64 [B, W],
// q_pos int64 [B, T], total int64 [B, 1]. Query t of row b attends to positions 0 .. min(q_pos[b, t],
// total[b] - 1), position p living in slot table[b, p / page_size] * page_size + p % page_size, and query
// head h to key/value head h / (Hq / Hkv). Scores, softmax and sums in fp32; q and the stores fp32 or bf16
// (one dtype); output [B, T, Hq, Dv] in that dtype. A query with no position to attend to gets zeros.
// Threads: at::parallel_for over (row, query head).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

using namespace simd;

template <typename scalar_t>
float dot(const float* q, const scalar_t* k, int64_t D) {
    Floats acc = zeros();
    for (int64_t d = 0; d < D; d += 16) acc = fmadd(load(q + d), load(k + d), acc);
    return reduce_add(acc);
}

template <typename scalar_t>
void axpy(float w, const scalar_t* v, float* acc, int64_t D) {  // acc += w * v
    const Floats weight = set1(w);
    for (int64_t d = 0; d < D; d += 16) store(acc + d, fmadd(weight, load(v + d), load(acc + d)));
}

template <typename scalar_t>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
            const at::Tensor& q_pos, const at::Tensor& total, int64_t page_size, float scale, at::Tensor& out) {
    const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3), Dv = v.size(2);
    const int64_t group = Hq / k.size(1), W = table.size(1);
    const scalar_t *qs = q.data_ptr<scalar_t>(), *ks = k.data_ptr<scalar_t>(), *vs = v.data_ptr<scalar_t>();
    const int64_t *tables = table.data_ptr<int64_t>(), *positions = q_pos.data_ptr<int64_t>();
    const int64_t* totals = total.data_ptr<int64_t>();
    scalar_t* os = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> query(T * D), scores, acc(T * Dv), sum(T);
        std::vector<int64_t> last(T), slots;
        for (int64_t unit = begin; unit < end; unit++) {
            const int64_t b = unit / Hq, h = unit % Hq;
            const scalar_t* kh = ks + (h / group) * k.stride(1);
            const scalar_t* vh = vs + (h / group) * v.stride(1);
            int64_t n = 0;  // positions any query of this row attends to
            for (int64_t t = 0; t < T; t++) {
                last[t] = std::min(positions[b * T + t], totals[b] - 1);
                n = std::max(n, last[t] + 1);
                const scalar_t* qt = qs + ((b * T + t) * Hq + h) * D;
                for (int64_t d = 0; d < D; d++) query[t * D + d] = static_cast<float>(qt[d]) * scale;
            }
            slots.resize(n);
            for (int64_t p = 0; p < n; p++)
                slots[p] = tables[b * W + p / page_size] * page_size + p % page_size;
            scores.assign(T * n, 0.0f);
            for (int64_t p = 0; p < n; p++) {
                const scalar_t* kp = kh + slots[p] * k.stride(0);
                for (int64_t t = 0; t < T; t++)
                    if (p <= last[t]) scores[t * n + p] = dot(query.data() + t * D, kp, D);
            }
            for (int64_t t = 0; t < T; t++) {  // exp(score - max) in place; the sum divides at the end
                float* s = scores.data() + t * n;
                const float top = last[t] < 0 ? 0.0f : *std::max_element(s, s + last[t] + 1);
                sum[t] = 0.0f;
                for (int64_t p = 0; p <= last[t]; p++) sum[t] += (s[p] = std::exp(s[p] - top));
            }
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t p = 0; p < n; p++) {
                const scalar_t* vp = vh + slots[p] * v.stride(0);
                for (int64_t t = 0; t < T; t++)
                    if (p <= last[t]) axpy(scores[t * n + p], vp, acc.data() + t * Dv, Dv);
            }
            for (int64_t t = 0; t < T; t++) {
                scalar_t* ot = os + ((b * T + t) * Hq + h) * Dv;
                const float norm = sum[t] > 0.0f ? 1.0f / sum[t] : 0.0f;
                for (int64_t d = 0; d < Dv; d++) ot[d] = static_cast<scalar_t>(acc[t * Dv + d] * norm);
            }
        }
    });
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                           const at::Tensor& q_pos, const at::Tensor& total, int64_t page_size, double scale) {
    const auto dtype = q.scalar_type();
    TORCH_CHECK(q.dim() == 4 && k.dim() == 3 && v.dim() == 3, "hemat paged_attention: q [B, T, Hq, D], k [slots, Hkv, D], "
                "v [slots, Hkv, Dv]");
    TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && k.scalar_type() == dtype && v.scalar_type() == dtype,
                "hemat paged_attention: q, k and v must be all fp32 or all bf16");
    TORCH_CHECK(k.size(2) == q.size(3) && q.size(3) % 16 == 0 && v.size(2) % 16 == 0 && k.size(1) == v.size(1) &&
                q.size(2) % k.size(1) == 0, "hemat paged_attention: head sizes must be multiples of 16 and match, "
                "the query heads a multiple of the key/value heads");
    TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "hemat paged_attention: k and v rows must be contiguous");
    for (const at::Tensor* index : {&table, &q_pos, &total})
        TORCH_CHECK(index->scalar_type() == at::kLong, "hemat paged_attention: table, q_pos and total must be int64");
    TORCH_CHECK(table.size(0) == q.size(0) && q_pos.size(0) == q.size(0) && q_pos.size(1) == q.size(1) &&
                total.numel() == q.size(0), "hemat paged_attention: table [B, W], q_pos [B, T] and total [B, 1]");
    const at::Tensor qc = q.contiguous(), tc = table.contiguous(), pc = q_pos.contiguous(), nc = total.contiguous();
    at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(2)}, q.options());
    if (dtype == at::kFloat)
        attend<float>(qc, k, v, tc, pc, nc, page_size, static_cast<float>(scale), out);
    else
        attend<at::BFloat16>(qc, k, v, tc, pc, nc, page_size, static_cast<float>(scale), out);
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hemat, m) {
    m.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor table, Tensor q_pos, Tensor total, int page_size, "
          "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(hemat, CPU, m) { m.impl("paged_attention", paged_attention); }
