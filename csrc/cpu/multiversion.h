// RD_MULTIVERSION: compile a hot loop for AVX-512, AVX2 and baseline x86-64 and let the
// loader pick one (GCC target_clones). Never -march=native: wheels must run everywhere.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(RELAYDIFF_NO_MULTIVERSION)
#define RD_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RD_MULTIVERSION
#endif
