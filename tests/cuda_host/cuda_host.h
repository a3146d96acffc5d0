// The CUDA built-ins that stepjit's generated kernels use, for running them on the host.
//
// Test code: the generated .cu source is compiled unchanged by the host C++ compiler with this
// header force-included (-include cuda_host.h) and include/ on the include path (stand-ins for
// cuda_fp16.h and cuda_bf16.h). A launch runs one block at a time; every thread of the block is a
// real std::thread, __syncthreads is a barrier over them, and warp shuffles exchange values
// through memory with a barrier per warp (__syncwarp is that barrier). __shared__ variables
// become function statics, shared by the threads of the running block (blocks never run
// concurrently).
#pragma once

#include <math.h>

#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

struct int2 {
    int x, y;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace cuda_host {

// What the threads of the running block share.
struct Block {
    explicit Block(unsigned threads) : sync(threads), exchange(threads) {
        for (unsigned w = 0; w < threads / 32; ++w) {
            warp_sync.push_back(std::make_unique<std::barrier<>>(32));
        }
    }
    std::barrier<> sync;                                   // __syncthreads
    std::vector<std::unique_ptr<std::barrier<>>> warp_sync;  // one per warp, for shuffles
    std::vector<std::uint64_t> exchange;                   // one slot per thread, for shuffles
};

inline Block* running = nullptr;

// Run `kernel` over `grid` blocks of `block` threads, one block after the other.
inline void launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    if (block == 0 || block % 32 != 0) {
        throw std::invalid_argument("block size must be a positive multiple of 32");
    }
    Block shared(block);
    running = &shared;
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{block, 1, 1};
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
        threads.emplace_back([&shared, &kernel, grid, t] {
            threadIdx = dim3{t, 1, 1};
            for (unsigned b = 0; b < grid; ++b) {
                blockIdx = dim3{b, 1, 1};
                kernel();
                shared.sync.arrive_and_wait();  // the next block reuses the __shared__ statics
            }
        });
    }
    for (auto& thread : threads) {
        thread.join();
    }
    running = nullptr;
}

}  // namespace cuda_host

inline void __syncthreads() { cuda_host::running->sync.arrive_and_wait(); }

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
    static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffle of a value wider than 8 bytes");
    if (mask != 0xffffffffu || width != 32) {
        throw std::invalid_argument("only full-warp shuffles are emulated");
    }
    cuda_host::Block& block = *cuda_host::running;
    const unsigned lane = threadIdx.x % 32;
    const unsigned warp = threadIdx.x / 32;
    std::uint64_t* slots = block.exchange.data() + warp * 32;
    std::memcpy(&slots[lane], &value, sizeof(T));
    block.warp_sync[warp]->arrive_and_wait();
    T result = value;
    if (lane + delta < 32) {
        std::memcpy(&result, &slots[lane + delta], sizeof(T));
    }
    block.warp_sync[warp]->arrive_and_wait();  // slots are rewritten by the next shuffle
    return result;
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffle of a value wider than 8 bytes");
    if (mask != 0xffffffffu || width != 32 || lane_mask < 0 || lane_mask >= 32) {
        throw std::invalid_argument("only full-warp shuffles are emulated");
    }
    cuda_host::Block& block = *cuda_host::running;
    const unsigned lane = threadIdx.x % 32;
    const unsigned warp = threadIdx.x / 32;
    std::uint64_t* slots = block.exchange.data() + warp * 32;
    std::memcpy(&slots[lane], &value, sizeof(T));
    block.warp_sync[warp]->arrive_and_wait();
    T result;
    std::memcpy(&result, &slots[lane ^ static_cast<unsigned>(lane_mask)], sizeof(T));
    block.warp_sync[warp]->arrive_and_wait();  // slots are rewritten by the next shuffle
    return result;
}

// A barrier over the warp (the whole warp: every generated call is made by all 32 lanes).
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) {
        throw std::invalid_argument("only full-warp barriers are emulated");
    }
    cuda_host::running->warp_sync[threadIdx.x / 32]->arrive_and_wait();
}

// -- reinterpreting bits ---------------------------------------------------------------------------
inline float __int_as_float(int bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline double __longlong_as_double(long long bits) {
    double d;
    std::memcpy(&d, &bits, sizeof d);
    return d;
}

// -- half types: storage only; conversions round to nearest even ------------------------------------
struct __half {
    std::uint16_t bits;
};

struct __nv_bfloat16 {
    std::uint16_t bits;
};

namespace cuda_host {

// `x` rounded to nearest even with `digits` significant bits and no exponent below `min_exp`
// (the smallest normal exponent: below it the spacing stays fixed, as for subnormals). Exact:
// scaling by powers of two loses nothing in double for these formats.
inline double round_to_format(double x, int digits, int min_exp) {
    if (!isfinite(x) || x == 0.0) {
        return x;
    }
    int exp2 = 0;
    frexp(x, &exp2);  // |x| = m * 2^exp2, m in [0.5, 1): the leading bit weighs 2^(exp2 - 1)
    const int lead = exp2 - 1 < min_exp ? min_exp : exp2 - 1;
    const double quantum = ldexp(1.0, lead - (digits - 1));
    return nearbyint(x / quantum) * quantum;  // the default rounding mode: to nearest, ties even
}

inline std::uint16_t half_bits(double x) {
    const std::uint16_t sign = signbit(x) ? 0x8000 : 0;
    if (isnan(x)) {
        return 0x7e00;
    }
    const double r = fabs(round_to_format(x, 11, -14));
    if (r > 65504.0) {
        return sign | 0x7c00;
    }
    if (r < ldexp(1.0, -14)) {  // subnormal or zero: a multiple of 2^-24
        return sign | static_cast<std::uint16_t>(r * ldexp(1.0, 24));
    }
    int exp2 = 0;
    const double m = frexp(r, &exp2);  // r = m * 2^exp2, m in [0.5, 1)
    const auto mantissa = static_cast<std::uint16_t>((m * 2.0 - 1.0) * 1024.0);
    return sign | static_cast<std::uint16_t>((exp2 - 1 + 15) << 10) | mantissa;
}

inline std::uint16_t bfloat16_bits(double x) {
    if (isnan(x)) {
        return 0x7fc0;
    }
    const double r = round_to_format(x, 8, -126);
    const float f = fabs(r) > 3.3895313892515355e38 ? copysignf(INFINITY, static_cast<float>(r))
                                                    : static_cast<float>(r);  // exact
    std::uint32_t u = 0;
    std::memcpy(&u, &f, sizeof u);
    return static_cast<std::uint16_t>(u >> 16);
}

}  // namespace cuda_host

inline float __half2float(__half h) {
    const unsigned sign = h.bits >> 15;
    const unsigned exponent = (h.bits >> 10) & 0x1f;
    const unsigned mantissa = h.bits & 0x3ff;
    float magnitude;
    if (exponent == 0) {
        magnitude = ldexpf(static_cast<float>(mantissa), -24);
    } else if (exponent == 31) {
        magnitude = mantissa ? NAN : INFINITY;
    } else {
        magnitude = ldexpf(static_cast<float>(mantissa | 0x400), static_cast<int>(exponent) - 25);
    }
    return sign ? -magnitude : magnitude;
}

inline __half __double2half(double x) { return __half{cuda_host::half_bits(x)}; }
inline __half __float2half_rn(float x) { return __half{cuda_host::half_bits(x)}; }

inline float __bfloat162float(__nv_bfloat16 b) {
    const std::uint32_t u = static_cast<std::uint32_t>(b.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline __nv_bfloat16 __double2bfloat16(double x) {
    return __nv_bfloat16{cuda_host::bfloat16_bits(x)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    return __nv_bfloat16{cuda_host::bfloat16_bits(x)};
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16{bits}; }
inline unsigned __float_as_uint(float x) {
    unsigned u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float x;
    std::memcpy(&x, &u, sizeof x);
    return x;
}
