// Philox4x32-10 for many consecutive blocks on the CPU, with SIMD paths picked at run time.
#pragma once

#include <cstdint>

#include "../common/philox.h"

namespace relaydiff {

// r0[i] .. r3[i] = Philox4x32-10 of counter (j, j >> 32, stream, 0) with j = jb + i, i < nb.
void philox_blocks(PhiloxKey key, uint32_t stream, uint64_t jb, int64_t nb, uint32_t* r0,
                   uint32_t* r1, uint32_t* r2, uint32_t* r3);

// Which path philox_blocks takes on this machine: "avx512", "avx2" or "scalar".
const char* philox_isa();

}  // namespace relaydiff
