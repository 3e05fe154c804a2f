/* tqcodec.coding.native: the range decoder of spec §8.4, with §8.5's rejection, for

   decode(words, cumulative, lookup, count, out, itemsize) -> verdict

   words       the payload: uint32 words in this machine's byte order, at least one
   cumulative  c_0 ... c_A of §8.2 as uint32 (A + 1 entries, c_A = 2^24)
   lookup      2^LOOKUP_BITS + 1 uint32 entries: lookup[b] is the largest s with c_s <= b << 12
   count       the symbols to decode (>= 1)
   out         a writable buffer of count * itemsize bytes (itemsize 1, 2 or 4): the symbols

   Returns 0 (decoded, canonical), 1 (some q >= 2^24: §8.5 rule 1) or 2 (the payload is not what
   §8.3 encodes for the decoded symbols: §8.5 rule 2). The GIL is released while decoding.

   Rule 2 without re-encoding: the decoder's `lower` and `range` are, step for step, the
   encoder's (§8.3 and §8.4 update them alike), and the decode keeps 0 <= V - L < range, where V
   is the payload read so far and L the encoder's exact (carried) lower bound, both in units of
   the current 64-bit window. After R renormalisations the encoder seals (§8.3.3) with R + 1 + z
   words (z = 1 when the seal appends its zero word), and its payload's value is L rounded up to
   a multiple of 2^32. A payload of exactly that many words with the same value is the same word
   list; and two values both in [L, L + range) that agree modulo 2^64 (what `point - lower`
   keeps) are equal. So the payload is canonical exactly when it has R + 1 + z words and
   `point - lower` equals (-lower) mod 2^32. tests/coding/test_rangecoder.py holds this to a
   re-encode on mutated payloads. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define LOOKUP_BITS 12
#define SHIFT (24 - LOOKUP_BITS)

enum { OK = 0, OUTSIDE = 1, NOT_CANONICAL = 2 };

static inline uint32_t load32(const unsigned char *p, Py_ssize_t i) {
    uint32_t v;
    memcpy(&v, p + 4 * i, 4); /* any alignment */
    return v;
}

static int decode_words(const unsigned char *words, Py_ssize_t n, const uint32_t *cum,
                        const uint32_t *lookup, Py_ssize_t count, unsigned char *out, int itemsize) {
    uint64_t point = (uint64_t)load32(words, 0) << 32;
    if (n > 1)
        point |= load32(words, 1);
    Py_ssize_t pos = 2;
    uint64_t lower = 0, range = UINT64_MAX;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t scale = range >> 24;
        uint64_t q = (point - lower) / scale;
        if (q >= (1u << 24))
            return OUTSIDE;
        uint32_t lo = lookup[q >> SHIFT], hi = lookup[(q >> SHIFT) + 1];
        while (lo < hi) { /* the largest s in [lo, hi] with c_s <= q */
            uint32_t mid = (lo + hi + 1) >> 1;
            if (cum[mid] <= q)
                lo = mid;
            else
                hi = mid - 1;
        }
        switch (itemsize) {
        case 1: out[i] = (unsigned char)lo; break;
        case 2: { uint16_t v = (uint16_t)lo; memcpy(out + 2 * i, &v, 2); break; }
        default: memcpy(out + 4 * i, &lo, 4); break;
        }
        lower += scale * cum[lo];
        range = scale * (uint64_t)(cum[lo + 1] - cum[lo]);
        if (range < ((uint64_t)1 << 32)) {
            lower <<= 32;
            range <<= 32;
            point <<= 32;
            if (pos < n)
                point |= load32(words, pos);
            pos++;
        }
    }
    int zero_word = ((lower + range) >> 32) == ((lower + 0xFFFFFFFFu) >> 32);
    if (n != pos - 1 + zero_word)
        return NOT_CANONICAL;
    if (point - lower != ((0 - lower) & 0xFFFFFFFFu))
        return NOT_CANONICAL;
    return OK;
}

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer words, cum, lookup, out;
    Py_ssize_t count;
    int itemsize;
    if (!PyArg_ParseTuple(args, "y*y*y*nw*i", &words, &cum, &lookup, &count, &out, &itemsize))
        return NULL;
    const char *problem = NULL;
    Py_ssize_t symbols = cum.len / 4 - 1;
    if (words.len < 4 || words.len % 4)
        problem = "words: a positive multiple of 4 bytes";
    else if (cum.len % 4 || symbols < 2)
        problem = "cumulative: at least 3 uint32 entries";
    else if (lookup.len != 4 * ((1 << LOOKUP_BITS) + 1))
        problem = "lookup: 2^12 + 1 uint32 entries";
    else if (itemsize != 1 && itemsize != 2 && itemsize != 4)
        problem = "itemsize: 1, 2 or 4";
    else if (count < 1 || out.len != count * itemsize)
        problem = "out: count * itemsize bytes, count >= 1";
    int verdict = OK;
    if (!problem) {
        const uint32_t *c = (const uint32_t *)cum.buf, *l = (const uint32_t *)lookup.buf;
        if ((uintptr_t)cum.buf % 4 || (uintptr_t)lookup.buf % 4)
            problem = "cumulative and lookup: 4-byte aligned";
        else if (c[0] != 0 || c[symbols] != (1u << 24) || l[1 << LOOKUP_BITS] >= (uint32_t)symbols)
            problem = "cumulative: c_0 = 0 and c_A = 2^24; lookup: entries below A";
        else {
            Py_BEGIN_ALLOW_THREADS
            verdict = decode_words((const unsigned char *)words.buf, words.len / 4, c, l, count,
                                   (unsigned char *)out.buf, itemsize);
            Py_END_ALLOW_THREADS
        }
    }
    PyBuffer_Release(&words);
    PyBuffer_Release(&cum);
    PyBuffer_Release(&lookup);
    PyBuffer_Release(&out);
    if (problem) {
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    return PyLong_FromLong(verdict);
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, "Spec §8.4 range decoding with §8.5's rejection (see the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "native", NULL, -1, methods};

PyMODINIT_FUNC PyInit_native(void) { return PyModule_Create(&module); }
