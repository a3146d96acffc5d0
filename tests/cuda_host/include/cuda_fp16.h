// Host stand-in for CUDA's cuda_fp16.h: __half and its conversions come from cuda_host.h.
#pragma once
#include "../cuda_host.h"
