#include "cpagecodec.h"

#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

static int forced_portable;

void cpc_force_portable(int portable) { forced_portable = portable; }

static int has_sse42(void) {
#if defined(__x86_64__)
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    return cached && forced_portable != 1;
#else
    return 0;
#endif
}

static int has_avx2(void) {
#if defined(__x86_64__)
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("avx2") ? 1 : 0;
    return cached && forced_portable != 1;
#else
    return 0;
#endif
}



static inline uint64_t load64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v; // little-endian hosts only (x86_64, aarch64 as configured by Linux)
}

/* ---------------- CRC32C ---------------- */

static uint32_t crc_table[8][256];
static int crc_table_ready;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int k = 1; k < 8; k++) crc_table[k][i] = (crc_table[k - 1][i] >> 8) ^ crc_table[0][crc_table[k - 1][i] & 0xFF];
    crc_table_ready = 1;
}

static uint32_t crc_portable(uint32_t c, const unsigned char *p, size_t n) {
    if (!crc_table_ready) crc_init();
    while (n >= 8) {
        uint64_t v = load64(p) ^ c;
        c = crc_table[7][v & 0xFF] ^ crc_table[6][(v >> 8) & 0xFF] ^ crc_table[5][(v >> 16) & 0xFF] ^
            crc_table[4][(v >> 24) & 0xFF] ^ crc_table[3][(v >> 32) & 0xFF] ^ crc_table[2][(v >> 40) & 0xFF] ^
            crc_table[1][(v >> 48) & 0xFF] ^ crc_table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) c = crc_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__)
/* Multiplies two bit-reflected polynomials modulo the CRC32C polynomial (a and b are
 * reflected, bit 31 is x^0). Used to shift a CRC over a run of zero bytes. */
static uint32_t gf2_multiply(uint32_t a, uint32_t b) {
    uint32_t product = 0;
    for (int i = 0; i < 32; i++) {
        if (a & 0x80000000u) product ^= b;
        a <<= 1;
        b = (b & 1) ? (b >> 1) ^ 0x82F63B78u : b >> 1;
    }
    return product;
}

/* x^(8*n) mod P, reflected: the operator that appends n zero bytes to a raw CRC state. */
static uint32_t zeros_operator(size_t n) {
    uint32_t result = 0x80000000u; /* x^0 */
    uint32_t square = 0x00800000u; /* x^8: one zero byte */
    while (n) {
        if (n & 1) result = gf2_multiply(result, square);
        square = gf2_multiply(square, square);
        n >>= 1;
    }
    return result;
}

/* Lane lengths of the three-lane loop: long lanes for big buffers (the combine step costs
 * about as much as 300 bytes of CRC, so it must be rare), and 1360-byte lanes so that one
 * round covers 4080 of a 4 KiB page. Each lane length needs the operators that shift a CRC
 * over one and two lanes of zero bytes, computed once. */
/* x^e mod P, reflected. */
static uint32_t xpow(uint64_t e) {
    uint32_t result = 0x80000000u, base = 0x40000000u; /* x^0, x^1 */
    while (e) {
        if (e & 1) result = gf2_multiply(result, base);
        base = gf2_multiply(base, base);
        e >>= 1;
    }
    return result;
}

/* With PCLMULQDQ the shift is one carry-less multiply and one crc32 instruction: with
 * k = x^(8n-33) mod P, crc32_u64(0, clmul(a, k)) = a * x^(8n) mod P (the crc32 step adds
 * x^32 and reduces; the reflected product adds one more factor of x). The tests check this
 * against the bit-serial multiply and the table-driven CRC. */
static int has_pclmul(void) {
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("pclmul") ? 1 : 0;
    return cached;
}

int cpc_cpu_features(void) {
    return (has_sse42() ? 1 : 0) | (has_avx2() ? 2 : 0) | (has_pclmul() && forced_portable == 0 ? 4 : 0);
}

__attribute__((target("sse4.2,pclmul")))
static inline uint32_t shift_clmul(uint32_t a, uint32_t k) {
    __m128i t = _mm_clmulepi64_si128(_mm_cvtsi32_si128((int)a), _mm_cvtsi32_si128((int)k), 0);
    return (uint32_t)_mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(t));
}

#define CRC_LONG_LANE 16384
#define CRC_PAGE_LANE 1360
static uint32_t long_shift_1, long_shift_2, page_shift_1, page_shift_2;
static uint32_t long_k1, long_k2, page_k1, page_k2; /* x^(8n-33) for n = one and two lanes */

__attribute__((target("sse4.2,pclmul")))
static uint64_t crc_three_lanes(uint64_t c0, const unsigned char **pp, size_t *np, size_t lane,
                                uint32_t shift_1, uint32_t shift_2, uint32_t k1, uint32_t k2) {
    const unsigned char *p = *pp;
    size_t n = *np;
    while (n >= 3 * lane) {
        uint64_t c1 = 0, c2 = 0;
        const unsigned char *p1 = p + lane, *p2 = p + 2 * lane;
        for (size_t i = 0; i < lane; i += 8) {
            c0 = _mm_crc32_u64(c0, load64(p + i));
            c1 = _mm_crc32_u64(c1, load64(p1 + i));
            c2 = _mm_crc32_u64(c2, load64(p2 + i));
        }
        /* crc(A||B||C) = shift(crc(A), |B|+|C|) ^ shift(crc(B), |C|) ^ crc(C), for raw states */
        if (k1)
            c0 = shift_clmul((uint32_t)c0, k2) ^ shift_clmul((uint32_t)c1, k1) ^ (uint32_t)c2;
        else
            c0 = gf2_multiply((uint32_t)c0, shift_2) ^ gf2_multiply((uint32_t)c1, shift_1) ^ (uint32_t)c2;
        p += 3 * lane;
        n -= 3 * lane;
    }
    *pp = p;
    *np = n;
    return c0;
}

/* Computed once, when the library is loaded, so that threads never race to fill them. */
__attribute__((constructor))
static void crc_operators_init(void) {
    crc_init();
    long_shift_1 = zeros_operator(CRC_LONG_LANE);
    long_shift_2 = zeros_operator(2 * CRC_LONG_LANE);
    page_shift_1 = zeros_operator(CRC_PAGE_LANE);
    page_shift_2 = zeros_operator(2 * CRC_PAGE_LANE);
    if (has_pclmul()) {
        long_k1 = xpow(8 * CRC_LONG_LANE - 33);
        long_k2 = xpow(16 * CRC_LONG_LANE - 33);
        page_k1 = xpow(8 * CRC_PAGE_LANE - 33);
        page_k2 = xpow(16 * CRC_PAGE_LANE - 33);
    }
}

__attribute__((target("sse4.2")))
static uint32_t crc_sse42(uint32_t c, const unsigned char *p, size_t n) {
    uint64_t c0 = c;
    /* Three independent lanes hide the 3-cycle latency of the crc32 instruction. */
    int clmul = has_pclmul() && forced_portable == 0;
    if (n >= 3 * CRC_LONG_LANE)
        c0 = crc_three_lanes(c0, &p, &n, CRC_LONG_LANE, long_shift_1, long_shift_2, clmul ? long_k1 : 0, long_k2);
    if (n >= 3 * CRC_PAGE_LANE)
        c0 = crc_three_lanes(c0, &p, &n, CRC_PAGE_LANE, page_shift_1, page_shift_2, clmul ? page_k1 : 0, page_k2);
    while (n >= 8) {
        c0 = _mm_crc32_u64(c0, load64(p));
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c0;
    while (n--) c32 = _mm_crc32_u8(c32, *p++);
    return c32;
}
#endif

uint32_t cpc_crc32c(uint32_t crc, const void *data, size_t length) {
    uint32_t c = ~crc;
#if defined(__x86_64__)
    if (has_sse42()) return ~crc_sse42(c, data, length);
#endif
    return ~crc_portable(c, data, length);
}

/* ---------------- zero detection ---------------- */

static inline __attribute__((always_inline)) int is_zero_body(const unsigned char *p, size_t n) {
    size_t i = 0;
    /* 256 bytes per step, in 32 words, so the compiler can use the widest vectors it may. */
    for (; i + 256 <= n; i += 256) {
        uint64_t acc = 0;
        for (int k = 0; k < 32; k++) acc |= load64(p + i + 8 * k);
        if (acc) return 0;
    }
    uint64_t acc = 0;
    for (; i + 8 <= n; i += 8) acc |= load64(p + i);
    for (; i < n; i++) acc |= p[i];
    return acc == 0;
}

#if defined(__x86_64__)
__attribute__((target("avx2")))
static int is_zero_avx2(const unsigned char *p, size_t n) {
    size_t i = 0;
    for (; i + 256 <= n; i += 256) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(p + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(p + i + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(p + i + 64));
        __m256i d = _mm256_loadu_si256((const __m256i *)(p + i + 96));
        a = _mm256_or_si256(a, _mm256_loadu_si256((const __m256i *)(p + i + 128)));
        b = _mm256_or_si256(b, _mm256_loadu_si256((const __m256i *)(p + i + 160)));
        c = _mm256_or_si256(c, _mm256_loadu_si256((const __m256i *)(p + i + 192)));
        d = _mm256_or_si256(d, _mm256_loadu_si256((const __m256i *)(p + i + 224)));
        a = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
        if (!_mm256_testz_si256(a, a)) return 0;
    }
    return is_zero_body(p + i, n - i);
}
#endif

int cpc_is_zero(const void *data, size_t length) {
#if defined(__x86_64__)
    if (has_avx2()) return is_zero_avx2(data, length);
#endif
    return is_zero_body(data, length);
}

/* ---------------- page hash ----------------
 * Eight 64-bit lanes read one 64-byte stripe per step. Each lane adds the product of the
 * two 32-bit halves of (word xor key) and the neighbouring lane's word; every 16 stripes the
 * lanes are scrambled (xorshift, multiply). The key of a stripe is the lane constant plus the
 * stripe index times a golden-ratio constant, so moving data within a page changes the hash.
 * At the end the lanes are folded twice, with different constants, into two 64-bit halves,
 * each mixed with the frame number and length. */

static const uint64_t lane_key[8] = {
    0x243F6A8885A308D3ull, 0x13198A2E03707344ull, 0xA4093822299F31D0ull, 0x082EFA98EC4E6C89ull,
    0x452821E638D01377ull, 0xBE5466CF34E90C6Cull, 0xC0AC29B7C97C50DDull, 0x3F84D5B5B5470917ull,
};
#define GOLDEN 0x9E3779B97F4A7C15ull
#define PRIME_A 0xC2B2AE3D27D4EB4Full
#define PRIME_B 0x165667B19E3779F9ull
#define PRIME32 0x9E3779B1ull

static inline uint64_t mix64(uint64_t h) {
    h ^= h >> 33; h *= PRIME_A;
    h ^= h >> 29; h *= PRIME_B;
    h ^= h >> 32;
    return h;
}

static inline __attribute__((always_inline)) void hash_body(const unsigned char *p, size_t n, uint64_t frame, uint64_t out[2]) {
    uint64_t acc[8];
    for (int l = 0; l < 8; l++) acc[l] = lane_key[l] ^ GOLDEN;
    size_t stripes = n / 64;
    for (size_t s = 0; s < stripes; s++) {
        const unsigned char *q = p + 64 * s;
        uint64_t skey = (uint64_t)s * GOLDEN;
        uint64_t w[8];
        for (int l = 0; l < 8; l++) w[l] = load64(q + 8 * l);
        for (int l = 0; l < 8; l++) {
            uint64_t k = w[l] ^ (lane_key[l] + skey);
            acc[l] += (k & 0xFFFFFFFFull) * (k >> 32) + w[l ^ 1];
        }
        if ((s & 15) == 15) {
            for (int l = 0; l < 8; l++) acc[l] = ((acc[l] ^ (acc[l] >> 47)) ^ lane_key[l]) * PRIME32;
        }
    }
    uint64_t h1 = (uint64_t)n * PRIME_A ^ frame, h2 = frame * PRIME_B ^ (uint64_t)n;
    for (int l = 0; l < 8; l++) {
        h1 = mix64(h1 ^ acc[l]) * PRIME_B;
        h2 = mix64(h2 + acc[7 - l] * PRIME_A + lane_key[l]);
    }
    out[0] = mix64(h1 ^ frame);
    out[1] = mix64(h2 + frame * GOLDEN);
}

#if defined(__x86_64__)
__attribute__((target("avx2")))
static void hash_avx2(const unsigned char *p, size_t n, uint64_t frame, uint64_t out[2]) { hash_body(p, n, frame, out); }
#endif

void cpc_page_hash(const void *data, size_t length, uint64_t frame, uint64_t out[2]) {
#if defined(__x86_64__)
    if (has_avx2()) { hash_avx2(data, length, frame, out); return; }
#endif
    hash_body(data, length, frame, out);
}
