
// ${rule_name}: the update of a rule with per-block values (8-bit state: one scale per block of
// 256 elements). One block per chunk of ${chunk} elements of one tensor; the launch covers every
// tensor of the group through tables in device memory:
//   tensor_ptrs[t * ${n_slots} + s]   address of slot s (${slot_list}) of tensor t; a per-block
//                                     slot (${per_block_list}) holds ceil(numel / 256) values,
//                                     element e's at index e >> 8
//   tensor_numel[t]                   its number of elements
//   chunk_table[b]                    (tensor, index of the chunk within that tensor) of block b
//   per_tensor_values[t * ${n_per_tensor_stride} + j]  the rule's per-tensor values, as double
${partials_doc}${lr_source_doc}//
// Each iteration, thread t takes the VEC consecutive elements from base + t * VEC, so the 256
// elements of a block are held by GROUP = 256 / VEC consecutive threads (chunks start at
// multiples of 256, and BLOCK * VEC is a multiple of 256). The values that need a block's
// reductions are computed after them, from values the early part left in registers: one pass
// over memory. Element slots are moved with one wide access per slot and thread (16 bytes of
// the widest) when every one of the tensor is aligned for it, else element by element (the same
// consecutive elements: the elements of a block must stay with its threads). Every thread runs
// every iteration, its elements past the end of the tensor counting as 0 in the maxima: the
// reductions synchronize the group.
extern "C" __global__ void __launch_bounds__(${block}) ${kernel_name}(
    const unsigned long long* __restrict__ tensor_ptrs,
    const long long* __restrict__ tensor_numel,
    const int2* __restrict__ chunk_table,
    const double* __restrict__ per_tensor_values,
    const double* __restrict__ chunk_partials${scalar_params})
{
    constexpr int BLOCK = ${block};
    constexpr long long CHUNK = ${chunk};
    constexpr int VEC = ${vec};
    constexpr int GROUP = ${group};  // threads per block of 256 elements
    const int2 chunk = chunk_table[blockIdx.x];
    const int tensor = chunk.x;
    const long long numel = tensor_numel[tensor];
    const long long begin = (long long)chunk.y * CHUNK;
    const long long end = begin + CHUNK < numel ? begin + CHUNK : numel;
${slot_pointers}
${tensor_sums}
    // Values uniform over the tensor, computed once per block.
${uniform_values}

${stage_lambdas}

${scratch}    const bool aligned = ${aligned};
    constexpr long long spacing = 1;  // a thread's elements are consecutive, aligned or not
    for (long long base = begin; base < end; base += (long long)BLOCK * VEC) {
        const long long i = base + (long long)threadIdx.x * VEC;
        const bool wide = aligned && i + VEC <= end;
${load_packs}
${block_loop}
${store_packs}
    }
}
