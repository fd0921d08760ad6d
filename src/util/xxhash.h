// xxHash, on the fastest code path the CPU has.
//
// Debian's libxxhash exports XXH3 twice: the plain functions, built for the
// x86-64 baseline (SSE2, ~5.5 GB/s here), and *_dispatch variants that pick
// AVX2 or AVX-512 at run time (~18 GB/s). Every frame, journal record, undo
// record and verify digest is hashed at least once, so on x86 the names are
// mapped to the dispatching variants (xxh_x86dispatch.h does exactly that).
// The digests are the same either way.
#pragma once

#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack
#include <xxhash.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xxh_x86dispatch.h>
#endif
