
// ${rule_name}: second launch of three, over the same blocks and arguments. The block of each
// tensor's first chunk adds that tensor's chunk partials (written by ${partial_sums_kernel}) in a
// fixed order, in float64, and writes the totals over the partials of that first chunk:
// chunk_partials[(first chunk) * ${n_reductions} + r]. Every other block returns at once.
// ${update_kernel} reads the totals there, one load per block: each tensor is summed once.
extern "C" __global__ void __launch_bounds__(${block}) ${kernel_name}(
    const unsigned long long* __restrict__ tensor_ptrs,
    const long long* __restrict__ tensor_numel,
    const int2* __restrict__ chunk_table,
    const double* __restrict__ per_tensor_values,
    double* __restrict__ chunk_partials${scalar_params})
{
    constexpr int BLOCK = ${block};
    constexpr long long CHUNK = ${chunk};
    const int2 chunk = chunk_table[blockIdx.x];
    if (chunk.y != 0) {
        return;
    }
    const long long first_chunk = blockIdx.x;
    const int n_chunks = (int)((tensor_numel[chunk.x] + CHUNK - 1) / CHUNK);

${chunk_sums}
    // block_sum synchronizes the block: every partial has been read before one is overwritten.
    __shared__ double scratch[BLOCK / 32 + 1];
${totals}
}
