/* Counter-based Gaussian z (zo_trainer/counter_noise.py). Entry i of the stream of `key` is a table entry picked by some
 * bits of word i / lanes, a word being SplitMix64's output function of key + word * golden:
 *   scheme 3: 16 bits (i % 4) of word i / 4 pick one of 65,536 values;
 *   scheme 5: 8 bits (i % 8) of word i / 8 pick one of 256 values (bit 7 the sign, bits 0-6 one of 128 magnitudes).
 * The tables hold the values as bit patterns of the output dtype (2, 4 or 8 bytes), so filling copies bits: no float
 * arithmetic, the same bits on every machine. Scheme 5's values are bf16-exact, so on CPUs with AVX-512 its 128
 * magnitudes fit in four registers and a lookup is two permutes (vpermt2w) and a select per 32 entries, no memory
 * access; the portable loop below gives the same bits. Called through ctypes (which releases the GIL); a Python module
 * only so that it builds and links as an extension everywhere. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* The apply functions below must round as torch's ops do: an explicit fused multiply-add where torch fuses, a product
 * rounded on its own where torch rounds it; the compiler may not contract a multiply and an add into one. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

static inline uint64_t mix(uint64_t key, uint64_t word) {
    uint64_t x = key + word * 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* out[0 .. n) = entries start .. start + n of the stream of key, BITS bits per pick (16: scheme 3, 8: scheme 5), so
 * 64 / BITS entries per word. */
#define FILL(NAME, T, BITS)                                                                        \
    static void NAME(T *out, const T *table, int64_t n, uint64_t key, int64_t start) {            \
        const int lanes = 64 / (BITS), shift = (BITS) == 16 ? 2 : 3;                               \
        const uint64_t pick = (1ULL << (BITS)) - 1;                                                \
        int64_t i = 0;                                                                             \
        for (; i < n && ((start + i) & (lanes - 1)); i++) { /* the rest of a word begun before */ \
            uint64_t x = mix(key, (uint64_t)(start + i) >> shift);                                 \
            out[i] = table[(x >> ((BITS) * ((start + i) & (lanes - 1)))) & pick];                  \
        }                                                                                          \
        uint64_t first = (uint64_t)(start + i) >> shift;                                           \
        int64_t words = (n - i) / lanes;                                                           \
        T *o = out + i;                                                                            \
        for (int64_t j = 0; j < words; j++) {                                                      \
            uint64_t x = mix(key, first + (uint64_t)j);                                            \
            for (int lane = 0; lane < lanes; lane++) o[lanes * j + lane] = table[(x >> ((BITS) * lane)) & pick]; \
        }                                                                                          \
        for (i += lanes * words; i < n; i++) { /* the first entries of one more word */           \
            uint64_t x = mix(key, (uint64_t)(start + i) >> shift);                                 \
            out[i] = table[(x >> ((BITS) * ((start + i) & (lanes - 1)))) & pick];                  \
        }                                                                                          \
    }

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

FILL(fill16_16, uint16_t, 16)
FILL(fill16_32, uint32_t, 16)
FILL(fill16_64, uint64_t, 16)
FILL(fill8_16, uint16_t, 8)
FILL(fill8_32, uint32_t, 8)
FILL(fill8_64, uint64_t, 8)

/* Scheme 5's z applied as it is drawn: out = w + alpha * z (* mask), one pass (out may be w: the update). The float
 * operations are torch's for the ops the engine used before (CPU, vectorised paths): dense, `torch.add(w, z,
 * alpha=alpha)`: one fused multiply-add in fp32 (for bf16 torch rounds alpha to bf16 first, which the caller does, and
 * a bf16 z times a bf16 alpha is exact in fp32); masked, `torch.addcmul(w, z, mask, value=alpha)`: the product rounded
 * to fp32, then the sum, where |w| <= threshold (the threshold as the tensor's dtype holds it); w itself elsewhere.
 * bf16 results round to nearest even from fp32 (a NaN becomes 0xFFFF, as in torch's vectorised conversion). */
static inline float bf16_value(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0xFFFF;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float applied(float w, float z, float alpha, float threshold, int masked, int64_t *count) {
    if (!masked) return fmaf(z, alpha, w);
    if (fabsf(w) <= threshold) {
        float step = alpha * z;
        *count += 1;
        return w + step;
    }
    return w;
}

static inline float f32_value(float f) { return f; }
static inline float f32_bits(float f) { return f; }

/* The portable loop: entries [0, n) of out / w are stream entries start .. start + n; each word mixed once. Returns
 * the number of entries inside the mask (masked), else 0. */
#define APPLY8(NAME, T, LOAD, STORE)                                                                          \
    static int64_t NAME(T *out, const T *w, const float *table, int64_t n, uint64_t key, int64_t start,        \
                        float alpha, float threshold, int masked) {                                           \
        uint64_t x = 0;                                                                                       \
        int64_t count = 0;                                                                                    \
        for (int64_t i = 0; i < n; i++) {                                                                     \
            int64_t entry = start + i;                                                                        \
            if (i == 0 || (entry & 7) == 0) x = mix(key, (uint64_t)entry >> 3);                               \
            float z = table[(x >> (8 * (entry & 7))) & 255];                                                  \
            out[i] = STORE(applied(LOAD(w[i]), z, alpha, threshold, masked, &count));                         \
        }                                                                                                     \
        return count;                                                                                         \
    }
APPLY8(apply8_32, float, f32_value, f32_bits)
APPLY8(apply8_16, uint16_t, bf16_value, bf16_bits)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SIMD_BUILT 1
#define AVX512 __attribute__((target("avx512f,avx512dq,avx512bw")))

/* SplitMix64 of 8 consecutive words. */
AVX512 static inline __m512i mix8(__m512i key, __m512i words) {
    __m512i x = _mm512_add_epi64(key, _mm512_mullo_epi64(words, _mm512_set1_epi64((long long)0x9E3779B97F4A7C15ULL)));
    x = _mm512_mullo_epi64(_mm512_xor_si512(x, _mm512_srli_epi64(x, 30)), _mm512_set1_epi64((long long)0xBF58476D1CE4E5B9ULL));
    x = _mm512_mullo_epi64(_mm512_xor_si512(x, _mm512_srli_epi64(x, 27)), _mm512_set1_epi64((long long)0x94D049BB133111EBULL));
    return _mm512_xor_si512(x, _mm512_srli_epi64(x, 31));
}

/* 32 picks (one per 16-bit lane) -> their 16-bit patterns: magnitude (bits 0-6) from the 128 in m0..m3, sign bit 7. */
AVX512 static inline __m512i lookup32(__m512i pick, __m512i m0, __m512i m1, __m512i m2, __m512i m3) {
    __m512i low = _mm512_permutex2var_epi16(m0, pick, m1);  /* magnitudes 0-63 (bits 0-5 of the pick) */
    __m512i high = _mm512_permutex2var_epi16(m2, pick, m3); /* magnitudes 64-127 */
    __m512i value = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(pick, _mm512_set1_epi16(0x40)), low, high);
    __m512i sign = _mm512_and_si512(_mm512_slli_epi16(pick, 8), _mm512_set1_epi16((short)0x8000));
    return _mm512_xor_si512(value, sign);
}

/* Words first .. first + words (a multiple of 8), 8 entries each, as 16-bit (bf16 / fp16) or 32-bit (fp32: a
 * bf16-exact value's fp32 bits are its bf16 bits << 16) patterns; magnitudes: the 128 16-bit patterns. */
#define FILL8_SIMD(NAME, T, STORE)                                                                             \
    AVX512 static void NAME(T *out, const uint16_t *magnitudes, int64_t words, uint64_t key, uint64_t first) { \
        __m512i m0 = _mm512_loadu_si512(magnitudes), m1 = _mm512_loadu_si512(magnitudes + 32);                 \
        __m512i m2 = _mm512_loadu_si512(magnitudes + 64), m3 = _mm512_loadu_si512(magnitudes + 96);            \
        __m512i k = _mm512_set1_epi64((long long)key), eight = _mm512_set1_epi64(8);                          \
        __m512i w = _mm512_add_epi64(_mm512_set1_epi64((long long)first), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)); \
        for (int64_t j = 0; j < words; j += 8, w = _mm512_add_epi64(w, eight)) {                              \
            __m512i x = mix8(k, w); /* byte b of x: entry b of these 64 (little endian) */                    \
            __m512i a = lookup32(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(x)), m0, m1, m2, m3);           \
            __m512i b = lookup32(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(x, 1)), m0, m1, m2, m3);     \
            STORE(out + 8 * j, a);                                                                             \
            STORE(out + 8 * j + 32, b);                                                                        \
        }                                                                                                      \
    }
#define STORE16(p, v) _mm512_storeu_si512((void *)(p), (v))
#define STORE32(p, v)                                                                                          \
    do {                                                                                                       \
        _mm512_storeu_si512((void *)(p), _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16)); \
        _mm512_storeu_si512((void *)((p) + 16), _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16)); \
    } while (0)
FILL8_SIMD(fill8_simd_16, uint16_t, STORE16)
FILL8_SIMD(fill8_simd_32, uint32_t, STORE32)

/* 16 fp32 z from 16 bf16 patterns. */
AVX512 static inline __m512 z16(__m256i patterns) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(patterns), 16));
}

AVX512 static inline __m512 applied16(__m512 w, __m512 z, __m512 alpha, __m512 threshold, int masked, int64_t *count) {
    if (!masked) return _mm512_fmadd_ps(z, alpha, w);
    __m512 step = _mm512_mul_ps(alpha, z);
    __m512 sum = _mm512_add_ps(w, step);
    __mmask16 inside = _mm512_cmp_ps_mask(_mm512_abs_ps(w), threshold, _CMP_LE_OQ);
    *count += __builtin_popcount((unsigned)inside);
    return _mm512_mask_blend_ps(inside, w, sum);
}

AVX512 static inline __m512 load16_32(const float *p) { return _mm512_loadu_ps(p); }
AVX512 static inline void store16_32(float *p, __m512 v) { _mm512_storeu_ps(p, v); }
AVX512 static inline __m512 load16_16(const uint16_t *p) { return z16(_mm256_loadu_si256((const __m256i *)p)); }
/* 16 fp32 -> their bf16 patterns, each in the low half of its 32-bit lane. */
AVX512 static inline __m512i bf16_bits16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
}
AVX512 static inline void store16_16(uint16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(bf16_bits16(v)));
}

/* Words first .. first + words (a multiple of 8) of the stream applied to 8 entries each. */
#define APPLY8_SIMD(NAME, T, LOAD, STORE)                                                                       \
    AVX512 static int64_t NAME(T *out, const T *w, const uint16_t *magnitudes, int64_t words, uint64_t key,       \
                               uint64_t first, float alpha, float threshold, int masked) {                       \
        int64_t count = 0;                                                                                       \
        __m512i m0 = _mm512_loadu_si512(magnitudes), m1 = _mm512_loadu_si512(magnitudes + 32);                   \
        __m512i m2 = _mm512_loadu_si512(magnitudes + 64), m3 = _mm512_loadu_si512(magnitudes + 96);              \
        __m512i k = _mm512_set1_epi64((long long)key), eight = _mm512_set1_epi64(8);                            \
        __m512i word = _mm512_add_epi64(_mm512_set1_epi64((long long)first), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)); \
        __m512 a = _mm512_set1_ps(alpha), t = _mm512_set1_ps(threshold);                                         \
        for (int64_t j = 0; j < words; j += 8, word = _mm512_add_epi64(word, eight)) {                           \
            __m512i x = mix8(k, word);                                                                           \
            __m512i lo = lookup32(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(x)), m0, m1, m2, m3);             \
            __m512i hi = lookup32(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(x, 1)), m0, m1, m2, m3);       \
            __m256i patterns[4] = {_mm512_castsi512_si256(lo), _mm512_extracti64x4_epi64(lo, 1),                 \
                                   _mm512_castsi512_si256(hi), _mm512_extracti64x4_epi64(hi, 1)};                \
            for (int q = 0; q < 4; q++) {                                                                        \
                int64_t at = 8 * j + 16 * q;                                                                     \
                STORE(out + at, applied16(LOAD(w + at), z16(patterns[q]), a, t, masked, &count));                \
            }                                                                                                    \
        }                                                                                                        \
        return count;                                                                                            \
    }
APPLY8_SIMD(apply8_avx512_32, float, load16_32, store16_32)
APPLY8_SIMD(apply8_avx512_16, uint16_t, load16_16, store16_16)

/* The bf16 apply on CPUs with AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4 on): the loop above spends most of its
 * work widening bf16 to fp32 and rounding back (14 operations per 16 entries), which made a bf16 pass compute-bound
 * at ~1.7x a copy's time. Here the weights and z are widened by unpacking against zero (2 operations per 32 entries,
 * interleaved within 128-bit lanes, the same order for both), and the sums are rounded by VCVTNE2PS2BF16 (round to
 * nearest even, as the loop above) and put back in order by one word permutation. That instruction reads denormal
 * inputs as zero, and rounds NaN otherwise than torch: a group of 32 whose sums hold either is rounded as above
 * instead (rare: weights below 1.2e-38 are, and training stops at a non-finite weight). Compilers older than GCC 10
 * / clang 9 do not know the instruction: there the AVX-512 loop does the work. */
#if defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10
#define BF16_BUILT 1
#define AVX512BF16 __attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16")))

AVX512BF16 static inline __m512i bf16_rounded32(__m512 low, __m512 high, __m512i order) {
    const int special = 0x01 | 0x20 | 0x80; /* quiet NaN, denormal, signalling NaN */
    if (_mm512_fpclass_ps_mask(low, special) | _mm512_fpclass_ps_mask(high, special)) {
        return _mm512_packus_epi32(bf16_bits16(low), bf16_bits16(high)); /* packing undoes the unpacking's order */
    }
    __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(high, low); /* 16 of low, then 16 of high */
    return _mm512_permutexvar_epi16(order, packed);
}

AVX512BF16 static int64_t apply8_bf16_16(uint16_t *out, const uint16_t *w, const uint16_t *magnitudes, int64_t words,
                                         uint64_t key, uint64_t first, float alpha, float threshold, int masked) {
    int64_t count = 0;
    __m512i m0 = _mm512_loadu_si512(magnitudes), m1 = _mm512_loadu_si512(magnitudes + 32);
    __m512i m2 = _mm512_loadu_si512(magnitudes + 64), m3 = _mm512_loadu_si512(magnitudes + 96);
    __m512i k = _mm512_set1_epi64((long long)key), eight = _mm512_set1_epi64(8), zero = _mm512_setzero_si512();
    __m512i word = _mm512_add_epi64(_mm512_set1_epi64((long long)first), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    __m512 a = _mm512_set1_ps(alpha), t = _mm512_set1_ps(threshold);
    /* Entry e of a 128-bit lane L sits, after unpacking, in lane L of the low (e < 4) or high (e >= 4) vector; the
     * conversion puts low's 16 then high's 16 in sequence: word 8 L + e comes from position 4 L + e (+ 12 for high). */
    short positions[32];
    for (int lane = 0; lane < 4; lane++)
        for (int e = 0; e < 8; e++) positions[8 * lane + e] = (short)(4 * lane + (e & 3) + (e < 4 ? 0 : 16));
    __m512i order = _mm512_loadu_si512(positions);
    for (int64_t j = 0; j < words; j += 8, word = _mm512_add_epi64(word, eight)) {
        __m512i x = mix8(k, word);
        __m512i patterns[2] = {lookup32(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(x)), m0, m1, m2, m3),
                               lookup32(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(x, 1)), m0, m1, m2, m3)};
        for (int q = 0; q < 2; q++) {
            int64_t at = 8 * j + 32 * q;
            __m512i weights = _mm512_loadu_si512(w + at);
            __m512 low = applied16(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, weights)),
                                   _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, patterns[q])), a, t, masked, &count);
            __m512 high = applied16(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, weights)),
                                    _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, patterns[q])), a, t, masked, &count);
            _mm512_storeu_si512(out + at, bf16_rounded32(low, high, order));
        }
    }
    return count;
}
#else
#define BF16_BUILT 0
#endif

static int simd_usable(void) {
    static int usable = -1; /* checked once: every fill and apply asks */
    if (usable < 0)
        usable = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("avx512bw");
    return usable;
}

static int bf16_usable(void) {
#if BF16_BUILT
    static int usable = -1;
    if (usable < 0) usable = simd_usable() && __builtin_cpu_supports("avx512bf16");
    return usable;
#else
    return 0;
#endif
}

/* The vector loops by level: `simd` 1 the AVX-512 loop, 2 (the default) the BF16 one where the CPU has it. */
static int64_t apply8_simd_16(uint16_t *out, const uint16_t *w, const uint16_t *magnitudes, int64_t words,
                              uint64_t key, uint64_t first, float alpha, float threshold, int masked, int simd) {
#if BF16_BUILT
    if (simd >= 2 && bf16_usable())
        return apply8_bf16_16(out, w, magnitudes, words, key, first, alpha, threshold, masked);
#endif
    return apply8_avx512_16(out, w, magnitudes, words, key, first, alpha, threshold, masked);
}
static int64_t apply8_simd_32(float *out, const float *w, const uint16_t *magnitudes, int64_t words, uint64_t key,
                              uint64_t first, float alpha, float threshold, int masked, int simd) {
    return apply8_avx512_32(out, w, magnitudes, words, key, first, alpha, threshold, masked);
}
#else
#define SIMD_BUILT 0
static int simd_usable(void) { return 0; }
static int bf16_usable(void) { return 0; }
#endif

/* Scheme 5's fill: the portable loop for the entries before the first word boundary and after the last whole group of
 * 8 words, the AVX-512 one in between where `simd` (and the CPU has it). */
#define FILL8_ENTRY(NAME, T, PORTABLE, SIMD_FILL)                                                               \
    EXPORT void NAME(T *out, const T *table, const uint16_t *magnitudes, int64_t n, uint64_t key, int64_t start,   \
                     int simd) {                                                                                \
        int64_t head = (8 - (start & 7)) & 7;                                                                   \
        if (!simd || !simd_usable() || n < head + 64) { /* a CPU without AVX-512 takes the portable loop */   \
            PORTABLE(out, table, n, key, start);                                                                \
            return;                                                                                             \
        }                                                                                                       \
        PORTABLE(out, table, head, key, start);                                                                 \
        int64_t words = (n - head) / 64 * 8;                                                                    \
        SIMD_FILL(out + head, magnitudes, words, key, (uint64_t)(start + head) >> 3);                           \
        int64_t done = head + 8 * words;                                                                        \
        PORTABLE(out + done, table, n - done, key, start + done);                                               \
    }

/* Scheme 3's fills. */
EXPORT void zo_counter_fill_16(uint16_t *out, const uint16_t *table, int64_t n, uint64_t key, int64_t start) {
    fill16_16(out, table, n, key, start);
}
EXPORT void zo_counter_fill_32(uint32_t *out, const uint32_t *table, int64_t n, uint64_t key, int64_t start) {
    fill16_32(out, table, n, key, start);
}
EXPORT void zo_counter_fill_64(uint64_t *out, const uint64_t *table, int64_t n, uint64_t key, int64_t start) {
    fill16_64(out, table, n, key, start);
}

#if SIMD_BUILT
FILL8_ENTRY(zo_counter8_fill_16, uint16_t, fill8_16, fill8_simd_16)
FILL8_ENTRY(zo_counter8_fill_32, uint32_t, fill8_32, fill8_simd_32)
#else
EXPORT void zo_counter8_fill_16(uint16_t *out, const uint16_t *table, const uint16_t *magnitudes, int64_t n, uint64_t key,
                                int64_t start, int simd) { fill8_16(out, table, n, key, start); }
EXPORT void zo_counter8_fill_32(uint32_t *out, const uint32_t *table, const uint16_t *magnitudes, int64_t n, uint64_t key,
                                int64_t start, int simd) { fill8_32(out, table, n, key, start); }
#endif
EXPORT void zo_counter8_fill_64(uint64_t *out, const uint64_t *table, const uint16_t *magnitudes, int64_t n, uint64_t key,
                                int64_t start, int simd) { fill8_64(out, table, n, key, start); }

/* Scheme 5's apply (see APPLY8): the portable loop around the AVX-512 one, as the fill. fp32 (T float) and bf16.
 * Returns the number of entries inside the mask (masked), else 0. */
#if SIMD_BUILT
#define APPLY8_ENTRY(NAME, T, PORTABLE, SIMD_APPLY)                                                            \
    EXPORT int64_t NAME(T *out, const T *w, const float *table, const uint16_t *magnitudes, int64_t n,          \
                        uint64_t key, int64_t start, float alpha, float threshold, int masked, int simd) {      \
        int64_t head = (8 - (start & 7)) & 7;                                                                   \
        if (!simd || !simd_usable() || n < head + 64)                                                           \
            return PORTABLE(out, w, table, n, key, start, alpha, threshold, masked);                            \
        int64_t count = PORTABLE(out, w, table, head, key, start, alpha, threshold, masked);                    \
        int64_t words = (n - head) / 64 * 8;                                                                    \
        count += SIMD_APPLY(out + head, w + head, magnitudes, words, key, (uint64_t)(start + head) >> 3, alpha,  \
                            threshold, masked, simd);                                                           \
        int64_t done = head + 8 * words;                                                                        \
        return count + PORTABLE(out + done, w + done, table, n - done, key, start + done, alpha, threshold, masked); \
    }
#else
#define APPLY8_ENTRY(NAME, T, PORTABLE, SIMD_APPLY)                                                            \
    EXPORT int64_t NAME(T *out, const T *w, const float *table, const uint16_t *magnitudes, int64_t n,          \
                        uint64_t key, int64_t start, float alpha, float threshold, int masked, int simd) {      \
        return PORTABLE(out, w, table, n, key, start, alpha, threshold, masked);                                \
    }
#endif
APPLY8_ENTRY(zo_counter8_apply_32, float, apply8_32, apply8_simd_32)
APPLY8_ENTRY(zo_counter8_apply_16, uint16_t, apply8_16, apply8_simd_16)

/* Scheme 5's apply split over torch's own OpenMP team. The forward's matmuls run on that team, whose workers spin for
 * a while after each op: a pass on threads of our own then shares the cores with them (measured: a 1B model's
 * perturbed copies took twice as long inside the forward as alone). So the pass runs as a parallel region of the
 * very runtime torch loaded, its entry points handed over by the caller (counter_noise._team): nothing here links an
 * OpenMP runtime of its own. Each thread takes a run of whole 64-entry groups; z of an entry depends on its index
 * alone, so the bits do not depend on the split. */
typedef void (*parallel_fn)(void (*)(void *), void *, unsigned, unsigned); /* GOMP_parallel's ABI */
static parallel_fn team_parallel = NULL;
static int (*team_thread_num)(void) = NULL;
static int (*team_size)(void) = NULL;
static int team_last = 0; /* threads of the last team pass (diagnostics, tests) */

EXPORT void zo_counter8_set_team(void *parallel, void *thread_num, void *num_threads) {
    team_parallel = (parallel_fn)parallel;
    team_thread_num = (int (*)(void))thread_num;
    team_size = (int (*)(void))num_threads;
}

#define TEAM_MAX 256
struct apply_job {
    void *out;
    const void *w;
    const float *table;
    const uint16_t *magnitudes;
    int64_t n, start;
    uint64_t key;
    float alpha, threshold;
    int masked, simd, width;
    int64_t counts[TEAM_MAX];
};

static void apply_piece(void *data) {
    struct apply_job *job = (struct apply_job *)data;
    int size = team_size(), id = team_thread_num();
    int64_t groups = job->n / 64;
    int64_t lo = groups * id / size * 64, hi = id == size - 1 ? job->n : groups * (id + 1) / size * 64;
    int64_t count = 0;
    if (hi > lo && job->width == 32)
        count = zo_counter8_apply_32((float *)job->out + lo, (const float *)job->w + lo, job->table, job->magnitudes,
                                     hi - lo, job->key, job->start + lo, job->alpha, job->threshold, job->masked,
                                     job->simd);
    else if (hi > lo)
        count = zo_counter8_apply_16((uint16_t *)job->out + lo, (const uint16_t *)job->w + lo, job->table,
                                     job->magnitudes, hi - lo, job->key, job->start + lo, job->alpha, job->threshold,
                                     job->masked, job->simd);
    job->counts[id] = count;
    if (id == 0) team_last = size;
}

/* zo_counter8_apply_{32,16} (width 32 or 16) on `threads` threads of the team; on the calling thread alone where no
 * team was handed over or the pass is short. Returns the number of entries inside the mask. */
EXPORT int64_t zo_counter8_apply_team(int width, void *out, const void *w, const float *table,
                                      const uint16_t *magnitudes, int64_t n, uint64_t key, int64_t start, float alpha,
                                      float threshold, int masked, int simd, int threads) {
    if (threads > TEAM_MAX) threads = TEAM_MAX;
    if (threads > n / 4096) threads = (int)(n / 4096); /* under ~4K entries per thread a region costs more than it saves */
    if (!team_parallel || threads <= 1) {
        team_last = 1;
        if (width == 32)
            return zo_counter8_apply_32((float *)out, (const float *)w, table, magnitudes, n, key, start, alpha,
                                        threshold, masked, simd);
        return zo_counter8_apply_16((uint16_t *)out, (const uint16_t *)w, table, magnitudes, n, key, start, alpha,
                                    threshold, masked, simd);
    }
    struct apply_job job = {out, w, table, magnitudes, n, start, key, alpha, threshold, masked, simd, width, {0}};
    team_parallel(apply_piece, &job, (unsigned)threads, 0);
    int64_t count = 0;
    for (int i = 0; i < threads; i++) count += job.counts[i];
    return count;
}

/* How many threads the last pass split over the team ran on (1: on the calling thread alone). */
EXPORT int zo_counter8_team_last(void) { return team_last; }

/* The vector loops built that this CPU runs: 0 none, 1 AVX-512 (the fills and applies), 2 also the BF16 apply. */
EXPORT int zo_counter8_simd(void) { return simd_usable() + bf16_usable(); }

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_counter_noise",
                                    "Counter-based Gaussian z fills (see zo_trainer/counter_noise.py).", -1, NULL};

PyMODINIT_FUNC PyInit__counter_noise(void) { return PyModule_Create(&module); }
