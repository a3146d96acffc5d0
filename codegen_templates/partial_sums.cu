
// ${rule_name}: first launch of three. Block b sums the rule's reductions over chunk b and writes
// chunk_partials[b * ${n_reductions} + r]; ${tensor_sums_kernel} then adds up the partials of each
// tensor, and ${update_kernel} reads the totals.
//
// Each thread adds its elements one run at a time: a run is the (at most VEC) elements it takes
// in one iteration of the element loop. A term that the rule computes in float64 from
// float32-or-narrower values with at most one multiplication (x * x, of a gradient norm) is
// computed in float32, where it differs by at most one rounding, and a run of such terms is
// summed in float32; the run's sum is then added to the thread's float64 sum, unless
// float32_run_ok refuses it (not finite, or so small that underflow may have cost accuracy):
// then the run is added again in float64, as the rule says. A float32 run is within
// (VEC + 1) * 2^-24 of the sum of its terms' magnitudes from its float64 sum. float64 arithmetic
// runs at 1/2 (data-center GPUs) to 1/64 (consumer GPUs) of float32's rate: this way it runs once
// per run, not per element. Other terms are float64 throughout. Across runs, threads and blocks
// the sums are float64, in an order fixed by the block size: no atomics, the same bits on every
// run.
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
${exact_terms}
    // The elements of each iteration as in the update kernel: VEC consecutive ones from i when
    // the tensor is aligned for wide accesses, else VEC ones BLOCK apart (coalesced).
    const bool aligned = ${aligned};
    const long long spacing = aligned ? 1 : BLOCK;
    for (long long i = begin + (long long)threadIdx.x * (aligned ? VEC : 1); i < end;
         i += (long long)BLOCK * VEC) {
        const bool wide = aligned && i + VEC <= end;
${load_packs}
${run_start}        #pragma unroll
        for (int k = 0; k < VEC; ++k) {
            if (i + k * spacing < end) {
${element_call}
            }
        }
${run_end}    }

    __shared__ double scratch[BLOCK / 32 + 1];
${block_sums}
}
