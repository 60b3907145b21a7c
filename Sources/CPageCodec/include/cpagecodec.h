// CPageCodec: the few hot loops of PageCodec that want specific CPU instructions (SSE4.2
// CRC32, AVX2) chosen at run time. Each function has a portable path with identical results.
#ifndef CPAGECODEC_H
#define CPAGECODEC_H

#include <stddef.h>
#include <stdint.h>

/// Continues a CRC32C (Castagnoli): start with 0; the pre/post inversion is done inside.
uint32_t cpc_crc32c(uint32_t crc, const void *data, size_t length);

/// 1 if all `length` bytes are zero, 0 otherwise. Returns early at the first non-zero block.
int cpc_is_zero(const void *data, size_t length);

/// 128-bit hash of one page, keyed by its frame number (stream.md §7). `length` must be a
/// multiple of 64. Not cryptographic: it detects corruption and lost pages, not attackers.
void cpc_page_hash(const void *data, size_t length, uint64_t frame, uint64_t out[2]);

/// Which paths were selected: bit 0 SSE4.2 CRC32C, bit 1 AVX2 zero scan and hash, bit 2 PCLMULQDQ.
int cpc_cpu_features(void);

/// For tests comparing paths: 0 = best available, 1 = portable C only, 2 = no PCLMULQDQ.
void cpc_force_portable(int portable);

#endif
