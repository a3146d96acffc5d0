// stepjit CUDA helpers for 8-bit state (stepjit.ir.ops.CodeMap, QUANT_BLOCK): included after the
// prelude by the kernels of a rule that reads or writes one value per block of 256 elements.
//
// A code map is a small floating-point format: an optional sign bit (bit 7), E exponent bits
// (bias 2^E - 1, so that 1.0 has the largest exponent used) and F fraction bits; exponent 0 is
// subnormal (evenly spaced down to 0). Codes are bit patterns: decoding and encoding are integer
// operations and exact float32 arithmetic, the same bits as the interpreter's numpy definitions.
#ifndef STEPJIT_QUANTIZED_CUH
#define STEPJIT_QUANTIZED_CUH

// 2^e as a float32, from its bits (for -126 <= e <= 127): exact, and NVRTC has no ldexpf constant.
__device__ __forceinline__ float power_of_two(int e) {
    return __uint_as_float((unsigned)(e + 127) << 23);
}

// The float32 value of `code`: the magnitude's exponent field and fraction moved into float32's
// (rebiased), or, in the subnormal binade, fraction * 2^(1 - bias - F) (exact); a set sign bit
// of a signed map negates it (code 0x80 is -0.0).
template <bool SIGNED, int E, int F>
__device__ __forceinline__ float decode_code(unsigned char code) {
    constexpr int BIAS = (1 << E) - 1;
    const unsigned c = code;
    const unsigned magnitude = c & (SIGNED ? 0x7fu : 0xffu);
    const unsigned field = magnitude >> F;
    const unsigned frac = magnitude & ((1u << F) - 1u);
    unsigned bits = field == 0u
        ? __float_as_uint((float)frac * power_of_two(1 - BIAS - F))
        : ((field + (unsigned)(127 - BIAS)) << 23) | (frac << (23 - F));
    if (SIGNED) {
        bits |= (c & 0x80u) << 24;
    }
    return __uint_as_float(bits);
}

// What a code's magnitude bits round (stepjit.ir.ops.CodeMap.magnitude): |x| (signed maps) or x
// (unsigned maps: negative values give 0), clamped to 1; infinity and NaN give 1.
template <bool SIGNED>
__device__ __forceinline__ float code_magnitude(float x) {
    float a = SIGNED ? fabsf(x) : (x < 0.0f ? 0.0f : x);
    return a <= 1.0f ? a : 1.0f;
}

// The code of magnitude bits m: a signed map's takes the sign bit where x < 0 (not -0, nor NaN,
// whose sign bit backends set differently).
template <bool SIGNED>
__device__ __forceinline__ unsigned char with_sign(unsigned m, float x) {
    if (SIGNED && x < 0.0f) {
        m |= 0x80u;
    }
    return (unsigned char)m;
}

// The code nearest x, ties to the even code, of code_magnitude(x). From the smallest normal
// value up, float32's bits are rebiased and rounded to F fraction bits (adding half an ulp of
// the code, less one, plus the kept bit's parity, then truncating: ties go to the even code;
// 32-bit wrapping arithmetic); below it, adding 2^(24 - bias - F), whose float32 spacing is the
// code's subnormal step, rounds to nearest even in one IEEE addition and leaves the code in the
// low bits. Signs as with_sign.
template <bool SIGNED, int E, int F>
__device__ __forceinline__ unsigned char encode_code(float x) {
    constexpr int BIAS = (1 << E) - 1;
    const float a = code_magnitude<SIGNED>(x);
    unsigned m;
    if (a < power_of_two(1 - BIAS)) {
        const float magic = power_of_two(24 - BIAS - F);
        m = __float_as_uint(a + magic) - __float_as_uint(magic);
    } else {
        const unsigned bits = __float_as_uint(a);
        const unsigned odd = (bits >> (23 - F)) & 1u;
        m = (bits + ((unsigned)(BIAS - 127) << 23) + (1u << (22 - F)) - 1u + odd) >> (23 - F);
    }
    return with_sign<SIGNED>(m, x);
}

// The code of x rounded stochastically (ENCODE_SR, stepjit.ir.ops.CodeMap.encode_stochastic),
// from the element's 32 random bits (code_stream): up in magnitude with probability
// (|x| - below) / (above - below), to 2^-(23 - F). With a = code_magnitude(x),
// w = max(a * 2^BIAS + 2 (one rounding), a * 2^(BIAS + 1)) lies in [2, 2^(BIAS + 1)]; its bits
// less 2.0's, above the lowest 23 - F, are the code below a (the first term counts subnormal
// steps, the second takes over at the smallest normal value); the random bits added below them
// carry into the code with the dropped fraction's probability. a * 2^(BIAS + 1) is a's bits with
// BIAS + 1 added to the exponent field: where a is not normal that is smaller than the first
// term, which then wins.
template <bool SIGNED, int E, int F>
__device__ __forceinline__ unsigned char encode_code_sr(float x, unsigned random) {
    constexpr int BIAS = (1 << E) - 1;
    const float a = code_magnitude<SIGNED>(x);
    const float first = a * power_of_two(BIAS) + 2.0f;  // the product is exact: fused or not
    const float second = __uint_as_float(__float_as_uint(a) + ((unsigned)(BIAS + 1) << 23));
    const float w = second > first ? second : first;
    const unsigned m = (__float_as_uint(w) + (random & ((1u << (23 - F)) - 1u))
                        - __float_as_uint(2.0f)) >> (23 - F);
    return with_sign<SIGNED>(m, x);
}

// A running block maximum of magnitudes: the bits of |x| compared as unsigned integers, which
// orders finite values and infinity as floats and puts every NaN above them (a NaN wins).
__device__ __forceinline__ unsigned fold_absmax(unsigned bits, float x) {
    const unsigned magnitude = __float_as_uint(x) & 0x7fffffffu;
    return magnitude > bits ? magnitude : bits;
}

// Ordering over the GROUP consecutive threads that hold one block of 256 elements: what they
// read of the block's per-block values happens before what any of them writes after it.
template <int GROUP>
__device__ __forceinline__ void group_barrier() {
    if constexpr (GROUP > 32) {
        __syncthreads();
    } else {
        __syncwarp();
    }
}

// The maximum of each of N running maxima (fold_absmax) over the GROUP consecutive threads that
// hold one block of 256 elements (GROUP = 256 / VEC: 16 to 128), returned to every thread of the
// group, then group_barrier. Within a warp by butterfly shuffles (xor: every lane ends with the
// result; a group of 16 stays within its half warp); a group of several warps then combines its
// warps' maxima through `scratch` (N * BLOCK / 32 values). Every thread of the block must call
// it. Maxima are exact: the same bits in any order.
template <int GROUP, int BLOCK, int N>
__device__ __forceinline__ void group_max(unsigned (&values)[N], unsigned* scratch) {
    static_assert(GROUP >= 2 && (GROUP & (GROUP - 1)) == 0 && BLOCK % GROUP == 0 &&
                  BLOCK % 32 == 0, "GROUP must be a power of two dividing BLOCK");
    constexpr int LANES = GROUP < 32 ? GROUP : 32;
    #pragma unroll
    for (int offset = LANES / 2; offset > 0; offset /= 2) {
        #pragma unroll
        for (int r = 0; r < N; ++r) {
            const unsigned other = __shfl_xor_sync(0xffffffffu, values[r], offset);
            values[r] = other > values[r] ? other : values[r];
        }
    }
    if constexpr (GROUP > 32) {
        constexpr int WARPS = GROUP / 32;
        const int warp = threadIdx.x / 32;
        if (threadIdx.x % 32 == 0) {
            #pragma unroll
            for (int r = 0; r < N; ++r) {
                scratch[r * (BLOCK / 32) + warp] = values[r];
            }
        }
        __syncthreads();
        const int first = warp - warp % WARPS;  // the group's first warp
        #pragma unroll
        for (int r = 0; r < N; ++r) {
            unsigned m = scratch[r * (BLOCK / 32) + first];
            for (int w = 1; w < WARPS; ++w) {
                const unsigned other = scratch[r * (BLOCK / 32) + first + w];
                m = other > m ? other : m;
            }
            values[r] = m;
        }
    }
    group_barrier<GROUP>();  // for several warps also: scratch may be reused by the next call
}

#endif  // STEPJIT_QUANTIZED_CUH
