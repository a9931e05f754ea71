// Bodies of the CPU kernels, included by msda_cpu.cpp once per instruction set with
// MSDA_ISA (a namespace name) and MSDA_TARGET (a function attribute selecting the ISA, empty
// for the baseline) defined. One call processes a contiguous range of the parallel loop;
// msda_cpu.cpp splits the loop across threads (the ISA attribute would not reach a lambda).
// No include guard on purpose: included once per instruction set.

namespace MSDA_ISA {

// Forward over (n, query) rows [begin, end): each (n, query, head) accumulates its L * P
// samples in a D-wide accumulator and writes its output row once.
template <typename scalar_t, int kChannels>
MSDA_TARGET void forward_range(const ForwardArgs<scalar_t>& args, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = args.geometry;
  const int64_t D = kChannels > 0 ? kChannels : g.channels;
  const int64_t M = g.heads, L = g.levels, P = g.points, S = g.value_len;
  const int64_t row_stride = M * D;  // between the rows of two pixels of one head
  std::vector<scalar_t> zero_row(D, scalar_t(0));  // stands in for corners outside the map
  std::vector<acc_t> acc_heap(kChannels > 0 ? 0 : D);
  acc_t acc_stack[kChannels > 0 ? kChannels : 1];
  acc_t* acc = kChannels > 0 ? acc_stack : acc_heap.data();
  for (int64_t nq = begin; nq < end; ++nq) {
    const scalar_t* value_n = args.value + (nq / g.queries) * S * row_stride;
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t d = 0; d < D; ++d) acc[d] = acc_t(0);
      const int64_t sample0 = (nq * M + m) * L * P;
      for (int64_t l = 0; l < L; ++l) {
        const Level lv = args.levels[l];
        const int32_t height = static_cast<int32_t>(lv.height);
        const int32_t width = static_cast<int32_t>(lv.width);
        const scalar_t* level_value = value_n + lv.start * row_stride + m * D;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t s = sample0 + l * P + p;
          const Corners<acc_t> c = bilinear_corners<acc_t>(
              args.locations[2 * s], args.locations[2 * s + 1], height, width);
          if (all_outside(c.pixel)) continue;
          const acc_t a = args.weights[s];
          const scalar_t* r[4];
          acc_t w[4];
          for (int k = 0; k < 4; ++k) {
            r[k] = c.pixel[k] >= 0 ? level_value + c.pixel[k] * row_stride : zero_row.data();
            w[k] = a * c.weight[k];
          }
          const scalar_t *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
          const acc_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            acc[d] += w0 * acc_t(r0[d]) + w1 * acc_t(r1[d]) + w2 * acc_t(r2[d]) +
                      w3 * acc_t(r3[d]);
          }
        }
      }
      scalar_t* out_row = args.out + (nq * M + m) * D;
      for (int64_t d = 0; d < D; ++d) out_row[d] = scalar_t(acc[d]);
    }
  }
}

// Backward over (n, head) pairs [begin, end): the pair owns grad_value[n, :, head, :], so
// the scatter of grad_value needs neither atomics nor per-thread copies of the whole tensor.
// The pair's value rows are first packed into a contiguous [S, D] block and its gradient
// accumulates in another (float32 for half types): in [N, S, M, D] a head's rows are M * D
// apart, which spreads a 0.7 MB working set over 5.6 MB of pages at the DINO shapes. One
// pass over the samples computes the four corner dot products <value_k, grad_out> and the
// grad_value updates together; the dot products give the location and weight gradients.
template <typename scalar_t, int kChannels>
MSDA_TARGET void backward_range(const BackwardArgs<scalar_t>& args, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = args.geometry;
  const int64_t D = kChannels > 0 ? kChannels : g.channels;
  const int64_t M = g.heads, L = g.levels, P = g.points, S = g.value_len, Lq = g.queries;
  const int64_t row_stride = M * D;
  // One extra row at the end of each block: zeros to read and a sink to write for corners
  // outside the map, so the channel loop has no branches.
  std::vector<scalar_t> value_block((S + 1) * D);
  std::vector<acc_t> grad_block((S + 1) * D);
  std::vector<acc_t> grad_row(D);
  const scalar_t* outside_value = value_block.data() + S * D;
  acc_t* outside_grad = grad_block.data() + S * D;
  constexpr int64_t kPrefetchQueries = 4;
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / M, m = nm % M;
    const scalar_t* value_nm = args.value + n * S * row_stride + m * D;
    for (int64_t s = 0; s < S; ++s) {
      std::memcpy(value_block.data() + s * D, value_nm + s * row_stride, D * sizeof(scalar_t));
    }
    std::fill(value_block.begin() + S * D, value_block.end(), scalar_t(0));
    std::fill(grad_block.begin(), grad_block.end(), acc_t(0));
    for (int64_t q = 0; q < Lq; ++q) {
      const int64_t row = (n * Lq + q) * M + m;
      if (q + kPrefetchQueries < Lq) {  // the next queries' inputs are M rows apart
        const int64_t ahead = row + kPrefetchQueries * M;
        __builtin_prefetch(args.locations + 2 * ahead * L * P);
        __builtin_prefetch(args.locations + 2 * ahead * L * P + 16);
        __builtin_prefetch(args.weights + ahead * L * P);
        __builtin_prefetch(args.grad_out + ahead * D);
      }
      const scalar_t* go = args.grad_out + row * D;
      for (int64_t d = 0; d < D; ++d) grad_row[d] = acc_t(go[d]);
      const acc_t* gr = grad_row.data();
      const int64_t sample0 = row * L * P;
      for (int64_t l = 0; l < L; ++l) {
        const Level lv = args.levels[l];
        const int32_t height = static_cast<int32_t>(lv.height);
        const int32_t width = static_cast<int32_t>(lv.width);
        const scalar_t* level_value = value_block.data() + lv.start * D;
        acc_t* level_grad = grad_block.data() + lv.start * D;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t s = sample0 + l * P + p;
          const Corners<acc_t> c = bilinear_corners<acc_t>(
              args.locations[2 * s], args.locations[2 * s + 1], height, width);
          const acc_t a = args.weights[s];
          if (all_outside(c.pixel)) {
            args.grad_weights[s] = acc_t(0);
            args.grad_locations[2 * s] = acc_t(0);
            args.grad_locations[2 * s + 1] = acc_t(0);
            continue;
          }
          const scalar_t* r[4];
          acc_t* gv[4];
          acc_t wa[4];
          for (int k = 0; k < 4; ++k) {
            const bool inside = c.pixel[k] >= 0;
            r[k] = inside ? level_value + c.pixel[k] * D : outside_value;
            gv[k] = inside ? level_grad + c.pixel[k] * D : outside_grad;
            wa[k] = a * c.weight[k];
          }
          const scalar_t *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
          acc_t *gv0 = gv[0], *gv1 = gv[1], *gv2 = gv[2], *gv3 = gv[3];
          const acc_t wa0 = wa[0], wa1 = wa[1], wa2 = wa[2], wa3 = wa[3];
          acc_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
          for (int64_t d = 0; d < D; ++d) {
            const acc_t gd = gr[d];
            dot0 += gd * acc_t(r0[d]);
            dot1 += gd * acc_t(r1[d]);
            dot2 += gd * acc_t(r2[d]);
            dot3 += gd * acc_t(r3[d]);
            gv0[d] += wa0 * gd;
            gv1[d] += wa1 * gd;
            gv2[d] += wa2 * gd;
            gv3[d] += wa3 * gd;
          }
          const acc_t dots[4] = {dot0, dot1, dot2, dot3};
          const SampleGradsT<acc_t> sg = sample_grads<acc_t>(c, dots, a, height, width);
          args.grad_weights[s] = sg.grad_attn;
          args.grad_locations[2 * s] = sg.grad_loc_x;
          args.grad_locations[2 * s + 1] = sg.grad_loc_y;
        }
      }
    }
    scalar_t* grad_value_nm = args.grad_value + n * S * row_stride + m * D;
    for (int64_t s = 0; s < S; ++s) {
      const acc_t* from = grad_block.data() + s * D;
      scalar_t* to = grad_value_nm + s * row_stride;
      for (int64_t d = 0; d < D; ++d) to[d] = scalar_t(from[d]);
    }
  }
}

}  // namespace MSDA_ISA
