/* bgpool.shm._codec: the bytes of a published vars snapshot, both ways.

Why C: a 10 kB snapshot is about a thousand values. Walking them in Python to
check their types, then again in every reader to make them read-only, costs a
few hundred microseconds; one pass in C each way costs a few dozen.

Why not marshal (or pickle): a reader must get back only the value types a
worker may publish. This format can express nothing else, so the decoder
cannot produce a code object, a set or an instance, and it calls nothing a
worker could have defined (only int.from_bytes, for big ints).

The bytes depend only on the value: its types, its items, and the order of
each dict's items (kept on purpose, so a reader iterates a mapping in the
writer's order); never on reference counts or addresses (marshal's do). So
publishing the same data again gives the same bytes, and that is how an
unchanged publish is recognised (a byte comparison). Equal values do not
always encode alike: {'a': 1, 'b': 2} and {'b': 2, 'a': 1} differ in order,
{'n': 1} and {'n': 1.0} in type (a reader gets each type back), {'x': 0.0}
and {'x': -0.0} in sign. Publishing one after the other counts as a change and
makes a new generation; readers then decode a new, equal value, which costs
them that decode and nothing else.

Format, version 1. Integers in the headers are unsigned LEB128 varints. The
tags are the characters below (the Tag enum names them).

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

The reader checks the whole snapshot before it builds any value (see "reader"
below): every length against the bytes that remain, tags, key numbers, UTF-8,
duplicate keys, trailing bytes and nesting deeper than MAX_DEPTH. So arbitrary
bytes give ValueError from decode(), never a crash, an unbounded allocation or
an error later, when a value is read.
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define FORMAT 0x01     /* a snapshot's first byte: the format's version */
#define MAX_DEPTH 2000  /* as marshal's; bounds the C stack of both walks */
#define NUMBERED_MAX 32 /* the largest mapping whose keys are numbered */

/* The byte in front of each value. */
typedef enum {
    TAG_NONE = 'N',
    TAG_TRUE = 'T',
    TAG_FALSE = 'F',
    TAG_INT = 'i',     /* a zigzag varint */
    TAG_BIG_INT = 'I', /* a size, the sign byte, the magnitude */
    TAG_FLOAT = 'd',   /* FLOAT_SIZE bytes */
    TAG_STR = 's',     /* a size, UTF-8 */
    TAG_BYTES = 'b',   /* a size, the bytes */
    TAG_LIST = 'l',    /* a count, the items */
    TAG_MAP = 'm',     /* a count, the keys and items */
} Tag;

enum {
    VARINT_MAX = 10,                    /* the longest varint: 64 bits, 7 a byte */
    TAGGED_VARINT_MAX = 1 + VARINT_MAX, /* a tag and a varint */
    FLOAT_SIZE = 8,
    TOP_MAP_AT = 2, /* where the outermost mapping's count is: after FORMAT and TAG_MAP */
};

#define VARINT_MORE 0x80 /* set in each byte of a varint but the last */
#define VARINT_BITS 0x7f /* the 7 bits of the value each byte carries */
#define KEY_NUMBER 1     /* the low bit of a key's varint: a key number, not a text's length */
#define ASCII_MAX 0x7f

/* ------------------------------------------------------------- a hash set */

/* Open addressing, at most half full. The encoder keeps the str objects of
   the keys it numbered in one, the walk the texts (UTF-8 in the snapshot) of
   keys it has seen; they differ in what a key is and how two compare, which
   the caller says. */

#define MIN_SET_CAPACITY 64 /* a power of two */

typedef struct {
    uint64_t hash;
    const void *key;  /* NULL: the place is free */
    Py_ssize_t value; /* kept with the key: the encoder's key number, the walk's text length */
} HashEntry;

typedef struct {
    HashEntry *entries;
    Py_ssize_t used, cap;
} HashSet;

/* Whether the taken `entry` holds what `probe` describes, whose hash is
   `hash`. (The caller compares the hashes, so that it can test cheaper
   things first.) */
typedef int (*SameKey)(const HashEntry *entry, const void *probe, uint64_t hash);

/* The entry that holds `probe`, else the free place where it belongs. */
static inline HashEntry *
hashset_find(const HashSet *set, uint64_t hash, const void *probe, SameKey same)
{
    size_t mask = (size_t)set->cap - 1;
    for (size_t i = (size_t)hash & mask;; i = (i + 1) & mask) {
        HashEntry *entry = &set->entries[i];
        if (entry->key == NULL || same(entry, probe, hash)) {
            return entry;
        }
    }
}

static int
hashset_grow(HashSet *set, Py_ssize_t want)
{
    Py_ssize_t cap = set->cap ? set->cap : MIN_SET_CAPACITY;
    while (cap < 2 * want) {
        cap *= 2;
    }
    HashEntry *entries = PyMem_Calloc((size_t)cap, sizeof(HashEntry));
    if (entries == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t mask = (size_t)cap - 1;
    for (Py_ssize_t i = 0; i < set->cap; i++) {
        if (set->entries[i].key != NULL) { /* all distinct: only a free place is needed */
            size_t j = (size_t)set->entries[i].hash & mask;
            while (entries[j].key != NULL) {
                j = (j + 1) & mask;
            }
            entries[j] = set->entries[i];
        }
    }
    PyMem_Free(set->entries);
    set->entries = entries;
    set->cap = cap;
    return 0;
}

/* Make room for `want` entries in all. */
static inline int
hashset_reserve(HashSet *set, Py_ssize_t want)
{
    return 2 * want <= set->cap ? 0 : hashset_grow(set, want);
}

/* Fill the free place `entry` that hashset_find() returned. */
static inline void
hashset_add(HashSet *set, HashEntry *entry, uint64_t hash, const void *key, Py_ssize_t value)
{
    *entry = (HashEntry){.hash = hash, .key = key, .value = value};
    set->used++;
}

/* ------------------------------------------------------------------ encoder */

/* Is the numbered key in `entry` the str `probe`? By identity first (the
   items of a list usually share their key objects), then by value. */
static int
same_key_object(const HashEntry *entry, const void *probe, uint64_t hash)
{
    return entry->key == probe ||
           (entry->hash == hash &&
            PyUnicode_Compare((PyObject *)entry->key, (PyObject *)probe) == 0);
}

typedef struct {
    PyObject *out;      /* the bytes object being written, resized as it grows */
    unsigned char *buf; /* its data */
    Py_ssize_t len, cap;
    PyObject *reason; /* set when a value is refused: why (a str) */
    PyObject *path;   /* then: keys and indexes from the refused value outwards */
    HashSet keys;     /* the numbered keys (references it owns), with their numbers */
} Encoder;

#define MIN_BUFFER 4096

/* The size of the last snapshot encoded: a worker publishes snapshots of about
   the same size again and again, so the buffer starts large enough. */
static Py_ssize_t size_hint = MIN_BUFFER;

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
    if (e->out == NULL) {
        e->out = PyBytes_FromStringAndSize(NULL, cap);
    }
    else if (_PyBytes_Resize(&e->out, cap) < 0) { /* it frees e->out on failure */
        return -1;
    }
    if (e->out == NULL) {
        return -1;
    }
    e->buf = (unsigned char *)PyBytes_AS_STRING(e->out);
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
put_varint(Encoder *e, uint64_t v) /* room for VARINT_MAX bytes must be reserved */
{
    while (v >= VARINT_MORE) {
        e->buf[e->len++] = (unsigned char)(v | VARINT_MORE);
        v >>= 7;
    }
    e->buf[e->len++] = (unsigned char)v;
}

static int
put_tagged_size(Encoder *e, Tag tag, Py_ssize_t n)
{
    if (grow(e, TAGGED_VARINT_MAX) < 0) {
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

/* How a text is introduced: as a str value (TAG_STR, its length), or as a
   key written out (no tag, its length doubled). */
typedef enum { AS_KEY, AS_STR } TextRole;

/* The length of a text in front of its UTF-8. Room for TAGGED_VARINT_MAX
   bytes must be reserved. */
static inline void
put_text_length(Encoder *e, TextRole role, Py_ssize_t n)
{
    if (role == AS_STR) {
        e->buf[e->len++] = TAG_STR;
        put_varint(e, (uint64_t)n);
    }
    else {
        put_varint(e, (uint64_t)n << 1);
    }
}

static int
put_text(Encoder *e, TextRole role, PyObject *s)
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
        if (grow(e, TAGGED_VARINT_MAX + n) < 0) {
            return -1;
        }
        put_text_length(e, role, n);
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
    if (grow(e, TAGGED_VARINT_MAX) == 0) {
        put_text_length(e, role, n);
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
        if (put_tagged_size(e, TAG_BIG_INT, n + 1) == 0 && grow(e, 1) == 0) {
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

/* A key of a mapping of at most NUMBERED_MAX items: its number if it came
   before, else its text. */
static int
put_numbered_key(Encoder *e, PyObject *key)
{
    Py_hash_t hash = ((PyASCIIObject *)key)->hash; /* cached in the str, once hashed */
    hash = hash != -1 ? hash : PyObject_Hash(key);
    if (hash == -1 || hashset_reserve(&e->keys, e->keys.used + 1) < 0) {
        return -1;
    }
    HashEntry *found = hashset_find(&e->keys, (uint64_t)hash, key, same_key_object);
    if (found->key != NULL) {
        if (grow(e, VARINT_MAX) < 0) {
            return -1;
        }
        put_varint(e, ((uint64_t)found->value << 1) | KEY_NUMBER);
        return 0;
    }
    hashset_add(&e->keys, found, (uint64_t)hash, Py_NewRef(key), e->keys.used);
    return put_text(e, AS_KEY, key);
}

static int encode_value(Encoder *e, PyObject *v, int depth);

/* After the child at `segment` failed: if it was refused, note where. */
static int
child_failed(Encoder *e, PyObject *segment)
{
    if (e->reason != NULL && e->path == NULL && (e->path = PyList_New(0)) == NULL) {
        Py_CLEAR(e->reason);
    }
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
    if (put_tagged_size(e, TAG_LIST, n) < 0) {
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
    if (put_tagged_size(e, TAG_MAP, n) < 0) {
        return -1;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *item;
    while (PyDict_Next(v, &pos, &key, &item)) {
        if (!PyUnicode_CheckExact(key)) {
            return refuse(e, "keys must be str, not %S (%R)", Py_TYPE(key), key);
        }
        if ((n <= NUMBERED_MAX ? put_numbered_key(e, key) : put_text(e, AS_KEY, key)) < 0) {
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
        e->buf[e->len++] = v == Py_None ? TAG_NONE : v == Py_True ? TAG_TRUE : TAG_FALSE;
        return 0;
    }
    if (type == &PyUnicode_Type) {
        return put_text(e, AS_STR, v);
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
        if (grow(e, TAGGED_VARINT_MAX) < 0) {
            return -1;
        }
        e->buf[e->len++] = TAG_INT;
        put_varint(e, ((uint64_t)x << 1) ^ (uint64_t)(x >> 63)); /* zigzag */
        return 0;
    }
    if (type == &PyFloat_Type) {
        if (grow(e, 1 + FLOAT_SIZE) < 0) {
            return -1;
        }
        e->buf[e->len++] = TAG_FLOAT;
        if (PyFloat_Pack8(PyFloat_AS_DOUBLE(v), (char *)e->buf + e->len, 1) < 0) {
            return -1;
        }
        e->len += FLOAT_SIZE;
        return 0;
    }
    if (type == &PyBytes_Type) {
        if (put_tagged_size(e, TAG_BYTES, PyBytes_GET_SIZE(v)) < 0) {
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
    Encoder e = {0};
    if (grow(&e, 1) < 0) {
        return NULL;
    }
    e.buf[e.len++] = FORMAT;
    PyObject *result = NULL;
    if (encode_value(&e, value, 0) == 0) {
        Py_ssize_t hint = e.len + e.len / 8; /* an eighth more: room to grow */
        size_hint = hint > MIN_BUFFER ? hint : MIN_BUFFER;
        if (_PyBytes_Resize(&e.out, e.len) == 0) {
            result = e.out;
            e.out = NULL;
        }
    }
    else if (e.reason != NULL && (e.path != NULL || (e.path = PyList_New(0)) != NULL) &&
             PyList_Reverse(e.path) == 0) {
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
    Py_XDECREF(e.path);
    Py_XDECREF(e.out);
    for (Py_ssize_t i = 0; i < e.keys.cap; i++) {
        Py_XDECREF((PyObject *)e.keys.entries[i].key);
    }
    PyMem_Free(e.keys.entries);
    return result;
}

/* ------------------------------------------------------------------- reader */

/* Reading happens in two steps. decode() checks the whole snapshot in one walk
   that creates no Python object: every tag, length, key number and UTF-8
   sequence, duplicate keys, trailing bytes, nesting depth. It records where
   each mapping ends and where each numbered key is written, and returns the
   outermost mapping as a Vars object whose dict is not built yet. A Vars
   builds its dict the first time it is read: keys and plain values at once,
   each nested mapping as another unbuilt Vars, each list as a tuple.

   Why: a reader that polls for a new snapshot and reads one flag out of it
   should not pay for a thousand objects it never touches. Cold (a reader that
   was waiting), building them takes several times as long as hot. Reading
   every value costs what it did when decode() built everything. */

typedef struct {
    const unsigned char *p, *end;
} Cursor;

static PyObject *
malformed(const char *what)
{
    PyErr_Format(PyExc_ValueError, "malformed snapshot: %s", what);
    return NULL;
}

static int
refused(const char *what)
{
    malformed(what);
    return -1;
}

/* A varint, or -1 (with ValueError) if it is cut short or longer than 64 bits. */
static int
get_long_varint(Cursor *c, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (c->p >= c->end) {
            return refused("cut short");
        }
        unsigned char byte = *c->p++;
        v |= (uint64_t)(byte & VARINT_BITS) << shift;
        if (!(byte & VARINT_MORE)) {
            if (shift == 63 && byte > 1) { /* the tenth byte carries bit 63 alone */
                break;
            }
            *out = v;
            return 0;
        }
    }
    return refused("varint too long");
}

static inline int
get_varint(Cursor *c, uint64_t *out)
{
    if (c->p < c->end && *c->p < VARINT_MORE) { /* most lengths and numbers: one byte */
        *out = *c->p++;
        return 0;
    }
    return get_long_varint(c, out);
}

/* A count of items or bytes, each of which needs at least one more byte. */
static int
get_size(Cursor *c, Py_ssize_t *out)
{
    uint64_t n;
    if (get_varint(c, &n) < 0) {
        return -1;
    }
    if (n > (uint64_t)(c->end - c->p)) {
        return refused("a length runs past the end");
    }
    *out = (Py_ssize_t)n;
    return 0;
}

#define HIGH_BITS 0x8080808080808080ULL /* the top bit of each of 8 bytes: not ASCII */

/* Is s[0:n] UTF-8, lone surrogates allowed (what "surrogatepass" accepts)? */
static int
valid_utf8(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    while (i < n) {
        if (n - i >= 4 * 8) { /* ASCII runs, four words at a time */
            uint64_t words[4];
            memcpy(words, s + i, sizeof(words));
            if (!((words[0] | words[1] | words[2] | words[3]) & HIGH_BITS)) {
                i += sizeof(words);
                continue;
            }
        }
        if (n - i >= 8) {
            uint64_t word;
            memcpy(&word, s + i, sizeof(word));
            if (!(word & HIGH_BITS)) {
                i += sizeof(word);
                continue;
            }
        }
        /* UTF-8's table: a lead byte 0xxxxxxx is ASCII; 110xxxxx (but not C0,
           C1: overlong), 1110xxxx and 11110xxx (up to F4: U+10FFFF) start 2, 3
           and 4 byte sequences, whose other bytes are 10xxxxxx. */
        unsigned char lead = s[i];
        if (lead <= ASCII_MAX) {
            i++;
            continue;
        }
        Py_ssize_t more;
        uint32_t cp;
        if (lead >= 0xc2 && lead <= 0xdf) {
            more = 1, cp = lead & 0x1f;
        }
        else if (lead >= 0xe0 && lead <= 0xef) {
            more = 2, cp = lead & 0x0f;
        }
        else if (lead >= 0xf0 && lead <= 0xf4) {
            more = 3, cp = lead & 0x07;
        }
        else {
            return 0;
        }
        if (n - i <= more) {
            return 0;
        }
        for (Py_ssize_t k = 1; k <= more; k++) {
            if ((s[i + k] & 0xc0) != 0x80) {
                return 0;
            }
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if ((more == 2 && cp < 0x800) || (more == 3 && (cp < 0x10000 || cp > 0x10ffff))) {
            return 0; /* overlong, or past U+10FFFF */
        }
        i += more + 1;
    }
    return 1;
}

/* ---- the walk */

typedef struct {
    Py_ssize_t end;        /* the offset just past this mapping */
    Py_ssize_t next;       /* the number of the first mapping after it and its contents */
    Py_ssize_t keys_after; /* how many keys were numbered up to its end */
} MapRecord;

typedef struct {
    Py_ssize_t at, len; /* where a numbered key's UTF-8 is */
    PyObject *str;      /* made on first use (owned) */
} KeyRecord;

/* A key's text in the snapshot. The walk keeps those it has seen in a
   HashSet, their lengths as values: the keys of one large mapping, or every
   numbered key of the snapshot. */
typedef struct {
    const unsigned char *s;
    Py_ssize_t len;
} Text;

static int
same_text(const HashEntry *entry, const void *probe, uint64_t hash)
{
    const Text *text = probe;
    return entry->hash == hash && entry->value == text->len &&
           memcmp(entry->key, text->s, (size_t)text->len) == 0;
}

#define FNV_OFFSET 0xcbf29ce484222325ULL /* FNV-1a, 64 bits */
#define FNV_PRIME 0x100000001b3ULL

static uint64_t
text_hash(const unsigned char *s, Py_ssize_t n)
{
    uint64_t h = FNV_OFFSET;
    for (Py_ssize_t i = 0; i < n; i++) {
        h = (h ^ s[i]) * FNV_PRIME;
    }
    return h;
}

/* Add the text s[0:n]: 1 if it is new, 0 if it was there, -1 on MemoryError. */
static int
add_text(HashSet *set, const unsigned char *s, Py_ssize_t n)
{
    if (hashset_reserve(set, set->used + 1) < 0) {
        return -1;
    }
    Text text = {.s = s, .len = n};
    uint64_t hash = text_hash(s, n);
    HashEntry *entry = hashset_find(set, hash, &text, same_text);
    if (entry->key != NULL) {
        return 0;
    }
    hashset_add(set, entry, hash, s, n);
    return 1;
}

typedef struct {
    Cursor c;
    const unsigned char *base;
    MapRecord *maps;
    Py_ssize_t nmaps, capmaps;
    KeyRecord *keys;
    Py_ssize_t nkeys, capkeys;
    HashSet numbered; /* the text of every numbered key: none may be written twice */
} Walk;

#define MIN_ARRAY 16

static int
grow_array(void **array, Py_ssize_t *cap, size_t item)
{
    Py_ssize_t n = *cap ? *cap * 2 : MIN_ARRAY;
    void *grown = PyMem_Realloc(*array, (size_t)n * item);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *array = grown;
    *cap = n;
    return 0;
}

/* Check one key of a mapping. A small mapping's keys are numbered, and
   `seen` holds the numbers of its keys so far; a large one's are written out,
   and `texts` holds them. */
static int
walk_key(Walk *w, Py_ssize_t *seen, Py_ssize_t nseen, HashSet *texts)
{
    uint64_t v;
    if (get_varint(&w->c, &v) < 0) {
        return -1;
    }
    Py_ssize_t number;
    if (v & KEY_NUMBER) {
        if (texts != NULL) {
            return refused("a key number in a mapping of more than " Py_STRINGIFY(
                NUMBERED_MAX) " items");
        }
        if ((v >> 1) >= (uint64_t)w->nkeys) {
            return refused("a key number that came before no key");
        }
        number = (Py_ssize_t)(v >> 1);
    }
    else {
        if ((v >> 1) > (uint64_t)(w->c.end - w->c.p)) {
            return refused("a length runs past the end");
        }
        const unsigned char *s = w->c.p;
        Py_ssize_t n = (Py_ssize_t)(v >> 1);
        w->c.p += n;
        if (!valid_utf8(s, n)) {
            return refused("invalid UTF-8");
        }
        int added = add_text(texts != NULL ? texts : &w->numbered, s, n);
        if (added <= 0) {
            return added < 0          ? -1
                   : texts != NULL ? refused("duplicate key")
                                   : refused("a key written out twice (numbered keys are not)");
        }
        if (texts != NULL) {
            return 0;
        }
        if (w->nkeys == w->capkeys &&
            grow_array((void **)&w->keys, &w->capkeys, sizeof(KeyRecord)) < 0) {
            return -1;
        }
        w->keys[w->nkeys] = (KeyRecord){.at = s - w->base, .len = n, .str = NULL};
        number = w->nkeys++;
    }
    for (Py_ssize_t i = 0; i < nseen; i++) {
        if (seen[i] == number) {
            return refused("duplicate key");
        }
    }
    seen[nseen] = number;
    return 0;
}

/* Check a value that is not a container, its tag just read. */
static inline int
walk_scalar(Cursor *c, unsigned char tag)
{
    Py_ssize_t n;
    uint64_t u;
    switch ((Tag)tag) {
    case TAG_NONE:
    case TAG_TRUE:
    case TAG_FALSE:
        return 0;
    case TAG_INT:
        return get_varint(c, &u);
    case TAG_BIG_INT:
        if (get_size(c, &n) < 0) {
            return -1;
        }
        if (n < 1 || c->p[0] > 1) {
            return refused("bad big int");
        }
        c->p += n;
        return 0;
    case TAG_FLOAT:
        if (c->end - c->p < FLOAT_SIZE) {
            return refused("cut short");
        }
        c->p += FLOAT_SIZE;
        return 0;
    case TAG_STR:
    case TAG_BYTES:
        if (get_size(c, &n) < 0) {
            return -1;
        }
        c->p += n;
        return tag == TAG_BYTES || valid_utf8(c->p - n, n) ? 0 : refused("invalid UTF-8");
    default: /* walk_value() takes the containers */
        return refused("unknown tag");
    }
}

static int walk_container(Walk *w, unsigned char tag, int depth);

/* Check the value at the cursor (containers nest `depth` deep around it). */
static inline int
walk_value(Walk *w, int depth)
{
    if (w->c.p >= w->c.end) {
        return refused("cut short");
    }
    unsigned char tag = *w->c.p++;
    return tag == TAG_LIST || tag == TAG_MAP ? walk_container(w, tag, depth)
                                             : walk_scalar(&w->c, tag);
}

static int
walk_mapping(Walk *w, int depth)
{
    Py_ssize_t n;
    if (get_size(&w->c, &n) < 0) {
        return -1;
    }
    if (w->nmaps == w->capmaps &&
        grow_array((void **)&w->maps, &w->capmaps, sizeof(MapRecord)) < 0) {
        return -1;
    }
    Py_ssize_t number = w->nmaps++;
    Py_ssize_t seen[NUMBERED_MAX];
    HashSet texts = {0};
    if (n > NUMBERED_MAX && hashset_reserve(&texts, n) < 0) { /* room for all its keys */
        return -1;
    }
    int rc = 0;
    for (Py_ssize_t i = 0; i < n && rc == 0; i++) {
        rc = walk_key(w, seen, n <= NUMBERED_MAX ? i : 0, n <= NUMBERED_MAX ? NULL : &texts);
        if (rc == 0) {
            rc = walk_value(w, depth + 1);
        }
    }
    PyMem_Free(texts.entries);
    w->maps[number] = (MapRecord){.end = w->c.p - w->base, .next = w->nmaps, .keys_after = w->nkeys};
    return rc;
}

static int
walk_container(Walk *w, unsigned char tag, int depth)
{
    if (depth >= MAX_DEPTH) {
        return refused("nested too deeply");
    }
    if (tag == TAG_MAP) {
        return walk_mapping(w, depth);
    }
    Py_ssize_t n;
    if (get_size(&w->c, &n) < 0) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (walk_value(w, depth + 1) < 0) {
            return -1;
        }
    }
    return 0;
}

/* ---- what the walk leaves: a Document, shared by the Vars built from it */

typedef struct {
    PyObject_HEAD
    PyObject *data; /* the snapshot's bytes */
    MapRecord *maps;
    KeyRecord *keys;
    Py_ssize_t nkeys;
} Document;

static void
document_dealloc(Document *doc)
{
    for (Py_ssize_t i = 0; i < doc->nkeys; i++) {
        Py_XDECREF(doc->keys[i].str);
    }
    PyMem_Free(doc->keys);
    PyMem_Free(doc->maps);
    Py_XDECREF(doc->data);
    PyObject_Free(doc);
}

static PyTypeObject DocumentType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "bgpool.shm._codec.Document",
    .tp_basicsize = sizeof(Document),
    .tp_dealloc = (destructor)document_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The checked bytes of one snapshot, read by its Vars.",
};

/* A mapping of a snapshot, read-only; its dict is built on first read. */
typedef struct {
    PyObject_HEAD
    Document *doc;
    Py_ssize_t at;          /* the offset of the mapping's item count */
    Py_ssize_t number;      /* its MapRecord */
    Py_ssize_t keys_before; /* keys numbered before it */
    PyObject *dict;         /* NULL until built */
} Vars;

static PyTypeObject VarsType;

/* ---- building values */

typedef struct {
    Cursor c;
    Document *doc;
    Py_ssize_t map;   /* the number of the next mapping to come */
    Py_ssize_t nkeys; /* keys numbered so far */
} Builder;

#define SHORT_ASCII_MAX 64 /* the longest text checked for ASCII by hand */

/* A str from UTF-8 that the walk checked. */
static PyObject *
make_str(const unsigned char *s, Py_ssize_t n)
{
    if (n > 1 && n <= SHORT_ASCII_MAX) { /* short ASCII: skip the general decoder's set-up */
        unsigned char any = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            any |= s[i];
        }
        if (any <= ASCII_MAX) {
            PyObject *str = PyUnicode_New(n, ASCII_MAX);
            if (str != NULL) {
                memcpy(PyUnicode_1BYTE_DATA(str), s, (size_t)n);
            }
            return str;
        }
    }
    return PyUnicode_DecodeUTF8((const char *)s, n, "surrogatepass");
}

static PyObject *
numbered_key(Document *doc, Py_ssize_t i)
{
    KeyRecord *key = &doc->keys[i];
    if (key->str == NULL) {
        key->str = make_str((const unsigned char *)PyBytes_AS_STRING(doc->data) + key->at,
                            key->len);
        if (key->str == NULL) {
            return NULL;
        }
    }
    Py_INCREF(key->str);
    return key->str;
}

static PyObject *
new_vars(Document *doc, Py_ssize_t at, Py_ssize_t number, Py_ssize_t keys_before)
{
    Vars *v = PyObject_New(Vars, &VarsType);
    if (v != NULL) {
        Py_INCREF(doc);
        *v = (Vars){
            .ob_base = v->ob_base,
            .doc = doc,
            .at = at,
            .number = number,
            .keys_before = keys_before,
            .dict = NULL,
        };
    }
    return (PyObject *)v;
}

static PyObject *
get_big_int(Cursor *c)
{
    Py_ssize_t n;
    if (get_size(c, &n) < 0) {
        return NULL;
    }
    int negative = c->p[0];
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)c->p + 1, n - 1);
    c->p += n;
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

/* The value at the cursor, of a snapshot the walk checked: a mapping comes
   back unbuilt, and the cursor skips it. */
static PyObject *
build_value(Builder *b)
{
    Cursor *c = &b->c;
    unsigned char tag = *c->p++;
    Py_ssize_t n;
    switch ((Tag)tag) {
    case TAG_NONE:
        Py_RETURN_NONE;
    case TAG_TRUE:
        Py_RETURN_TRUE;
    case TAG_FALSE:
        Py_RETURN_FALSE;
    case TAG_INT: {
        uint64_t u;
        if (get_varint(c, &u) < 0) {
            return NULL;
        }
        return PyLong_FromLongLong((long long)(u >> 1) ^ -(long long)(u & 1)); /* zigzag */
    }
    case TAG_BIG_INT:
        return get_big_int(c);
    case TAG_FLOAT: {
        double x = PyFloat_Unpack8((const char *)c->p, 1);
        c->p += FLOAT_SIZE;
        if (x == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        return PyFloat_FromDouble(x);
    }
    case TAG_STR:
    case TAG_BYTES:
        if (get_size(c, &n) < 0) {
            return NULL;
        }
        c->p += n;
        return tag == TAG_STR ? make_str(c->p - n, n)
                              : PyBytes_FromStringAndSize((const char *)c->p - n, n);
    case TAG_LIST: {
        if (get_size(c, &n) < 0) {
            return NULL;
        }
        PyObject *tuple = PyTuple_New(n);
        if (tuple == NULL) {
            return NULL;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = build_value(b);
            if (item == NULL) {
                Py_DECREF(tuple);
                return NULL;
            }
            PyTuple_SET_ITEM(tuple, i, item);
        }
        return tuple;
    }
    case TAG_MAP: {
        const unsigned char *base = (const unsigned char *)PyBytes_AS_STRING(b->doc->data);
        PyObject *v = new_vars(b->doc, c->p - base, b->map, b->nkeys);
        MapRecord *skipped = &b->doc->maps[b->map];
        c->p = base + skipped->end;
        b->map = skipped->next;
        b->nkeys = skipped->keys_after;
        return v;
    }
    default: /* the walk let no other tag through */
        return malformed("unknown tag");
    }
}

static PyObject *
build_key(Builder *b, int numbered)
{
    uint64_t v;
    if (get_varint(&b->c, &v) < 0) {
        return NULL;
    }
    if (v & KEY_NUMBER) {
        return numbered_key(b->doc, (Py_ssize_t)(v >> 1));
    }
    Py_ssize_t n = (Py_ssize_t)(v >> 1);
    b->c.p += n;
    return numbered ? numbered_key(b->doc, b->nkeys++) : make_str(b->c.p - n, n);
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

/* The dict of `self`, built on first use (a borrowed reference). */
static PyObject *
vars_dict(Vars *self)
{
    if (self->dict != NULL) {
        return self->dict;
    }
    Document *doc = self->doc;
    const unsigned char *base = (const unsigned char *)PyBytes_AS_STRING(doc->data);
    Builder b = {
        .c = {.p = base + self->at, .end = base + PyBytes_GET_SIZE(doc->data)},
        .doc = doc,
        .map = self->number + 1, /* the mappings inside it come next */
        .nkeys = self->keys_before,
    };
    Py_ssize_t n;
    if (get_size(&b.c, &n) < 0) {
        return NULL;
    }
    PyObject *dict = new_dict(n);
    for (Py_ssize_t i = 0; dict != NULL && i < n; i++) {
        PyObject *key = build_key(&b, n <= NUMBERED_MAX);
        PyObject *item = key == NULL ? NULL : build_value(&b);
        if (item == NULL || PyDict_SetItem(dict, key, item) < 0) {
            Py_CLEAR(dict);
        }
        Py_XDECREF(key);
        Py_XDECREF(item);
    }
    if (dict != NULL && self->dict == NULL) {
        self->dict = dict; /* building can run a finalizer, which may have read self */
    }
    else {
        Py_XDECREF(dict);
    }
    return self->dict;
}

/* ---- the Vars type: a read-only mapping, as MappingProxyType over its dict */

static void
vars_dealloc(Vars *self)
{
    Py_XDECREF(self->dict);
    Py_DECREF(self->doc);
    PyObject_Free(self);
}

static Py_ssize_t
vars_length(Vars *self)
{
    PyObject *dict = vars_dict(self);
    return dict == NULL ? -1 : PyDict_GET_SIZE(dict);
}

static PyObject *
vars_subscript(Vars *self, PyObject *key)
{
    PyObject *dict = vars_dict(self);
    return dict == NULL ? NULL : PyObject_GetItem(dict, key);
}

static int
vars_contains(Vars *self, PyObject *key)
{
    PyObject *dict = vars_dict(self);
    return dict == NULL ? -1 : PyDict_Contains(dict, key);
}

static PyObject *
vars_iter(Vars *self)
{
    PyObject *dict = vars_dict(self);
    return dict == NULL ? NULL : PyObject_GetIter(dict);
}

static PyObject *
vars_repr(Vars *self)
{
    PyObject *dict = vars_dict(self);
    return dict == NULL ? NULL : PyUnicode_FromFormat("Vars(%R)", dict);
}

static PyObject *
vars_richcompare(Vars *self, PyObject *other, int op)
{
    PyObject *dict = vars_dict(self);
    if (dict == NULL) {
        return NULL;
    }
    if (Py_IS_TYPE(other, &VarsType) && (other = vars_dict((Vars *)other)) == NULL) {
        return NULL;
    }
    return PyObject_RichCompare(dict, other, op);
}

/* The names of the dict's methods that a Vars passes on (interned once). */
enum { KEYS, VALUES, ITEMS, REVERSED, NAMES };
static PyObject *method_names[NAMES];

static PyObject *
vars_pass_on(Vars *self, int method)
{
    PyObject *dict = vars_dict(self);
    return dict == NULL ? NULL : PyObject_CallMethodNoArgs(dict, method_names[method]);
}

static PyObject *
vars_keys(Vars *self, PyObject *Py_UNUSED(ignored))
{
    return vars_pass_on(self, KEYS);
}

static PyObject *
vars_values(Vars *self, PyObject *Py_UNUSED(ignored))
{
    return vars_pass_on(self, VALUES);
}

static PyObject *
vars_items(Vars *self, PyObject *Py_UNUSED(ignored))
{
    return vars_pass_on(self, ITEMS);
}

static PyObject *
vars_reversed(Vars *self, PyObject *Py_UNUSED(ignored))
{
    return vars_pass_on(self, REVERSED);
}

static PyObject *
vars_get(Vars *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "get expected 1 or 2 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *dict = vars_dict(self);
    if (dict == NULL) {
        return NULL;
    }
    PyObject *value = PyDict_GetItemWithError(dict, args[0]);
    if (value == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        value = nargs == 2 ? args[1] : Py_None;
    }
    return Py_NewRef(value);
}

static PyObject *
vars_copy(Vars *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *dict = vars_dict(self);
    return dict == NULL ? NULL : PyDict_Copy(dict);
}

static PyMethodDef vars_methods[] = {
    {
        .ml_name = "keys",
        .ml_meth = (PyCFunction)vars_keys,
        .ml_flags = METH_NOARGS,
        .ml_doc = "A view of the keys.",
    },
    {
        .ml_name = "values",
        .ml_meth = (PyCFunction)vars_values,
        .ml_flags = METH_NOARGS,
        .ml_doc = "A view of the values.",
    },
    {
        .ml_name = "items",
        .ml_meth = (PyCFunction)vars_items,
        .ml_flags = METH_NOARGS,
        .ml_doc = "A view of the (key, value) pairs.",
    },
    {
        .ml_name = "get",
        .ml_meth = (PyCFunction)(void (*)(void))vars_get,
        .ml_flags = METH_FASTCALL,
        .ml_doc = "The value of a key, else the default (None).",
    },
    {
        .ml_name = "copy",
        .ml_meth = (PyCFunction)vars_copy,
        .ml_flags = METH_NOARGS,
        .ml_doc = "A shallow copy, as a dict.",
    },
    {
        .ml_name = "__reversed__",
        .ml_meth = (PyCFunction)vars_reversed,
        .ml_flags = METH_NOARGS,
        .ml_doc = "The keys, last first.",
    },
    {0}, /* the end */
};

/* `vars | other` and `other | vars`: a new dict, as for a MappingProxyType. */
static PyObject *
vars_or(PyObject *left, PyObject *right)
{
    if (Py_IS_TYPE(left, &VarsType) && (left = vars_dict((Vars *)left)) == NULL) {
        return NULL;
    }
    if (Py_IS_TYPE(right, &VarsType) && (right = vars_dict((Vars *)right)) == NULL) {
        return NULL;
    }
    return PyNumber_Or(left, right);
}

static PyNumberMethods vars_as_number = {
    .nb_or = vars_or,
};

static PyMappingMethods vars_as_mapping = {
    .mp_length = (lenfunc)vars_length,
    .mp_subscript = (binaryfunc)vars_subscript,
};

static PySequenceMethods vars_as_sequence = {
    .sq_contains = (objobjproc)vars_contains,
};

static PyTypeObject VarsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "bgpool.Vars",
    .tp_basicsize = sizeof(Vars),
    .tp_dealloc = (destructor)vars_dealloc,
    .tp_repr = (reprfunc)vars_repr,
    .tp_as_number = &vars_as_number,
    .tp_as_sequence = &vars_as_sequence,
    .tp_as_mapping = &vars_as_mapping,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_MAPPING,
    .tp_doc = "A published vars mapping: read-only, its values built on first read.",
    .tp_richcompare = (richcmpfunc)vars_richcompare,
    .tp_iter = (getiterfunc)vars_iter,
    .tp_methods = vars_methods,
};

PyDoc_STRVAR(decode_doc,
"decode(data: bytes) -> Vars\n\n"
"The deeply read-only value of a snapshot's bytes: mappings are Vars (built\n"
"on first read), sequences tuples. Bytes that are not a snapshot raise\n"
"ValueError, whichever part of them is wrong.");

static PyObject *
codec_decode(PyObject *Py_UNUSED(module), PyObject *data)
{
    PyObject *bytes = PyBytes_CheckExact(data) ? Py_NewRef(data) : PyBytes_FromObject(data);
    if (bytes == NULL) {
        return NULL;
    }
    const unsigned char *base = (const unsigned char *)PyBytes_AS_STRING(bytes);
    Walk w = {
        .c = {.p = base, .end = base + PyBytes_GET_SIZE(bytes)},
        .base = base,
    };
    int rc = -1;
    if (w.c.p >= w.c.end || *w.c.p++ != FORMAT) {
        malformed("unknown format");
    }
    else if (w.c.p >= w.c.end || *w.c.p != TAG_MAP) {
        malformed("not a mapping");
    }
    else if ((rc = walk_value(&w, 0)) == 0 && w.c.p != w.c.end) {
        rc = refused("trailing bytes");
    }
    PyMem_Free(w.numbered.entries);
    Document *doc = rc == 0 ? PyObject_New(Document, &DocumentType) : NULL;
    if (doc == NULL) {
        PyMem_Free(w.maps);
        PyMem_Free(w.keys);
        Py_DECREF(bytes);
        return NULL;
    }
    doc->data = bytes;
    doc->maps = w.maps;
    doc->keys = w.keys;
    doc->nkeys = w.nkeys;
    PyObject *top = new_vars(doc, TOP_MAP_AT, 0, 0);
    Py_DECREF(doc);
    return top;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef codec_methods[] = {
    {.ml_name = "encode", .ml_meth = codec_encode, .ml_flags = METH_O, .ml_doc = encode_doc},
    {.ml_name = "decode", .ml_meth = codec_decode, .ml_flags = METH_O, .ml_doc = decode_doc},
    {0}, /* the end */
};

static int
codec_exec(PyObject *module)
{
    static const char *names[NAMES] = {"keys", "values", "items", "__reversed__"};
    for (int i = 0; i < NAMES; i++) {
        if (method_names[i] == NULL &&
            (method_names[i] = PyUnicode_InternFromString(names[i])) == NULL) {
            return -1;
        }
    }
    if (PyType_Ready(&DocumentType) < 0 || PyType_Ready(&VarsType) < 0) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "Vars", (PyObject *)&VarsType) < 0) {
        return -1;
    }
    return PyModule_AddIntConstant(module, "MAX_DEPTH", MAX_DEPTH);
}

static PyModuleDef_Slot codec_slots[] = {
    {.slot = Py_mod_exec, .value = codec_exec},
    {0}, /* the end */
};

static struct PyModuleDef codec_module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "bgpool.shm._codec",
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
