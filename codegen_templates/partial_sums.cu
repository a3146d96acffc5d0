
// ${rule_name}: first launch of two. Block b sums the rule's reductions over chunk b (float64,
// in an order fixed by the block size) and writes chunk_partials[b * ${n_reductions} + r].
// ${update_kernel} then adds up the partials of each tensor. No atomics: same bits on every run.
extern "C" __global__ void __launch_bounds__(${block}) ${kernel_name}(
    const unsigned long long* __restrict__ tensor_ptrs,
    const long long* __restrict__ tensor_numel,
    const int2* __restrict__ chunk_table,
    const double* __restrict__ per_tensor_values,
    double* __restrict__ chunk_partials${scalar_params})
{
    constexpr int BLOCK = ${block};
    constexpr long long CHUNK = ${chunk};
    constexpr int VEC = ${vec};
    const int2 chunk = chunk_table[blockIdx.x];
    const int tensor = chunk.x;
    const long long numel = tensor_numel[tensor];
    const long long begin = (long long)chunk.y * CHUNK;
    const long long end = begin + CHUNK < numel ? begin + CHUNK : numel;
${slot_pointers}
    // Values uniform over the tensor, computed once per block.
${uniform_values}

${accumulators}
    // One element: the terms of the sums, in the rule's order (%N = ... as in the rule).
    auto accumulate = [&](${element_params}) {
${element_body}
    };

    const bool aligned = ${aligned};
    for (long long i = begin + (long long)threadIdx.x * VEC; i < end; i += (long long)BLOCK * VEC) {
        if (aligned && i + VEC <= end) {
${pack_body}
        } else {
            for (int k = 0; k < VEC && i + k < end; ++k) {
${element_call}
            }
        }
    }

    __shared__ double scratch[BLOCK / 32 + 1];
${block_sums}
}
