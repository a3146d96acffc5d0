
// ${rule_name}: the update. One block per chunk of ${chunk} elements of one tensor; the launch
// covers every tensor of the group through tables in device memory:
//   tensor_ptrs[t * ${n_slots} + s]   address of slot s (${slot_list}) of tensor t
//   tensor_numel[t]                   its number of elements
//   chunk_table[b]                    (tensor, index of the chunk within that tensor) of block b
//   per_tensor_values[t * ${n_per_tensor_stride} + j]  the rule's per-tensor values, as double
${partials_doc}${lr_source_doc}extern "C" __global__ void __launch_bounds__(${block}) ${kernel_name}(
    const unsigned long long* __restrict__ tensor_ptrs,
    const long long* __restrict__ tensor_numel,
    const int2* __restrict__ chunk_table,
    const double* __restrict__ per_tensor_values,
    const double* __restrict__ chunk_partials${scalar_params})
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
${tensor_sums}
    // Values uniform over the tensor, computed once per block.
${uniform_values}

    // One element: the rule's elementwise nodes, in the rule's order (%N = ... as in the rule).
    auto update = [&](${element_params}) {
${element_body}
    };

    // Each iteration, a thread takes VEC elements: i + k * spacing for k < VEC. When every slot
    // of the tensor is aligned for wide accesses, the VEC consecutive elements from i (one
    // 16-byte access per slot and thread, but at the end of the tensor); otherwise (a view at an
    // offset into a larger buffer) elements BLOCK apart, so that consecutive threads touch
    // consecutive elements and every scalar access of a warp is coalesced.
    const bool aligned = ${aligned};
    const long long spacing = aligned ? 1 : BLOCK;
    for (long long i = begin + (long long)threadIdx.x * (aligned ? VEC : 1); i < end;
         i += (long long)BLOCK * VEC) {
        const bool wide = aligned && i + VEC <= end;
${load_packs}
        #pragma unroll
        for (int k = 0; k < VEC; ++k) {
            if (i + k * spacing < end) {
${element_call}
            }
        }
${store_packs}
    }
}
