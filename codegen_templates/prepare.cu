
// ${rule_name}: the per-tensor values of a capturable step, computed on the device, so that a
// captured CUDA graph replays with the current step counts and learning rate. Launched before
// ${first_kernel}, one thread per tensor, ${prepare_block} threads per block:
//   steps[t]                          tensor t's step count (float32), incremented here: the
//                                     formulas see this step included
//   per_tensor_values[t * ${n_per_tensor_stride} + j]  value j of ${per_tensor_list}, in float64
//   lr_source                         when not null, the formulas' lr is lr_arg * *lr_source
// The formulas, numbered as the comments below:
${formulas_text}
extern "C" __global__ void __launch_bounds__(${prepare_block}) ${kernel_name}(
    float* __restrict__ steps,
    double* __restrict__ per_tensor_values,
    const float* __restrict__ lr_source,
    const int n_tensors${input_params})
{
    const int tensor = blockIdx.x * ${prepare_block} + threadIdx.x;
    if (tensor >= n_tensors) {
        return;
    }
    const float step_count = steps[tensor] + 1.0f;
    steps[tensor] = step_count;
${formulas}
${writes}
}
