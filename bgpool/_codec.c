/* bgpool._codec: the bytes of a published vars snapshot, both ways.

Why C: a 10 kB snapshot is about a thousand values. Walking them in Python to
check their types, then again in every reader to make them read-only, costs a
few hundred microseconds; one pass in C each way costs a few dozen.

Why not marshal (or pickle): a reader must get back only the value types a
worker may publish. This format can express nothing else, so the decoder
cannot produce a code object, a set or an instance, and it calls nothing a
worker could have defined (only int.from_bytes, for big ints). Equal data always encodes to equal bytes (marshal's output
depends on reference counts), which is how a publish of unchanged data is
recognised.

Format, version 1. Integers in the headers are unsigned LEB128 varints.

    snapshot := 0x01 value               (the value is always a mapping)
    value    := 'N' | 'T' | 'F'          None, True, False
              | 'i' varint               int in the int64 range, zigzag-coded
              | 'I' varint(n) sign mag   other int: sign byte (0 or 1), then
                                         n - 1 bytes of magnitude, little-endian
              | 'd' 8 bytes              float, IEEE 754 binary64, little-endian
              | 's' varint(n) n bytes    str, UTF-8 (lone surrogates passed through)
              | 'b' varint(n) n bytes    bytes
              | 'l' varint(n) value{n}   list or tuple
              | 'm' varint(n) (key value){n}
                                         dict
    key      := varint(2k) k bytes       a key written out, in UTF-8; in a mapping
                                         of at most NUMBERED_MAX items it is
                                         numbered 0, 1, ... as they come
              | varint(2i + 1)           key number i again

Repeated keys (the same fields in every record of a list) are written once,
and a reader makes one str object for each, hashed once. The keys of a large
mapping (a table keyed by id, say) are seldom repeated elsewhere, so they are
not numbered: that would only cost the writer a growing table.

The decoder checks every length against the bytes that remain before it
allocates anything, refuses unknown tags, duplicate keys, trailing bytes and
nesting deeper than MAX_DEPTH, so arbitrary bytes give ValueError, never a
crash or an unbounded allocation.
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define FORMAT 0x01
#define MAX_DEPTH 2000 /* as marshal's; bounds the C stack of both walks */
#define NUMBERED_MAX 32 /* the largest mapping whose keys are numbered */

/* ------------------------------------------------------------------ encoder */

/* A key already written, found by identity first (the items of a list
   usually share their key objects), then by value. */
typedef struct {
    PyObject *key; /* a reference owned by the table */
    Py_hash_t hash;
    Py_ssize_t number;
} KeySlot;

typedef struct {
    unsigned char *buf;
    Py_ssize_t len, cap;
    PyObject *reason; /* set when a value is refused: why (a str) */
    PyObject *path;   /* then: keys and indexes from the refused value outwards */
    KeySlot *keys;    /* open addressing, at most half full */
    Py_ssize_t nkeys, capkeys;
} Encoder;

/* The size of the last snapshot encoded: a worker publishes snapshots of about
   the same size again and again, so the buffer starts large enough. */
static Py_ssize_t size_hint = 4096;

static int
grow_buffer(Encoder *e, Py_ssize_t need)
{
    if (need > PY_SSIZE_T_MAX / 2 - e->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t cap = e->cap ? e->cap : size_hint;
    while (cap < e->len + need) {
        cap *= 2;
    }
    unsigned char *buf = PyMem_Realloc(e->buf, (size_t)cap);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    e->buf = buf;
    e->cap = cap;
    return 0;
}

/* Make room for `need` more bytes. */
static inline int
grow(Encoder *e, Py_ssize_t need)
{
    return e->len + need <= e->cap ? 0 : grow_buffer(e, need);
}

static inline void
put_varint(Encoder *e, uint64_t v) /* room for 10 bytes must be reserved */
{
    while (v >= 0x80) {
        e->buf[e->len++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    e->buf[e->len++] = (unsigned char)v;
}

static int
put_tagged_size(Encoder *e, char tag, Py_ssize_t n)
{
    if (grow(e, 11) < 0) {
        return -1;
    }
    e->buf[e->len++] = (unsigned char)tag;
    put_varint(e, (uint64_t)n);
    return 0;
}

static int
put_raw(Encoder *e, const char *data, Py_ssize_t n)
{
    if (grow(e, n) < 0) {
        return -1;
    }
    memcpy(e->buf + e->len, data, (size_t)n);
    e->len += n;
    return 0;
}

/* The length of a str in front of its UTF-8: after `tag`, or doubled for a key
   (tag 0). Room for 11 bytes must be reserved. */
static inline void
put_text_length(Encoder *e, char tag, Py_ssize_t n)
{
    if (tag) {
        e->buf[e->len++] = (unsigned char)tag;
        put_varint(e, (uint64_t)n);
    }
    else {
        put_varint(e, (uint64_t)n << 1);
    }
}

static int
put_text(Encoder *e, char tag, PyObject *s)
{
    Py_ssize_t n;
    const char *utf8;
    if (PyUnicode_IS_COMPACT_ASCII(s)) { /* the common case: the UTF-8 is the data */
        n = PyUnicode_GET_LENGTH(s);
        utf8 = (const char *)PyUnicode_DATA(s);
    }
    else {
        utf8 = PyUnicode_AsUTF8AndSize(s, &n);
    }
    if (utf8 != NULL) {
        if (grow(e, 11 + n) < 0) {
            return -1;
        }
        put_text_length(e, tag, n);
        memcpy(e->buf + e->len, utf8, (size_t)n);
        e->len += n;
        return 0;
    }
    if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
        return -1;
    }
    PyErr_Clear(); /* lone surrogates: rare, so the slow path */
    PyObject *bytes = PyUnicode_AsEncodedString(s, "utf-8", "surrogatepass");
    if (bytes == NULL) {
        return -1;
    }
    int rc = -1;
    n = PyBytes_GET_SIZE(bytes);
    if (grow(e, 11) == 0) {
        put_text_length(e, tag, n);
        rc = put_raw(e, PyBytes_AS_STRING(bytes), n);
    }
    Py_DECREF(bytes);
    return rc;
}

/* An int outside the int64 range: sign byte, then the magnitude's bytes. */
static int
put_big_int(Encoder *e, PyObject *v, int negative)
{
    PyObject *magnitude = PyNumber_Absolute(v);
    if (magnitude == NULL) {
        return -1;
    }
    int rc = -1;
    PyObject *bits = PyObject_CallMethod(magnitude, "bit_length", NULL);
    PyObject *bytes = NULL;
    if (bits != NULL) {
        Py_ssize_t nbits = PyLong_AsSsize_t(bits);
        if (!(nbits == -1 && PyErr_Occurred())) {
            bytes = PyObject_CallMethod(magnitude, "to_bytes", "ns", (nbits + 7) / 8, "little");
        }
    }
    if (bytes != NULL) {
        Py_ssize_t n = PyBytes_GET_SIZE(bytes);
        if (put_tagged_size(e, 'I', n + 1) == 0 && grow(e, 1) == 0) {
            e->buf[e->len++] = (unsigned char)negative;
            rc = put_raw(e, PyBytes_AS_STRING(bytes), n);
        }
    }
    Py_XDECREF(bits);
    Py_XDECREF(bytes);
    Py_DECREF(magnitude);
    return rc;
}

/* Refuse a value of `type`: `format` says why, with the type's name (%S) and,
   if not NULL, `culprit`'s repr (%R). */
static int
refuse(Encoder *e, const char *format, PyTypeObject *type, PyObject *culprit)
{
    PyObject *name = PyType_GetQualName(type);
    if (name != NULL) {
        e->reason = PyUnicode_FromFormat(format, name, culprit);
        Py_DECREF(name);
    }
    return -1;
}

static KeySlot *
find_key(KeySlot *keys, Py_ssize_t cap, PyObject *key, Py_hash_t hash)
{
    size_t mask = (size_t)cap - 1;
    for (size_t i = (size_t)hash & mask;; i = (i + 1) & mask) {
        KeySlot *slot = &keys[i];
        if (slot->key == NULL || slot->key == key ||
            (slot->hash == hash && PyUnicode_Compare(slot->key, key) == 0)) {
            return slot;
        }
    }
}

static int
grow_keys(Encoder *e)
{
    Py_ssize_t cap = e->capkeys ? e->capkeys * 2 : 64;
    KeySlot *keys = PyMem_Calloc((size_t)cap, sizeof(KeySlot));
    if (keys == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < e->capkeys; i++) {
        if (e->keys[i].key != NULL) {
            *find_key(keys, cap, e->keys[i].key, e->keys[i].hash) = e->keys[i];
        }
    }
    PyMem_Free(e->keys);
    e->keys = keys;
    e->capkeys = cap;
    return 0;
}

/* A key of a mapping of at most NUMBERED_MAX items: its number if it came
   before, else its text. */
static int
put_numbered_key(Encoder *e, PyObject *key)
{
    Py_hash_t hash = PyObject_Hash(key); /* cached in the str */
    if (hash == -1 || (2 * (e->nkeys + 1) > e->capkeys && grow_keys(e) < 0)) {
        return -1;
    }
    KeySlot *slot = find_key(e->keys, e->capkeys, key, hash);
    if (slot->key != NULL) {
        if (grow(e, 10) < 0) {
            return -1;
        }
        put_varint(e, ((uint64_t)slot->number << 1) | 1);
        return 0;
    }
    Py_INCREF(key);
    *slot = (KeySlot){key, hash, e->nkeys++};
    return put_text(e, 0, key);
}

static int encode_value(Encoder *e, PyObject *v, int depth);

/* After the child at `segment` failed: if it was refused, note where. */
static int
child_failed(Encoder *e, PyObject *segment)
{
    if (e->reason != NULL && PyList_Append(e->path, segment) < 0) {
        Py_CLEAR(e->reason);
    }
    return -1;
}

static int
encode_sequence(Encoder *e, PyObject *v, int depth)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(v);
    PyObject **items = PySequence_Fast_ITEMS(v);
    if (put_tagged_size(e, 'l', n) < 0) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (encode_value(e, items[i], depth + 1) < 0) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL) {
                Py_CLEAR(e->reason);
                return -1;
            }
            child_failed(e, index);
            Py_DECREF(index);
            return -1;
        }
    }
    return 0;
}

static int
encode_dict(Encoder *e, PyObject *v, int depth)
{
    Py_ssize_t n = PyDict_GET_SIZE(v);
    if (put_tagged_size(e, 'm', n) < 0) {
        return -1;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *item;
    while (PyDict_Next(v, &pos, &key, &item)) {
        if (!PyUnicode_CheckExact(key)) {
            return refuse(e, "keys must be str, not %S (%R)", Py_TYPE(key), key);
        }
        if ((n <= NUMBERED_MAX ? put_numbered_key(e, key) : put_text(e, 0, key)) < 0) {
            return -1;
        }
        if (encode_value(e, item, depth + 1) < 0) {
            return child_failed(e, key);
        }
    }
    return 0;
}

static int
encode_value(Encoder *e, PyObject *v, int depth)
{
    PyTypeObject *type = Py_TYPE(v);
    if (v == Py_None || v == Py_True || v == Py_False) {
        if (grow(e, 1) < 0) {
            return -1;
        }
        e->buf[e->len++] = v == Py_None ? 'N' : v == Py_True ? 'T' : 'F';
        return 0;
    }
    if (type == &PyUnicode_Type) {
        return put_text(e, 's', v);
    }
    if (type == &PyLong_Type) {
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow) {
            return put_big_int(e, v, overflow < 0);
        }
        if (x == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (grow(e, 11) < 0) {
            return -1;
        }
        e->buf[e->len++] = 'i';
        put_varint(e, ((uint64_t)x << 1) ^ (uint64_t)(x >> 63));
        return 0;
    }
    if (type == &PyFloat_Type) {
        if (grow(e, 9) < 0) {
            return -1;
        }
        e->buf[e->len++] = 'd';
        if (PyFloat_Pack8(PyFloat_AS_DOUBLE(v), (char *)e->buf + e->len, 1) < 0) {
            return -1;
        }
        e->len += 8;
        return 0;
    }
    if (type == &PyBytes_Type) {
        if (put_tagged_size(e, 'b', PyBytes_GET_SIZE(v)) < 0) {
            return -1;
        }
        return put_raw(e, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
    }
    if (type != &PyDict_Type && type != &PyList_Type && type != &PyTuple_Type) {
        return refuse(e, "values of type %S are not allowed", type, NULL);
    }
    if (depth >= MAX_DEPTH) {
        PyErr_Format(PyExc_ValueError,
                     "vars are nested more than %d levels deep (does a container hold itself?)",
                     MAX_DEPTH);
        return -1;
    }
    return type == &PyDict_Type ? encode_dict(e, v, depth) : encode_sequence(e, v, depth);
}

PyDoc_STRVAR(encode_doc,
"encode(value: dict) -> bytes\n\n"
"The bytes of snapshot `value`. A value of a type that may not be published\n"
"raises TypeError(reason, path): path lists the keys and indexes that lead to\n"
"it, outermost first.");

static PyObject *
codec_encode(PyObject *Py_UNUSED(module), PyObject *value)
{
    if (!PyDict_CheckExact(value)) {
        PyErr_SetString(PyExc_TypeError, "encode() takes a dict");
        return NULL;
    }
    Encoder e = {NULL, 0, 0, NULL, PyList_New(0), NULL, 0, 0};
    if (e.path == NULL || grow(&e, 1) < 0) {
        Py_XDECREF(e.path);
        PyMem_Free(e.buf);
        return NULL;
    }
    e.buf[e.len++] = FORMAT;
    PyObject *result = NULL;
    if (encode_value(&e, value, 0) == 0) {
        result = PyBytes_FromStringAndSize((const char *)e.buf, e.len);
        size_hint = e.len + e.len / 8 > 4096 ? e.len + e.len / 8 : 4096;
    }
    else if (e.reason != NULL && PyList_Reverse(e.path) == 0) {
        PyObject *path = PyList_AsTuple(e.path);
        if (path != NULL) {
            PyObject *args = PyTuple_Pack(2, e.reason, path);
            if (args != NULL) {
                PyErr_SetObject(PyExc_TypeError, args);
                Py_DECREF(args);
            }
            Py_DECREF(path);
        }
    }
    Py_XDECREF(e.reason);
    Py_DECREF(e.path);
    for (Py_ssize_t i = 0; i < e.capkeys; i++) {
        Py_XDECREF(e.keys[i].key);
    }
    PyMem_Free(e.keys);
    PyMem_Free(e.buf);
    return result;
}

/* ------------------------------------------------------------------ decoder */

typedef struct {
    const unsigned char *p, *end;
    PyObject **keys; /* the keys so far, by number (references owned) */
    Py_ssize_t nkeys, capkeys;
} Decoder;

static PyObject *
malformed(const char *what)
{
    PyErr_Format(PyExc_ValueError, "malformed snapshot: %s", what);
    return NULL;
}

/* A varint, or -1 (with ValueError) if it is cut short or longer than 64 bits. */
static int
get_long_varint(Decoder *d, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (d->p >= d->end) {
            malformed("cut short");
            return -1;
        }
        unsigned char byte = *d->p++;
        v |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            if (shift == 63 && byte > 1) {
                break;
            }
            *out = v;
            return 0;
        }
    }
    malformed("varint too long");
    return -1;
}

static inline int
get_varint(Decoder *d, uint64_t *out)
{
    if (d->p < d->end && *d->p < 0x80) { /* most lengths and numbers: one byte */
        *out = *d->p++;
        return 0;
    }
    return get_long_varint(d, out);
}

/* A count of items or bytes, each of which needs at least one more byte. */
static int
get_size(Decoder *d, Py_ssize_t *out)
{
    uint64_t n;
    if (get_varint(d, &n) < 0) {
        return -1;
    }
    if (n > (uint64_t)(d->end - d->p)) {
        malformed("a length runs past the end");
        return -1;
    }
    *out = (Py_ssize_t)n;
    return 0;
}

static PyObject *
get_utf8(Decoder *d, Py_ssize_t n)
{
    const unsigned char *start = d->p;
    d->p += n;
    if (n > 1 && n <= 64) { /* short ASCII: skip the general decoder's set-up */
        unsigned char any = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            any |= start[i];
        }
        if (any < 0x80) {
            PyObject *s = PyUnicode_New(n, 127);
            if (s != NULL) {
                memcpy(PyUnicode_1BYTE_DATA(s), start, (size_t)n);
            }
            return s;
        }
    }
    PyObject *s = PyUnicode_DecodeUTF8((const char *)start, n, "surrogatepass");
    if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
        return malformed("invalid UTF-8");
    }
    return s;
}

static PyObject *
get_text(Decoder *d)
{
    Py_ssize_t n;
    return get_size(d, &n) < 0 ? NULL : get_utf8(d, n);
}

/* A key of a mapping; `numbered` if the mapping is small enough for its new
   keys to be numbered. */
static PyObject *
get_key(Decoder *d, int numbered)
{
    uint64_t v;
    if (get_varint(d, &v) < 0) {
        return NULL;
    }
    if (v & 1) {
        if ((v >> 1) >= (uint64_t)d->nkeys) {
            return malformed("a key number that came before no key");
        }
        PyObject *key = d->keys[v >> 1];
        Py_INCREF(key);
        return key;
    }
    if ((v >> 1) > (uint64_t)(d->end - d->p)) {
        return malformed("a length runs past the end");
    }
    PyObject *key = get_utf8(d, (Py_ssize_t)(v >> 1));
    if (key == NULL || !numbered) {
        return key;
    }
    if (d->nkeys == d->capkeys) {
        Py_ssize_t cap = d->capkeys ? d->capkeys * 2 : 64;
        PyObject **keys = PyMem_Realloc(d->keys, (size_t)cap * sizeof(PyObject *));
        if (keys == NULL) {
            Py_DECREF(key);
            return PyErr_NoMemory();
        }
        d->keys = keys;
        d->capkeys = cap;
    }
    Py_INCREF(key);
    d->keys[d->nkeys++] = key;
    return key;
}

static PyObject *
get_big_int(Decoder *d)
{
    Py_ssize_t n;
    if (get_size(d, &n) < 0) {
        return NULL;
    }
    if (n < 1 || d->p[0] > 1) {
        return malformed("bad big int");
    }
    int negative = d->p[0];
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)d->p + 1, n - 1);
    d->p += n;
    if (bytes == NULL) {
        return NULL;
    }
    PyObject *v = PyObject_CallMethod((PyObject *)&PyLong_Type, "from_bytes", "Os", bytes,
                                      "little");
    Py_DECREF(bytes);
    if (v != NULL && negative) {
        Py_SETREF(v, PyNumber_Negative(v));
    }
    return v;
}

static PyObject *decode_value(Decoder *d, int depth);

static PyObject *
decode_sequence(Decoder *d, int depth)
{
    Py_ssize_t n;
    if (get_size(d, &n) < 0) {
        return NULL;
    }
    PyObject *tuple = PyTuple_New(n);
    if (tuple == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = decode_value(d, depth + 1);
        if (item == NULL) {
            Py_DECREF(tuple);
            return NULL;
        }
        PyTuple_SET_ITEM(tuple, i, item);
    }
    return tuple;
}

/* An empty dict with room for `n` items (no resizing on the way there). */
static PyObject *
new_dict(Py_ssize_t n)
{
#if PY_VERSION_HEX < 0x030D0000
    /* Declared in Include/cpython/dictobject.h (non-limited API) up to 3.12. */
    return n > 5 ? _PyDict_NewPresized(n) : PyDict_New();
#else
    (void)n;
    return PyDict_New();
#endif
}

static PyObject *
decode_mapping(Decoder *d, int depth)
{
    Py_ssize_t n;
    if (get_size(d, &n) < 0) {
        return NULL;
    }
    PyObject *dict = new_dict(n);
    if (dict == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = get_key(d, n <= NUMBERED_MAX);
        if (key == NULL) {
            goto error;
        }
        PyObject *item = decode_value(d, depth + 1);
        if (item == NULL) {
            Py_DECREF(key);
            goto error;
        }
        int rc = PyDict_SetItem(dict, key, item);
        Py_DECREF(key);
        Py_DECREF(item);
        if (rc < 0) {
            goto error;
        }
        if (PyDict_GET_SIZE(dict) != i + 1) {
            malformed("duplicate key");
            goto error;
        }
    }
    PyObject *proxy = PyDictProxy_New(dict);
    Py_DECREF(dict);
    return proxy;
error:
    Py_DECREF(dict);
    return NULL;
}

static PyObject *
decode_value(Decoder *d, int depth)
{
    if (d->p >= d->end) {
        return malformed("cut short");
    }
    unsigned char tag = *d->p++;
    switch (tag) {
    case 'N':
        Py_RETURN_NONE;
    case 'T':
        Py_RETURN_TRUE;
    case 'F':
        Py_RETURN_FALSE;
    case 'i': {
        uint64_t u;
        if (get_varint(d, &u) < 0) {
            return NULL;
        }
        return PyLong_FromLongLong((long long)(u >> 1) ^ -(long long)(u & 1));
    }
    case 'I':
        return get_big_int(d);
    case 'd': {
        if (d->end - d->p < 8) {
            return malformed("cut short");
        }
        double x = PyFloat_Unpack8((const char *)d->p, 1);
        d->p += 8;
        if (x == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        return PyFloat_FromDouble(x);
    }
    case 's':
        return get_text(d);
    case 'b': {
        Py_ssize_t n;
        if (get_size(d, &n) < 0) {
            return NULL;
        }
        PyObject *bytes = PyBytes_FromStringAndSize((const char *)d->p, n);
        d->p += n;
        return bytes;
    }
    case 'l':
    case 'm':
        if (depth >= MAX_DEPTH) {
            return malformed("nested too deeply");
        }
        return tag == 'l' ? decode_sequence(d, depth) : decode_mapping(d, depth);
    default:
        return malformed("unknown tag");
    }
}

PyDoc_STRVAR(decode_doc,
"decode(data: bytes) -> MappingProxyType\n\n"
"The deeply read-only value of a snapshot's bytes: mappings are\n"
"MappingProxyTypes, sequences tuples. Bytes that are not a snapshot raise\n"
"ValueError.");

static PyObject *
codec_decode(PyObject *Py_UNUSED(module), PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Decoder d = {(const unsigned char *)view.buf, (const unsigned char *)view.buf + view.len,
                 NULL, 0, 0};
    PyObject *value = NULL;
    if (d.p >= d.end || *d.p++ != FORMAT) {
        malformed("unknown format");
    }
    else if (d.p >= d.end || *d.p != 'm') {
        malformed("not a mapping");
    }
    else {
        value = decode_value(&d, 0);
        if (value != NULL && d.p != d.end) {
            Py_CLEAR(value);
            malformed("trailing bytes");
        }
    }
    for (Py_ssize_t i = 0; i < d.nkeys; i++) {
        Py_DECREF(d.keys[i]);
    }
    PyMem_Free(d.keys);
    PyBuffer_Release(&view);
    return value;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef codec_methods[] = {
    {"encode", codec_encode, METH_O, encode_doc},
    {"decode", codec_decode, METH_O, decode_doc},
    {NULL, NULL, 0, NULL},
};

static int
codec_exec(PyObject *module)
{
    return PyModule_AddIntConstant(module, "MAX_DEPTH", MAX_DEPTH);
}

static PyModuleDef_Slot codec_slots[] = {
    {Py_mod_exec, codec_exec},
    {0, NULL},
};

static struct PyModuleDef codec_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "bgpool._codec",
    .m_doc = "The bytes of a published vars snapshot: encode() in workers, decode() in readers.",
    .m_size = 0,
    .m_methods = codec_methods,
    .m_slots = codec_slots,
};

PyMODINIT_FUNC
PyInit__codec(void)
{
    return PyModuleDef_Init(&codec_module);
}
