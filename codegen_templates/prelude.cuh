// stepjit CUDA prelude: helpers shared by every generated kernel.
//
// Numerics: compiled without -ftz, with -prec-div, -prec-sqrt and -fmad=false, so float32 and
// float64 arithmetic is IEEE (denormals kept, every operation rounded once, like the reference
// interpreter). Half types are converted to float32 and back with round-to-nearest-even.
#ifndef STEPJIT_PRELUDE_CUH
#define STEPJIT_PRELUDE_CUH

// VEC consecutive elements of one tensor, loaded or stored with one wide memory access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
    return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& x) {
    *reinterpret_cast<Pack<T, N>*>(p) = x;
}

// Whether wide accesses are possible: chunks start at multiples of N, so the base pointer decides.
template <int N, typename T>
__device__ __forceinline__ bool pack_aligned(const T* p) {
    return reinterpret_cast<unsigned long long>(p) % (sizeof(T) * N) == 0;
}

// Whether the float32 sum of a run of terms may stand for its float64 sum (see partial_sums.cu):
// finite, so no float32 product or sum overflowed, and at least 2^-100 in magnitude, so the at
// most 2^-147 that products in float32's subnormal range can lose together is below 2^-47 of it.
// NaN fails both comparisons.
__device__ __forceinline__ bool float32_run_ok(float sum) {
    const float magnitude = fabsf(sum);
    return magnitude >= 0x1p-100f && magnitude <= 0x1.fffffep127f;
}

// maximum / minimum: NaN if either operand is NaN; on a tie (0.0 and -0.0) the second operand.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }
__device__ __forceinline__ double nan_max(double a, double b) { return (a > b || a != a) ? a : b; }
__device__ __forceinline__ float nan_min(float a, float b) { return (a < b || a != a) ? a : b; }
__device__ __forceinline__ double nan_min(double a, double b) { return (a < b || a != a) ? a : b; }

// The sum of one double per thread over the block, returned to every thread.
// The order of the additions depends only on BLOCK: the same inputs give the same bits.
template <int BLOCK>
__device__ __forceinline__ double block_sum(double value, double* scratch) {
    static_assert(BLOCK % 32 == 0 && BLOCK <= 1024, "BLOCK must be a multiple of 32, at most 1024");
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    for (int offset = 16; offset > 0; offset /= 2) {
        value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    if (lane == 0) {
        scratch[warp] = value;
    }
    __syncthreads();
    if (warp == 0) {
        value = lane < BLOCK / 32 ? scratch[lane] : 0.0;
        for (int offset = 16; offset > 0; offset /= 2) {
            value += __shfl_down_sync(0xffffffffu, value, offset);
        }
        if (lane == 0) {
            scratch[BLOCK / 32] = value;
        }
    }
    __syncthreads();
    const double total = scratch[BLOCK / 32];
    __syncthreads();  // scratch may be reused by the caller
    return total;
}

#endif  // STEPJIT_PRELUDE_CUH
