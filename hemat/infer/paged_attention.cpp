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
// Threads: at::parallel_for over (row, key/value head), the queries that share that head together (split
// further only where there are fewer of those than twice the threads). Scores 8 positions at a time (one
// tree of horizontal adds), the softmax's exp 8 lanes at a time, and the weighted sum of values in registers.
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

// q · k as 16 partial sums, in four independent chains (one would wait on each fmadd's latency)
template <typename scalar_t>
Floats dot(const float* q, const scalar_t* k, int64_t D) {
    Floats acc[4] = {zeros(), zeros(), zeros(), zeros()};
    int64_t d = 0;
    for (; d + 64 <= D; d += 64)
        for (int j = 0; j < 4; j++) acc[j] = fmadd(load(q + d + 16 * j), load(k + d + 16 * j), acc[j]);
    for (; d < D; d += 16) acc[0] = fmadd(load(q + d), load(k + d), acc[0]);
    return add(add(acc[0], acc[1]), add(acc[2], acc[3]));
}

// out[0:16 parts] = norm * the sum over positions p < n of weights[p] * the values at value(p): the sums stay in
// registers for all positions
template <int parts, typename scalar_t, typename Value>
void weighted_sum(const float* weights, int64_t n, const Value& value, float norm, scalar_t* out) {
    Floats acc[parts];
    for (int j = 0; j < parts; j++) acc[j] = zeros();
    for (int64_t p = 0; p < n; p++) {
        const Floats w = set1(weights[p]);
        const scalar_t* v = value(p);
        for (int j = 0; j < parts; j++) acc[j] = fmadd(w, load(v + 16 * j), acc[j]);
    }
    float result[16 * parts];
    for (int j = 0; j < parts; j++) store(result + 16 * j, mul(acc[j], set1(norm)));
    for (int i = 0; i < 16 * parts; i++) out[i] = static_cast<scalar_t>(result[i]);
}

template <typename scalar_t>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
            const at::Tensor& q_pos, const at::Tensor& total, int64_t page_size, float scale, at::Tensor& out) {
    const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3), Dv = v.size(2);
    const int64_t Hkv = k.size(1), group = Hq / Hkv, W = table.size(1);
    const scalar_t *qs = q.data_ptr<scalar_t>(), *ks = k.data_ptr<scalar_t>(), *vs = v.data_ptr<scalar_t>();
    const int64_t *tables = table.data_ptr<int64_t>(), *positions = q_pos.data_ptr<int64_t>();
    const int64_t* totals = total.data_ptr<int64_t>();
    scalar_t* os = out.data_ptr<scalar_t>();
    // A unit of work: some of the T * group queries of one row that read one key/value head, so that each key and
    // value is read once for all of them; the queries are split only as far as the threads need work
    const int64_t queries = T * group, threads = at::get_num_threads();
    const int64_t splits = std::min(queries, (2 * threads + B * Hkv - 1) / (B * Hkv));
    const int64_t per_unit = (queries + splits - 1) / splits;
    at::parallel_for(0, B * Hkv * splits, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> query(per_unit * D), scores, norm(per_unit);
        std::vector<int64_t> last(per_unit), slots;
        int64_t slots_of = -1;  // the row `slots` holds
        for (int64_t unit = begin; unit < end; unit++) {
            const int64_t b = unit / (Hkv * splits), head = unit / splits % Hkv, first = unit % splits * per_unit;
            const int64_t count = std::min(queries, first + per_unit) - first;
            const scalar_t* kh = ks + head * k.stride(1);
            const scalar_t* vh = vs + head * v.stride(1);
            auto out_of = [&](int64_t j) {  // query j of the unit is query head head * group + j % group of token t
                const int64_t t = (first + j) / group, h = head * group + (first + j) % group;
                return (b * T + t) * Hq + h;
            };
            int64_t n = 0;  // positions any query of this unit attends to
            for (int64_t j = 0; j < count; j++) {
                const int64_t t = (first + j) / group;
                last[j] = std::min(positions[b * T + t], totals[b] - 1);
                n = std::max(n, last[j] + 1);
                const scalar_t* qj = qs + out_of(j) * D;
                for (int64_t d = 0; d < D; d++) query[j * D + d] = static_cast<float>(qj[d]) * scale;
            }
            if (b != slots_of) {  // the slot of each position: the row's pages in the table's order
                slots.clear();
                for (int64_t w = 0; w * page_size < totals[b] && w < W; w++)
                    for (int64_t i = 0; i < page_size; i++) slots.push_back(tables[b * W + w] * page_size + i);
                slots_of = b;
            }
            const int64_t stride = (n + 7) / 8 * 8;  // scores per query, whole vectors of 8
            scores.resize(count * stride);
            for (int64_t p0 = 0; p0 < stride; p0 += 8) {  // 8 positions' keys, read once for every query
                for (int64_t j = 0; j < count; j++) {
                    Floats dots[8];
                    for (int i = 0; i < 8; i++)
                        dots[i] = p0 + i < n ? dot(query.data() + j * D, kh + slots[p0 + i] * k.stride(0), D) : zeros();
                    _mm256_storeu_ps(scores.data() + j * stride + p0, sums_of_8(dots));
                }
            }
            for (int64_t j = 0; j < count; j++) {  // softmax's exp(score - max) in place; the sum divides at the end
                float* s = scores.data() + j * stride;
                const int64_t seen = last[j] + 1;
                float top = -std::numeric_limits<float>::infinity();
                for (int64_t p = 0; p < seen; p++) top = std::max(top, s[p]);
                std::fill(s + std::max<int64_t>(seen, 0), s + stride, -std::numeric_limits<float>::infinity());
                __m256 sums = _mm256_setzero_ps();
                for (int64_t p0 = 0; p0 < seen; p0 += 8) {
                    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + p0), _mm256_set1_ps(top)));
                    _mm256_storeu_ps(s + p0, e);
                    sums = _mm256_add_ps(sums, e);
                }
                const float sum = sum8(sums);
                norm[j] = sum > 0.0f ? 1.0f / sum : 0.0f;
            }
            // the values in slices of 64 (then 16) columns, each slice read once for every query
            auto slice = [&]<int parts>(int64_t d0) {
                auto value = [&](int64_t p) { return vh + slots[p] * v.stride(0) + d0; };
                for (int64_t j = 0; j < count; j++)
                    weighted_sum<parts>(scores.data() + j * stride, last[j] + 1, value, norm[j], os + out_of(j) * Dv + d0);
            };
            int64_t d0 = 0;
            for (; d0 + 64 <= Dv; d0 += 64) slice.template operator()<4>(d0);
            for (; d0 < Dv; d0 += 16) slice.template operator()<1>(d0);
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
