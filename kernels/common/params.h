#pragma once

// Parameter structs shared by the CPU (kernels/cpu) and CUDA (kernels/cuda) implementations of
// every op. One struct per op; both implementations take the same struct, so the CPU version is
// the oracle for the CUDA one. No CUDA headers here (DESIGN.md section 2).
//
// Layout conventions: row-major, the last dimension contiguous. Shapes are given per field.

#include <cstdint>

namespace moleserve::kernels {

// Element type of activation/weight pointers that are declared `void*`.
enum class ScalarType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight[:]   (Llama RMSNorm, fp32 math)
struct RmsNormParams {
  const void* x = nullptr;       // [rows, cols]
  const void* weight = nullptr;  // [cols]
  void* y = nullptr;             // [rows, cols]; may alias x (not with residual)
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 1e-6f;
  ScalarType dtype = ScalarType::kF32;
  // Residual add fused in front (a decoder layer's "h = h + block(h); norm(h)"): when set,
  // residual[r, c] += x[r, c] first, rounded to dtype and written back (the residual stream, as
  // an Add would leave it), and y = RMSNorm(residual) instead of RMSNorm(x). y must not alias
  // residual or x.
  void* residual = nullptr;  // [rows, cols]
};

// out[t, i] = silu(gate[t, i]) * up[t, i]   (SwiGLU)
struct SiluMulParams {
  const void* gate = nullptr;  // [rows, in_stride]
  const void* up = nullptr;    // [rows, in_stride]
  void* out = nullptr;         // [rows, cols]; may alias gate or up when in_stride == cols
  int64_t rows = 0;
  int64_t cols = 0;
  ScalarType dtype = ScalarType::kF32;
  // Elements between rows of gate and up (0: cols); 2 * cols for the halves of a fused gate|up
  // projection (gate = its first column, up = column cols).
  int64_t in_stride = 0;
};

// out[t, :] = table[ids[t], :]. Ids are validated by the caller (ids[t] < vocab).
struct EmbeddingParams {
  const int32_t* ids = nullptr;  // [num_tokens]
  const void* table = nullptr;   // [vocab, table_stride]
  void* out = nullptr;           // [num_tokens, hidden]
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  ScalarType dtype = ScalarType::kF32;
  int64_t table_stride = 0;  // elements between table rows (0: hidden)
};

// out[i] = a[i] + b[i]
struct AddParams {
  const void* a = nullptr;  // [n]
  const void* b = nullptr;  // [n]
  void* out = nullptr;      // [n]; may alias a or b
  int64_t n = 0;
  ScalarType dtype = ScalarType::kF32;
};

// x[r, c] += bias[c]   (the bias of an nn.Linear, applied after its GEMM), then, when relu,
// x[r, c] = max(x[r, c], 0) (an nn.Linear followed by a ReLU; bias may then be nullptr).
struct BiasAddParams {
  void* x = nullptr;           // [rows, cols], updated in place
  const void* bias = nullptr;  // [cols]
  int64_t rows = 0;
  int64_t cols = 0;
  ScalarType dtype = ScalarType::kF32;
  bool relu = false;
};

// y[m, n] = alpha * sum_k x[m, k] * w[n, k] + beta * y[m, n]   (x W^T, the nn.Linear layout)
// y_f32: y is fp32 whatever dtype is (the fp32 accumulator rounded once to fp32, not to dtype):
// logits and router logits, whose ties must not be made by a bf16 rounding.
struct GemmParams {
  const void* x = nullptr;  // [m, k]
  const void* w = nullptr;  // [n, k]
  void* y = nullptr;        // [m, n], dtype (fp32 when y_f32)
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  float alpha = 1.0f;
  float beta = 0.0f;
  ScalarType dtype = ScalarType::kF32;
  bool y_f32 = false;
};

// Rotary position embedding, rotate-half ("NeoX") convention as in HF Llama: for each head and
// i < head_dim/2, with angle = pos * inv_freq[i]:
//   x'[i]          = x[i] cos - x[i + d/2] sin
//   x'[i + d/2]    = x[i + d/2] cos + x[i] sin
// applied in place to q and k.
// Angles: kernels/common/rope_math.h (fp32 position x inv_freq, as Hugging Face).
struct RopeParams {
  void* q = nullptr;                   // [num_tokens, q_stride]: num_q_heads x head_dim used
  void* k = nullptr;                   // [num_tokens, k_stride]: num_kv_heads x head_dim used
  const int32_t* positions = nullptr;  // [num_tokens]
  const float* inv_freq = nullptr;     // [head_dim / 2], already scaled (llama3 etc.)
  int64_t num_tokens = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  ScalarType dtype = ScalarType::kF32;
  // Elements between tokens' rows (0: dense). Both the width of the fused q|k|v projection when
  // q and k are its columns.
  int64_t q_stride = 0;
  int64_t k_stride = 0;
};

// Paged KV cache, vLLM-style. One cache tensor per layer for K and one for V:
//   [num_blocks, block_size, num_kv_heads, head_dim]
// A sequence's logical position p lives in physical block block_table[p / block_size], row
// p % block_size. Block tables of all sequences of a step are concatenated into `block_tables`;
// sequence s's table starts at block_table_offsets[s].
struct PagedKvLayout {
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const int32_t* block_tables = nullptr;         // concatenated, int32 block ids
  const int32_t* block_table_offsets = nullptr;  // [num_seqs + 1]
  int32_t num_seqs = 0;
  int32_t block_size = 16;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
};

// Writes the step's new K and V rows into the paged cache at each token's position.
struct KvWriteParams {
  PagedKvLayout kv;
  const void* k = nullptr;             // [num_tokens, kv_stride]: num_kv_heads x head_dim used
  const void* v = nullptr;             // [num_tokens, kv_stride]
  const int32_t* token_seq = nullptr;  // [num_tokens] sequence index of each token
  const int32_t* positions = nullptr;  // [num_tokens]
  int64_t num_tokens = 0;
  ScalarType dtype = ScalarType::kF32;
  int64_t kv_stride = 0;  // elements between tokens' rows of k and v (0: dense)
  // RoPE fused in front (optional): when rope_inv_freq is set, this is Rope (q: num_q_heads
  // heads at q_stride, k: the cache's heads at kv_stride, both rotated in place) and then the
  // write, in one kernel.
  const float* rope_inv_freq = nullptr;  // [head_dim / 2], as RopeParams::inv_freq
  void* q = nullptr;                     // [num_tokens, q_stride]
  int32_t num_q_heads = 0;
  int64_t q_stride = 0;
};

// The Rope a KvWrite with RoPE fused in (rope_inv_freq set) applies before its write.
inline RopeParams FusedRopeOf(const KvWriteParams& p) {
  return {.q = p.q,
          .k = const_cast<void*>(p.k),  // rotated in place: k must be writable then
          .positions = p.positions,
          .inv_freq = p.rope_inv_freq,
          .num_tokens = p.num_tokens,
          .num_q_heads = p.num_q_heads,
          .num_kv_heads = p.kv.num_kv_heads,
          .head_dim = p.kv.head_dim,
          .dtype = p.dtype,
          .q_stride = p.q_stride,
          .k_stride = p.kv_stride};
}

// Causal grouped-query attention over the paged cache for a flat batch of mixed prefill and decode
// tokens: token t of sequence s attends to positions 0..positions[t] of s (which must already be in
// the cache, i.e. KvWrite ran first), or with sliding_window W > 0 only to the last W of them
// (positions[t] - W < j <= positions[t], Mistral). Query head h reads KV head
// h / (num_q_heads / num_kv_heads).
struct PagedAttentionParams {
  PagedKvLayout kv;
  const void* q = nullptr;             // [num_tokens, q_stride]: num_q_heads x head_dim used
  void* out = nullptr;                 // [num_tokens, num_q_heads, head_dim]
  const int32_t* token_seq = nullptr;  // [num_tokens]
  const int32_t* positions = nullptr;  // [num_tokens]
  int64_t num_tokens = 0;
  int32_t num_q_heads = 0;
  float scale = 1.0f;          // usually 1 / sqrt(head_dim)
  int32_t sliding_window = 0;  // 0 = full causal attention
  ScalarType dtype = ScalarType::kF32;
  int64_t q_stride = 0;  // elements between tokens' rows of q (0: dense)
  // Split-KV scratch, filled in by the CUDA backend and ignored on the CPU. When tokens x KV heads
  // leave streaming multiprocessors idle (decode at small batches), the CUDA launcher splits each
  // token's keys over up to kMaxAttentionSplits blocks that write partial softmax states here,
  // and merges them in split order (launch_plan.h PlanGroupedAttention). The split count depends
  // only on the shapes, never on the context length, so a captured graph keeps it.
  float* split_workspace = nullptr;
  int64_t split_workspace_floats = 0;
  int32_t num_sms = 0;  // the device's multiprocessors; 0: never split
};

// Segmented GEMM over (row, expert) pairs, the LoRA "shrink" half (SGMV, as in Punica/S-LoRA):
//   v[p, i] = sum_k x[x_row[p], k] * A_s[i, k]       for each pair p of segment s and i < rank[s]
// Pairs are grouped by expert into segments: segment s owns pairs seg_start[s] .. seg_start[s+1)
// and applies one expert. Expert weights are reached through a row table so that a paged expert
// cache can place every rank row anywhere: row i of segment s's A is
//   a_rows[seg_row_offset[s] + i]   (`in` elements, contiguous).
// Gather of the input rows is fused (x_row); each expert's rows are read once per call no matter
// how many pairs use them. Columns i >= rank[s] of v are left untouched. Accumulation is fp32.
struct SgmvShrinkParams {
  const void* x = nullptr;                  // [*, in], dtype
  float* v = nullptr;                       // [num_pairs, v_stride] fp32
  const int32_t* x_row = nullptr;           // [num_pairs] row of x for each pair
  const int32_t* seg_start = nullptr;       // [num_segments + 1], seg_start[0] == 0, non-decreasing
  const int32_t* seg_rank = nullptr;        // [num_segments], 0 <= rank <= v_stride
  const int64_t* seg_row_offset = nullptr;  // [num_segments] first row-table entry of segment s
  const void* const* a_rows = nullptr;      // row table: pointers to `in`-wide rows, dtype
  int32_t num_segments = 0;
  int64_t in = 0;        // >= 1 when num_segments > 0
  int32_t v_stride = 0;  // >= max rank
  ScalarType dtype = ScalarType::kF32;
  // Split-K scratch, filled in by the CUDA backend and ignored on the CPU: with too few
  // (segment, rank tile) blocks to fill the device, the bf16 tensor-core shrink splits `in` over
  // several blocks that write partial sums here, reduced in split order by a second kernel
  // (launch_plan.h PlanSgmvShrinkTiles). max_pairs bounds seg_start[num_segments] (the tables are
  // on the device); 0 means unknown, and then nothing is split.
  int32_t max_pairs = 0;
  float* split_workspace = nullptr;
  int64_t split_workspace_floats = 0;
  int32_t num_sms = 0;
};

// The pairs a v buffer of v_bytes holds at v_stride floats a pair: a valid max_pairs for a
// shrink writing that buffer (its pairs must fit in it).
inline int32_t PairsThatFit(size_t v_bytes, int32_t v_stride) {
  if (v_stride <= 0) return 0;
  const size_t pairs = v_bytes / sizeof(float) / static_cast<size_t>(v_stride);
  return pairs > 0x7fffffff ? 0x7fffffff : static_cast<int32_t>(pairs);
}

// The "expand" half of the segmented LoRA GEMM, owned by output rows. Bt_s is segment s's
// expert B transposed (rank-major, so a rank row is one page): row i is
// b_rows[seg_row_offset[s] + i] (`out` elements, contiguous). For each row t < num_tokens
// (active[t] != 0 when active is given) and column j,
//   y[r, j] += sum_{q < count[t]} weight[p] * sum_{i < rank[s]} v[p, i] * Bt_s[i, j]
// with r = y_row[t] (t when y_row is null; rows distinct), p = token_pair[t * pair_stride + q]
// and s the segment holding pair p (seg_start). weight[p] carries everything multiplicative
// (gate weight x LoRA scale); a pair belongs to at most one row. On the device the sum runs in q
// order in fp32 and is added to y once (one rounding per element in bf16), with no atomics: the
// same inputs give the same bits on every run, whichever pairs share a row (a token routed to k
// experts). The CPU twin (fp32 y) adds a row's pairs in place in segment order.
struct SgmvExpandRowsParams {
  const float* v = nullptr;                 // [num_pairs, v_stride] fp32
  void* y = nullptr;                        // [*, y_stride], dtype, accumulated into
  const int32_t* y_row = nullptr;           // [num_tokens], distinct, or nullptr: row t
  const int32_t* token_pair = nullptr;      // [num_tokens, pair_stride]
  const int32_t* count = nullptr;           // [num_tokens], 0..pair_stride
  const int32_t* active = nullptr;          // [num_tokens] or nullptr (all)
  const float* weight = nullptr;            // [num_pairs]
  const int32_t* seg_start = nullptr;       // [num_segments + 1]
  const int32_t* seg_rank = nullptr;        // [num_segments]
  const int64_t* seg_row_offset = nullptr;  // [num_segments]
  const void* const* b_rows = nullptr;      // row table: `out`-wide rows, dtype
  int64_t num_tokens = 0;
  int32_t pair_stride = 0;
  int32_t num_segments = 0;
  int64_t out = 0;
  int32_t v_stride = 0;
  ScalarType dtype = ScalarType::kF32;
  // Elements between rows of y (0: out): a module's columns of a fused projection's output.
  int64_t y_stride = 0;
};

// y[y_row[r], :] += sum_{q < count[r]} weight[i] * x[i, :] with i = src[r * src_stride + q],
// for r < rows: the sum runs in q order in fp32 and is added to y once, with no atomics (each
// output row is owned by one reduction; y rows distinct). weight == nullptr: 1. (MixLoRA's
// weighted sum of the k expert activations of a token.)
struct GatherAddParams {
  const void* x = nullptr;         // [x_rows, cols]
  void* y = nullptr;               // [*, cols], accumulated into
  const int32_t* y_row = nullptr;  // [rows], distinct
  const int32_t* src = nullptr;    // [rows, src_stride], rows of x
  const int32_t* count = nullptr;  // [rows], 0..src_stride
  const float* weight = nullptr;   // [x_rows] or nullptr
  int64_t rows = 0;
  int32_t src_stride = 0;
  int64_t x_rows = 0;
  int64_t cols = 0;
  ScalarType dtype = ScalarType::kF32;
};

// dst[i] = src[i] converted (bf16 <-> fp32 with round-to-nearest-even, or a copy).
struct ConvertParams {
  const void* src = nullptr;  // [n], src_dtype
  void* dst = nullptr;        // [n], dst_dtype; must not overlap src (dst == src with equal
                              // dtypes is allowed: nothing to do)
  int64_t n = 0;
  ScalarType src_dtype = ScalarType::kF32;
  ScalarType dst_dtype = ScalarType::kF32;
};

// Selection rules of lora-granular routers (engine/routing's RoutingAlgorithm minus rank_topk).
// kXlora: X-LoRA's per-module weights (MOLE_FORMAT 2): the logits are the token's scalings
// themselves (no softmax): the top k of them (k < 1: all) in descending order, softmaxed over the
// kept ones when renormalize (softmax_topk).
enum class RouteRule : int32_t { kTopK = 0, kTopP, kDynMole, kSoft, kSwitch, kXlora };

// Widest router a routing kernel handles (experts, or ranks for rank routing).
inline constexpr int32_t kMaxRouteWidth = 128;

// Per token t: p = softmax(logits[t] / temperature) and the rule's selection (routing_math.h),
// experts[t, 0..count[t]) in descending weight (ties: lower index), weights alike. count[t] = 0
// when the token's logits are undefined (NaN, +inf, all -inf): the caller reports it.
struct RouteParams {
  const float* logits = nullptr;  // [num_tokens, logits_stride] fp32, num_experts used per row
  int64_t logits_stride = 0;      // 0: num_experts
  int32_t* experts = nullptr;     // [num_tokens, num_experts]
  float* weights = nullptr;       // [num_tokens, num_experts]
  int32_t* count = nullptr;       // [num_tokens]
  // [num_tokens] or nullptr (all): tokens with active[t] == 0 are not routed (count 0), so one
  // launch over a whole batch routes only one adapter's tokens.
  const int32_t* active = nullptr;
  int64_t num_tokens = 0;
  int32_t num_experts = 0;  // 1..kMaxRouteWidth
  RouteRule rule = RouteRule::kTopK;
  int32_t k = 2;
  float p = 0.0f;
  bool p_within = false;  // kTopP: "within" instead of "exceed" (kDynMole is always within)
  int32_t min_k = 0;
  float temperature = 1.0f;
  float prob_temperature = 0.0f;
  bool renormalize = true;
  // Experts whose probability is exactly 0 (a logit of -inf: an output gate's disabled expert)
  // are not routed to; without it, soft and top-k list them with weight 0.
  bool drop_zero = false;
  bool entropy_gate = false;  // kDynMole
  double entropy_q = 1.1;
  double entropy_threshold = 0.9;
  double entropy_eps = 1e-5;
};

// Mixture of Routers (MoR): M sub-routers and a main router that weighs them. For rows r with
// active[r] != 0 (all when active is null), fp32, from x[r] = [sub_0 logits (E) | ... |
// sub_{M-1} logits (E) | main logits (M)]:
//   y[r, e] = log(sum_j softmax(main)_j * softmax(sub_j)_e),
// the log of the mixed probabilities, so that the routing kernels' softmax (temperature 1) gives
// them back to top-k / top-p. A row whose softmaxes are undefined (NaN, +inf) is all NaN (Route
// then routes nobody there, as for any undefined logits).
inline constexpr int32_t kMaxMixRouters = 16;
struct MixRouterParams {
  const float* x = nullptr;         // [rows, routers * experts + routers]
  float* y = nullptr;               // [rows, experts]; must not alias x
  const int32_t* active = nullptr;  // [rows] or nullptr
  int64_t rows = 0;
  int32_t experts = 0;  // E: 1..kMaxRouteWidth
  int32_t routers = 0;  // M: 1..kMaxMixRouters
};

// Output-gated MoLE's gate (Wu, Huang, Wei 2024), fp32, per row r of the experts' concatenated
// outputs d [rows, width] (dtype): logits[r, e] = logits[r, e] / max(||d[r]||_2, 1e-12) +
// (mask ? mask[r, e] : 0). The caller's GEMM wrote logits = d W^T; this turns it into W applied
// to the L2-normalised concatenation (torch's F.normalize), and a request's disabled experts get
// a mask of -inf. The norm accumulates in fp32 (CUDA) or double (CPU).
struct OutputGateScaleParams {
  const void* d = nullptr;      // [rows, width]
  float* logits = nullptr;      // [rows, experts], in place
  const float* mask = nullptr;  // [rows, experts] or nullptr
  int64_t rows = 0;
  int64_t width = 0;
  int32_t experts = 0;  // any number (the host path routes more than kMaxRouteWidth)
  ScalarType dtype = ScalarType::kF32;
};

// Softmax over groups of `group` columns (X-LoRA's classifier output: one group of N adapters per
// module row), fp32: for rows r with active[r] != 0 (all when active is null),
// y[r, j*group .. (j+1)*group) = softmax(x[r, same] / temperature) (routing_math::Softmax; NaN
// over the group when undefined, as engine/routing's SoftmaxF32), or a copy when !softmax.
struct SoftmaxGroupsParams {
  const float* x = nullptr;         // [rows, cols]
  float* y = nullptr;               // [rows, y_stride]; may alias x when y_stride == cols
  const int32_t* active = nullptr;  // [rows] or nullptr
  int64_t rows = 0;
  int64_t cols = 0;      // a multiple of group
  int64_t y_stride = 0;  // 0: cols
  int32_t group = 1;
  float temperature = 1.0f;
  bool softmax = true;
};

// Rank routing (FlyLoRA without router_logits, SMoRA with), per token t over r ranks of the
// shrink output z (routing_math.h RouteRanksOne): kept[t, 0..k) and u[t, 0..r). ok[t] = 0 on NaN
// or an undefined softmax; such tokens also add 1 each to *undefined when it is given. Tokens
// with active[t] == 0 (when active is given) are not routed: ok[t] = 1, kept and u untouched.
struct RankRouteParams {
  const float* z = nullptr;              // [num_tokens, z_stride]
  const float* router_logits = nullptr;  // [num_tokens, rank] or nullptr (FlyLoRA)
  const float* select_bias = nullptr;    // [rank] or nullptr
  float* u = nullptr;                    // [num_tokens, z_stride]; must not alias z
  int32_t* kept = nullptr;               // [num_tokens, k]
  int32_t* ok = nullptr;                 // [num_tokens]
  int32_t* undefined = nullptr;          // [1] or nullptr, accumulated into
  const int32_t* active = nullptr;       // [num_tokens] or nullptr (all)
  int64_t num_tokens = 0;
  int32_t rank = 0;  // 1..kMaxRouteWidth
  int32_t z_stride = 0;
  int32_t k = 1;
  bool select_on_abs = false;
  float temperature = 1.0f;
  bool renormalize = true;
};

// Segments of a segmented GEMM from per-token routing decisions (RouteParams outputs), built on
// the device so that a routed module never waits for the host: pairs ordered by expert, within an
// expert by token. For expert e: seg_start[e] .. seg_start[e+1) are the tokens that chose e,
// pair_row[p] = rows[t] (the token's row in x and y), pair_weight[p] = weights[t, j] * scale[e];
// seg_rank[e] = rank and seg_row_offset[e] = e * rank (the stack's row table holds every expert,
// in order). Tokens with count 0 (undefined logits) add 1 each to *undefined and get no pairs;
// inactive tokens (active[t] == 0) get no pairs and are not undefined.
struct SegmentBuildParams {
  const int32_t* experts = nullptr;   // [num_tokens, num_experts]
  const float* weights = nullptr;     // [num_tokens, num_experts]
  const int32_t* count = nullptr;     // [num_tokens]
  const int32_t* rows = nullptr;      // [num_tokens]
  const float* scale = nullptr;       // [num_experts]
  const int32_t* active = nullptr;    // [num_tokens] or nullptr: inactive tokens count nowhere
  int32_t* pair_row = nullptr;        // [num_tokens * num_experts]
  float* pair_weight = nullptr;       // [num_tokens * num_experts]
  int32_t* seg_start = nullptr;       // [num_experts + 1]
  int32_t* seg_rank = nullptr;        // [num_experts]
  int64_t* seg_row_offset = nullptr;  // [num_experts]
  // [num_tokens, num_experts] or nullptr: the pair of each decision (t, j < count[t]), for
  // SgmvExpandRows.
  int32_t* token_pair = nullptr;
  // [num_tokens, num_experts] or nullptr: 1 for the decisions (j < count[t]), 0 for the other
  // slots (an SgmvExpandRows over decision slots, one output row each: MixLoRA's per-expert
  // gate and up projections).
  int32_t* slot_count = nullptr;
  // pair_row[p] = t * num_experts + j, the decision's slot, instead of rows[t] (rows unused):
  // MixLoRA's down projection reads each expert's activation from its slot's row.
  bool slot_rows = false;
  int32_t* undefined = nullptr;  // [1], accumulated into
  int32_t num_tokens = 0;
  int32_t num_experts = 0;  // 1..kMaxRouteWidth
  int32_t rank = 0;
};

// ---- Sampling (the next token of each row on the device; kernels/common/sampling_math.h) ----

// Most alternatives a row can ask for (SampleRowParams::num_top_logprobs).
inline constexpr int32_t kMaxSampleTopLogprobs = 20;
// Temperatures below this are greedy (dividing logits by a tinier one only overflows).
inline constexpr float kSampleGreedyTemperature = 1e-5f;

// What one row asks of the sampler (engine/sampling's SamplingParams, resolved for this step).
struct SampleRowParams {
  float temperature = 0.0f;  // < kSampleGreedyTemperature: argmax
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float frequency_penalty = 0.0f;
  float presence_penalty = 0.0f;
  int32_t num_top_logprobs = 0;  // 0..kMaxSampleTopLogprobs
  double uniform = 0.0;          // this step's draw in [0, 1) (ignored when greedy)
  // The row's penalty entries: penalty_ids / penalty_counts [penalty_begin, penalty_end).
  int32_t penalty_begin = 0;
  int32_t penalty_end = 0;
  // The row's logit bias entries (OpenAI logit_bias): bias_ids / bias_values
  // [bias_begin, bias_end), distinct ids, added to the penalised logits.
  int32_t bias_begin = 0;
  int32_t bias_end = 0;
  // >= 0: the row is scored, not sampled (a prompt position's logprob): id = forced_id, with its
  // logprob and alternatives; penalties, bias and the draw are skipped.
  int32_t forced_id = -1;
};

// What the sampler returns per row. id = -1 and finite = 0 when the row's logits hold a NaN or
// an infinity (nothing else is written then).
struct SampledRow {
  int32_t id = -1;
  float logprob = 0.0f;  // log-softmax of the raw logits at id
  int32_t finite = 0;
  int32_t num_top = 0;  // entries written to the row's top_ids / top_logprobs
};

// Per row r (one block per row on the device):
//   - rows whose logits are not all finite are reported (SampledRow::finite = 0);
//   - logprob and up to num_top_logprobs alternatives from the raw logits' log-softmax, in
//     descending order, ties to the lower id;
//   - penalties on a copy: for each entry (id, count) of the row, repetition_penalty when it
//     is not 1 (HF: divide positive logits, multiply negative ones; entries are every id of the
//     prompt and the output), then frequency_penalty * count + presence_penalty when count > 0
//     (OpenAI: output tokens only);
//   - then, for each bias entry (id, value) of the row, w[id] += value (OpenAI logit_bias);
//   - forced_id >= 0: the token is forced_id (scoring: nothing above this line but the logprob
//     and the alternatives is done);
//   - temperature < kSampleGreedyTemperature: the argmax, ties to the lower id;
//   - otherwise w = (logit - max) / temperature, probabilities exp(w) over the candidates in
//     descending order (ties to the lower id): the top_k first (when 0 < top_k < vocab), then the
//     shortest prefix whose normalised mass reaches top_p (when top_p < 1), then those with
//     probability >= min_p * the largest (when min_p > 0); the token is the first candidate whose
//     cumulative probability exceeds uniform * their total (the last one if rounding leaves none).
struct SampleParams {
  const float* logits = nullptr;                // [rows, vocab] fp32
  float* work = nullptr;                        // [rows, vocab] fp32 scratch
  const SampleRowParams* row_params = nullptr;  // [rows]
  const int32_t* penalty_ids = nullptr;         // entries of every row, distinct within a row
  const int32_t* penalty_counts = nullptr;      // output occurrences (0: prompt only)
  const int32_t* bias_ids = nullptr;            // entries of every row, distinct within a row
  const float* bias_values = nullptr;
  SampledRow* out = nullptr;      // [rows]
  int32_t* top_ids = nullptr;     // [rows, kMaxSampleTopLogprobs] or nullptr
  float* top_logprobs = nullptr;  // [rows, kMaxSampleTopLogprobs] or nullptr
  int64_t rows = 0;
  int32_t vocab = 0;
};

}  // namespace moleserve::kernels
