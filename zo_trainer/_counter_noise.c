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
#include <stdint.h>

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

static int simd_usable(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
}
#else
#define SIMD_BUILT 0
static int simd_usable(void) { return 0; }
#endif

/* Scheme 5's fill: the portable loop for the entries before the first word boundary and after the last whole group of
 * 8 words, the AVX-512 one in between where `simd` (and the CPU has it). */
#define FILL8_ENTRY(NAME, T, PORTABLE, SIMD_FILL)                                                               \
    EXPORT void NAME(T *out, const T *table, const uint16_t *magnitudes, int64_t n, uint64_t key, int64_t start,   \
                     int simd) {                                                                                \
        int64_t head = (8 - (start & 7)) & 7;                                                                   \
        if (!simd || n < head + 64) {                                                                           \
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

/* Whether scheme 5's AVX-512 fill is built and this CPU runs it. */
EXPORT int zo_counter8_simd(void) { return simd_usable(); }

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_counter_noise",
                                    "Counter-based Gaussian z fills (see zo_trainer/counter_noise.py).", -1, NULL};

PyMODINIT_FUNC PyInit__counter_noise(void) { return PyModule_Create(&module); }
