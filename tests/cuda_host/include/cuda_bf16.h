// Host stand-in for CUDA's cuda_bf16.h: __nv_bfloat16 and its conversions come from cuda_host.h.
#pragma once
#include "../cuda_host.h"
