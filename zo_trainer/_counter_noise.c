/* Scheme 3's Gaussian z (zo_trainer/counter_noise.py): entry i of the stream of `key` is the table entry picked by the
 * 16 bits (i % 4) of word i / 4, a word being SplitMix64's output function of key + word * golden. The table holds the
 * 65,536 values as bit patterns of the output dtype (2, 4 or 8 bytes), so filling copies bits: no float arithmetic,
 * the same bits on every machine. Called through ctypes (which releases the GIL); a Python module only so that it
 * builds and links as an extension everywhere. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static inline uint64_t mix(uint64_t key, uint64_t word) {
    uint64_t x = key + word * 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* out[0 .. n) = entries start .. start + n of the stream of key. */
#define FILL(NAME, T)                                                                      \
    void NAME(T *out, const T *table, int64_t n, uint64_t key, int64_t start) {           \
        int64_t i = 0;                                                                     \
        for (; i < n && ((start + i) & 3); i++) { /* the rest of a word begun before */  \
            uint64_t x = mix(key, (uint64_t)(start + i) >> 2);                             \
            out[i] = table[(x >> (16 * ((start + i) & 3))) & 0xFFFF];                      \
        }                                                                                  \
        uint64_t first = (uint64_t)(start + i) >> 2;                                       \
        int64_t words = (n - i) / 4;                                                       \
        T *o = out + i;                                                                    \
        for (int64_t j = 0; j < words; j++) {                                              \
            uint64_t x = mix(key, first + (uint64_t)j);                                    \
            o[4 * j] = table[x & 0xFFFF];                                                  \
            o[4 * j + 1] = table[(x >> 16) & 0xFFFF];                                      \
            o[4 * j + 2] = table[(x >> 32) & 0xFFFF];                                      \
            o[4 * j + 3] = table[x >> 48];                                                 \
        }                                                                                  \
        for (i += 4 * words; i < n; i++) { /* the first entries of one more word */       \
            uint64_t x = mix(key, (uint64_t)(start + i) >> 2);                             \
            out[i] = table[(x >> (16 * ((start + i) & 3))) & 0xFFFF];                      \
        }                                                                                  \
    }

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

EXPORT FILL(zo_counter_fill_16, uint16_t)
EXPORT FILL(zo_counter_fill_32, uint32_t)
EXPORT FILL(zo_counter_fill_64, uint64_t)

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_counter_noise",
                                    "Scheme 3's Gaussian z fill (see zo_trainer/counter_noise.py).", -1, NULL};

PyMODINIT_FUNC PyInit__counter_noise(void) { return PyModule_Create(&module); }
