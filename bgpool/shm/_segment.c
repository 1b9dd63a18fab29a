/* bgpool.shm._segment: the seqlock of both shared-memory segments, and the
reads and writes that go through it.

Two kinds of segment share it. The readiness table (bgpool/shm/table.py) has a
counter at the start of each slot and one writer, the supervisor. A vars
segment (bgpool/shm/varstore.py describes the design; its layout is below, and
this module owns it) has one counter for its header, and the workers of one
name as writers, serialised by flock.

Why C: the order of a seqlock's stores and loads must be stated with barriers;
Python states none, and on a weakly ordered CPU (arm64) a reader could see a
slot's new counter with its old fields. And speed: a worker that publishes now
and then runs its publish cold, right after a sleep. The same dozen Python
statements (a lock, header reads, a copy, the flip) then took 10 to 16 us
instead of 4, and a reader's copy of a new snapshot took as long again. Here
each is one call.

A segment shorter than its mapping. Another process of the same user can
truncate a segment; touching a mapped page past the file's new end raises
SIGBUS, which kills the reader. So every read here first asks the file's
current size (mmap.size(), an fstat of the descriptor an mmap object keeps)
and refuses a file shorter than the mapping with ValueError. A truncation
that lands in the microseconds between that check and the copy still raises
SIGBUS: only a SIGBUS handler could turn that into an error, and one would be
process-wide and race the application's own (faulthandler's, for one). The
hot paths of ensure() (name_ready, slot_generation) make no such check: see
bgpool/shm/table.py.
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the segments' fields are little-endian: byte-swap them here first"
#endif

/* ---------------------------------------------------------------- seqlock */

/* A counter in front of the data it guards (8 bytes, 8-aligned): even while
   the data is stable, odd while a writer changes it. Writers are serialised
   by their caller.

   writer: counter = c + 1; fence; write the data; counter = c + 2 (release)
   reader: c = counter (acquire), again while it is odd; copy the data;
           fence (acquire); if the counter is not c any more, the copy may be
           torn: start again.

   A reader never waits forever: a writer that died or froze between its two
   stores leaves the counter odd. It retries SPIN_TRIES times at once (the
   usual race, with one write, lasts well under a microsecond), then yields
   the CPU between tries (a writer on this CPU can then finish), and gives up
   after `patience` seconds. */

#define STUCK_SECONDS 0.5 /* the patience of the readers bgpool makes */
#define SPIN_TRIES 64

static double
monotonic(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* Begin a write: make the counter odd. The value to pass to seq_write_end(). */
static uint64_t
seq_write_begin(uint64_t *counter)
{
    uint64_t c = __atomic_load_n(counter, __ATOMIC_RELAXED);
    c += c & 1; /* a writer died mid-write: go on from the next even value */
    __atomic_store_n(counter, c + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* odd before the data changes */
    return c;
}

static void
seq_write_end(uint64_t *counter, uint64_t begun)
{
    __atomic_store_n(counter, begun + 2, __ATOMIC_RELEASE); /* the data first */
}

typedef struct {
    double patience; /* seconds */
    double since;    /* when the waiting began (0: not yet) */
    int tries;
} SeqReader;

static SeqReader
seq_reader(double patience)
{
    return (SeqReader){.patience = patience};
}

/* Wait for an even counter and return it in `begun`: 0, or -1 when the
   patience ran out (no exception set: the caller says what is stuck). */
static int
seq_read_begin(SeqReader *r, const uint64_t *counter, uint64_t *begun)
{
    for (; r->tries < SPIN_TRIES; r->tries++) {
        uint64_t c = __atomic_load_n(counter, __ATOMIC_ACQUIRE);
        if (!(c & 1)) {
            *begun = c;
            return 0;
        }
    }
    /* Not the usual race with one write: wait, but not forever, and let the
       process's other threads run meanwhile (the caller holds the buffer, so
       nobody can unmap it). */
    int stuck = 0;
    uint64_t c = 1;
    Py_BEGIN_ALLOW_THREADS
    for (; (c & 1) && !stuck; r->tries++) {
        double now = monotonic();
        if (r->since == 0.0) {
            r->since = now;
        }
        stuck = now - r->since > r->patience;
        sched_yield();
        c = __atomic_load_n(counter, __ATOMIC_ACQUIRE);
    }
    Py_END_ALLOW_THREADS
    *begun = c;
    return (c & 1) ? -1 : 0;
}

/* Whether what was copied since seq_read_begin() is consistent; if not, the
   caller starts again (and that counts as a try). */
static int
seq_read_valid(SeqReader *r, const uint64_t *counter, uint64_t begun)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the copy before the check */
    if (__atomic_load_n(counter, __ATOMIC_RELAXED) == begun) {
        return 1;
    }
    r->tries++;
    return 0;
}

/* ----------------------------------------------------------- the plumbing */

static PyObject *size_name; /* "size", interned */

/* The current size of the file behind `mapping`, an mmap.mmap of a file;
   -1 with an exception. */
static Py_ssize_t
file_size(PyObject *mapping)
{
    PyObject *size = PyObject_CallMethodNoArgs(mapping, size_name);
    if (size == NULL) {
        return -1;
    }
    Py_ssize_t n = PyLong_AsSsize_t(size);
    Py_DECREF(size);
    return n;
}

/* Whether the file behind `mapping` still covers all `view->len` mapped
   bytes: 1, 0, or -1 with an exception. */
static int
still_covered(PyObject *mapping, const Py_buffer *view, Py_ssize_t *size)
{
    *size = file_size(mapping);
    return *size < 0 ? -1 : *size >= view->len;
}

static int
refuse_shrunk(const char *what, const Py_buffer *view, Py_ssize_t size)
{
    PyErr_Format(PyExc_ValueError,
                 "%s is %zd bytes, shorter than the %zd mapped: another process truncated it",
                 what, size, view->len);
    return -1;
}

/* The counter at `offset` of `view`, if a counter and `after` more bytes fit
   there, 8-aligned; else NULL and ValueError. */
static uint64_t *
counter_at(const Py_buffer *view, Py_ssize_t offset, Py_ssize_t after)
{
    if (offset < 0 || after < 0 || offset > view->len - (Py_ssize_t)sizeof(uint64_t) - after) {
        PyErr_Format(PyExc_ValueError, "offset %zd (+%zd bytes) is outside the segment", offset,
                     after);
        return NULL;
    }
    unsigned char *p = (unsigned char *)view->buf + offset;
    if ((uintptr_t)p % sizeof(uint64_t) != 0) {
        PyErr_Format(PyExc_ValueError, "the counter at offset %zd is not 8-aligned", offset);
        return NULL;
    }
    return (uint64_t *)p;
}

static int
check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t expected)
{
    if (nargs == expected) {
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, expected, nargs);
    return -1;
}

/* flock(), the GIL released while it waits, retried after a signal unless a
   handler raised. */
static int
lock(int fd, int operation)
{
    for (;;) {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = flock(fd, operation);
        Py_END_ALLOW_THREADS
        if (rc == 0) {
            return 0;
        }
        if (errno != EINTR) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (PyErr_CheckSignals() < 0) {
            return -1;
        }
    }
}

/* ----------------------------------------------------------- vars segment */

/* The layout, all fields little-endian (what x86-64 and arm64 use natively),
   the unaligned ones read and written with memcpy:

    offset  0  u64  seq       the seqlock's counter, for the header
    offset  8  u64  gen       0 until the first publication
    offset 16  u8   active    the area readers use: 0 or 1
    offset 20  u32  len0      the lengths of areas 0 and 1
    offset 24  u32  len1
    offset 28  f64  time      when the active area was published (Unix time)
    offset 64               area 0, then area 1, `capacity` bytes each
*/
enum {
    VARS_SEQ = 0,
    VARS_GEN = 8,
    VARS_ACTIVE = 16,
    VARS_LENGTHS = 20,
    VARS_TIME = 28,
    HEADER_SIZE = 64,
};

typedef struct {
    uint64_t gen;
    unsigned char active;
    uint32_t lengths[2];
    double time;
} Meta;

static void
read_meta(const unsigned char *segment, Meta *m)
{
    memcpy(&m->gen, segment + VARS_GEN, sizeof(m->gen));
    m->active = segment[VARS_ACTIVE];
    memcpy(m->lengths, segment + VARS_LENGTHS, sizeof(m->lengths));
    memcpy(&m->time, segment + VARS_TIME, sizeof(m->time));
}

static void
write_meta(unsigned char *segment, const Meta *m)
{
    memcpy(segment + VARS_GEN, &m->gen, sizeof(m->gen));
    segment[VARS_ACTIVE] = m->active;
    memcpy(segment + VARS_LENGTHS, m->lengths, sizeof(m->lengths));
    memcpy(segment + VARS_TIME, &m->time, sizeof(m->time));
}

/* The segment's area `which` of `capacity` bytes, if `length` fits in it. */
static unsigned char *
area(const Py_buffer *segment, Py_ssize_t capacity, int which, Py_ssize_t length)
{
    if (which > 1 || length > capacity || HEADER_SIZE + (which + 1) * capacity > segment->len) {
        return NULL;
    }
    return (unsigned char *)segment->buf + HEADER_SIZE + which * capacity;
}

/* Grow the file `fd` back to the `mapped` bytes of its mapping if another
   process truncated it, so that writing through the mapping cannot raise
   SIGBUS. The bytes it lost read as zeros: the publish then rewrites the
   header, which makes the segment whole again. */
static int
restore_size(int fd, Py_ssize_t mapped)
{
    struct stat st;
    if (fstat(fd, &st) < 0 || (st.st_size < mapped && ftruncate(fd, mapped) < 0)) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* publish() once the lock is held: 1 if it published, 0 if `data` is the
   current snapshot already, -1 with an exception. */
static int
publish_locked(const Py_buffer *segment, int fd, Py_ssize_t capacity, const Py_buffer *data)
{
    if (restore_size(fd, segment->len) < 0) {
        return -1;
    }
    unsigned char *base = segment->buf;
    Meta m;
    read_meta(base, &m); /* no seqlock needed: only writers change it, and this one has the lock */
    int active = m.active & 1;
    const unsigned char *current = area(segment, capacity, active, m.lengths[active]);
    if (m.gen && current != NULL && m.lengths[active] == data->len &&
        memcmp(current, data->buf, (size_t)data->len) == 0) {
        return 0;
    }
    /* The area readers do not use, then the header that points them to it. */
    int target = m.gen ? 1 - active : 0;
    memcpy(area(segment, capacity, target, data->len), data->buf, (size_t)data->len);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    m.gen += 1;
    m.active = (unsigned char)target;
    m.lengths[target] = (uint32_t)data->len;
    m.time = (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
    uint64_t *counter = (uint64_t *)(base + VARS_SEQ);
    uint64_t begun = seq_write_begin(counter);
    write_meta(base, &m);
    seq_write_end(counter, begun);
    return 1;
}

PyDoc_STRVAR(publish_doc,
"publish(segment: mmap, fd: int, capacity: int, data: bytes) -> bool\n\n"
"Make `data` the current snapshot of the mapped segment `segment` (`fd` is\n"
"its file, locked with flock while this writes, and grown back to the\n"
"mapping's size if another process truncated it). False if it equals the\n"
"current one: nothing changes.");

static PyObject *
segment_publish(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("publish", nargs, 4) < 0) {
        return NULL;
    }
    long fd = PyLong_AsLong(args[1]);
    Py_ssize_t capacity = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (fd < 0 || fd > INT32_MAX) {
        return PyErr_Format(PyExc_ValueError, "bad file descriptor %ld", fd);
    }
    Py_buffer segment, data;
    if (PyObject_GetBuffer(args[0], &segment, PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[3], &data, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&segment);
        return NULL;
    }
    int published = -1;
    if (counter_at(&segment, VARS_SEQ, 0) == NULL) {
        /* not 8-aligned, or not even a counter: ValueError set */
    }
    else if (area(&segment, capacity, 1, data.len) == NULL || capacity > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "the snapshot does not fit the segment");
    }
    else if (lock((int)fd, LOCK_EX) == 0) {
        published = publish_locked(&segment, (int)fd, capacity, &data);
        if (lock((int)fd, LOCK_UN) < 0) {
            published = -1;
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&segment);
    return published < 0 ? NULL : PyBool_FromLong(published);
}

PyDoc_STRVAR(read_doc,
"read(segment: mmap, capacity: int, patience: float) -> tuple[int, float, bytes] | None\n\n"
"The current (generation, publish time, bytes) of the mapped segment, or None\n"
"before the first publication. Takes no lock: it retries while a publish\n"
"flips the header. TimeoutError if that lasts `patience` seconds (the writer\n"
"died mid-flip); ValueError if the header points outside the segment, or if\n"
"the file is now shorter than the mapping (another process truncated it).");

static PyObject *
segment_read(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("read", nargs, 3) < 0) {
        return NULL;
    }
    Py_ssize_t capacity = PyLong_AsSsize_t(args[1]);
    double patience = PyFloat_AsDouble(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer segment;
    if (PyObject_GetBuffer(args[0], &segment, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    const unsigned char *base = segment.buf;
    Py_ssize_t size;
    int covered = still_covered(args[0], &segment, &size);
    if (segment.len < HEADER_SIZE) {
        PyErr_SetString(PyExc_ValueError, "the vars segment is smaller than its header");
        goto done;
    }
    if (covered <= 0) {
        if (covered == 0) {
            refuse_shrunk("the vars segment", &segment, size);
        }
        goto done;
    }
    const uint64_t *counter = counter_at(&segment, VARS_SEQ, 0);
    if (counter == NULL) {
        goto done;
    }
    SeqReader r = seq_reader(patience);
    for (;;) {
        uint64_t begun;
        if (seq_read_begin(&r, counter, &begun) < 0) {
            PyErr_SetString(PyExc_TimeoutError, "the vars segment stays mid-update");
            goto done;
        }
        Meta m;
        read_meta(base, &m);
        Py_ssize_t length = m.lengths[m.active & 1];
        const unsigned char *data = area(&segment, capacity, m.active, length);
        PyObject *bytes = NULL;
        if (data != NULL && (bytes = PyBytes_FromStringAndSize((const char *)data, length)) == NULL) {
            goto done;
        }
        if (!seq_read_valid(&r, counter, begun)) {
            Py_XDECREF(bytes);
            continue;
        }
        if (bytes == NULL) {
            PyErr_SetString(PyExc_ValueError, "the vars segment's header points outside it");
        }
        else if (m.gen == 0) {
            Py_DECREF(bytes);
            result = Py_NewRef(Py_None);
        }
        else {
            result = Py_BuildValue("(KdN)", (unsigned long long)m.gen, m.time, bytes);
        }
        goto done;
    }
done:
    PyBuffer_Release(&segment);
    return result;
}

PyDoc_STRVAR(generation_doc,
"generation(segment: mmap) -> int\n\n"
"The mapped segment's generation: one load, no lock, no retry (what a reader\n"
"compares with the one it holds, to learn that it should read()). 0 if the\n"
"file is shorter than the mapping: read() then says why.");

static PyObject *
segment_generation(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer segment;
    if (PyObject_GetBuffer(arg, &segment, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_ssize_t size;
    int covered = still_covered(arg, &segment, &size);
    uint64_t gen = 0;
    if (covered > 0 && segment.len >= HEADER_SIZE) {
        const unsigned char *base = segment.buf;
        gen = __atomic_load_n((const uint64_t *)(base + VARS_GEN), __ATOMIC_RELAXED);
    }
    PyBuffer_Release(&segment);
    return covered < 0 ? NULL : PyLong_FromUnsignedLongLong(gen);
}

/* ---------------------------------------------------------- table slots */

/* A slot of the readiness table as this module sees it: the counter, then
   the bytes table.py packs, whose first two fields ensure()'s hot path reads
   without the seqlock. */
enum {
    SLOT_SEQ = 0,    /* u64, the seqlock's counter */
    SLOT_BODY = 8,   /* table.py's bytes start here: */
    SLOT_GEN = 8,    /*   u32, the slot's identity generation */
    SLOT_READY = 12, /*   u8, the name-level ready flag (1: ready) */
};

/* The same two fields' offsets in the body table.py packs. */
enum {
    BODY_GEN = SLOT_GEN - SLOT_BODY,
    BODY_READY = SLOT_READY - SLOT_BODY,
    BODY_REST = BODY_READY + 1, /* what follows them */
};

PyDoc_STRVAR(write_slot_doc,
"write_slot(table, offset: int, body: bytes) -> None\n\n"
"Publish `body` as the slot at `offset` of the writable buffer `table`, under\n"
"the slot's seqlock (one writer at a time: the caller's).");

static PyObject *
segment_write_slot(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("write_slot", nargs, 3) < 0) {
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer table, body;
    if (PyObject_GetBuffer(args[0], &table, PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &body, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&table);
        return NULL;
    }
    PyObject *result = NULL;
    uint64_t *counter = counter_at(&table, offset, body.len);
    if (counter != NULL && body.len < BODY_REST) {
        PyErr_SetString(PyExc_ValueError, "a slot's body starts with its generation and flag");
    }
    else if (counter != NULL) {
        unsigned char *slot = (unsigned char *)counter;
        const unsigned char *b = body.buf;
        uint32_t gen;
        memcpy(&gen, b + BODY_GEN, sizeof(gen));
        uint64_t begun = seq_write_begin(counter);
        memcpy(slot + SLOT_BODY + BODY_REST, b + BODY_REST, (size_t)(body.len - BODY_REST));
        /* The two fields the hot path reads without the seqlock are stored
           whole, the flag last: a reader that sees the flag set then sees
           the generation written with it, or a later one. */
        __atomic_store_n((uint32_t *)(slot + SLOT_GEN), gen, __ATOMIC_RELAXED);
        __atomic_store_n(slot + SLOT_READY, b[BODY_READY], __ATOMIC_RELEASE);
        seq_write_end(counter, begun);
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&body);
    PyBuffer_Release(&table);
    return result;
}

/* Copy the `length` bytes after the counter at `counter` into `out`,
   consistently: 0, or -1 if the counter stayed odd for `patience` seconds. */
static int
read_under_counter(const uint64_t *counter, Py_ssize_t length, double patience, char *out)
{
    const unsigned char *data = (const unsigned char *)counter + sizeof(uint64_t);
    SeqReader r = seq_reader(patience);
    for (;;) {
        uint64_t begun;
        if (seq_read_begin(&r, counter, &begun) < 0) {
            return -1;
        }
        memcpy(out, data, (size_t)length);
        if (seq_read_valid(&r, counter, begun)) {
            return 0;
        }
    }
}

PyDoc_STRVAR(read_slots_doc,
"read_slots(table: mmap, offset: int, count: int, stride: int, length: int,\n"
"           patience: float) -> list[bytes]\n\n"
"The `length` bytes after the counter of each of `count` slots, the first at\n"
"`offset`, the next `stride` bytes further, and so on; each read consistently\n"
"(retried while the writer is in the slot). TimeoutError(message, i) if the\n"
"counter of the i-th of them stays odd for `patience` seconds (the writer\n"
"stopped between two stores); ValueError if the file is now shorter than\n"
"the mapping (another process truncated it).");

static PyObject *
segment_read_slots(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("read_slots", nargs, 6) < 0) {
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    Py_ssize_t count = PyLong_AsSsize_t(args[2]);
    Py_ssize_t stride = PyLong_AsSsize_t(args[3]);
    Py_ssize_t length = PyLong_AsSsize_t(args[4]);
    double patience = PyFloat_AsDouble(args[5]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer table;
    if (PyObject_GetBuffer(args[0], &table, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t size;
    int covered = -1;
    if (count < 0 || length < 0 ||
        (count > 1 && (stride < (Py_ssize_t)sizeof(uint64_t) + length ||
                       count - 1 > table.len / stride))) {
        PyErr_Format(PyExc_ValueError, "%zd slots of %zd bytes every %zd do not fit", count,
                     length, stride);
    }
    else if ((covered = still_covered(args[0], &table, &size)) == 0) {
        refuse_shrunk("its file", &table, size);
    }
    else if (covered > 0 && (result = PyList_New(count)) != NULL) {
        for (Py_ssize_t i = 0; i < count; i++) {
            PyObject *body = PyBytes_FromStringAndSize(NULL, length);
            if (body == NULL) {
                Py_CLEAR(result);
                break;
            }
            PyList_SET_ITEM(result, i, body);
            const uint64_t *counter = counter_at(&table, offset + i * stride, length);
            if (counter == NULL) {
                Py_CLEAR(result);
                break;
            }
            if (read_under_counter(counter, length, patience, PyBytes_AS_STRING(body)) < 0) {
                PyObject *exc_args = Py_BuildValue("(sn)", "the slot stays mid-update", i);
                if (exc_args != NULL) {
                    PyErr_SetObject(PyExc_TimeoutError, exc_args);
                    Py_DECREF(exc_args);
                }
                Py_CLEAR(result);
                break;
            }
        }
    }
    PyBuffer_Release(&table);
    return result;
}

/* The slot at `offset` of `table` for the hot path, whose loads end at
   SLOT_READY: NULL with IndexError if there is none. */
static const unsigned char *
hot_slot(const Py_buffer *table, Py_ssize_t offset)
{
    if (offset < 0 || offset > table->len - (SLOT_READY + 1) ||
        ((uintptr_t)table->buf + (size_t)offset) % sizeof(uint64_t) != 0) {
        PyErr_Format(PyExc_IndexError, "no slot at offset %zd", offset);
        return NULL;
    }
    return (const unsigned char *)table->buf + offset;
}

PyDoc_STRVAR(name_ready_doc,
"name_ready(table, offset: int, gen: int) -> bool\n\n"
"Whether the slot at `offset` says its name is ready and still holds\n"
"generation `gen`: two loads, the flag first (see TableReader.name_ready).");

static PyObject *
segment_name_ready(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("name_ready", nargs, 3) < 0) {
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    long long gen = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer table;
    if (PyObject_GetBuffer(args[0], &table, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *slot = hot_slot(&table, offset);
    int ready = 0;
    if (slot != NULL) {
        ready = __atomic_load_n(slot + SLOT_READY, __ATOMIC_ACQUIRE) == 1 &&
                __atomic_load_n((const uint32_t *)(slot + SLOT_GEN), __ATOMIC_RELAXED) == gen;
    }
    PyBuffer_Release(&table);
    return slot == NULL ? NULL : PyBool_FromLong(ready);
}

PyDoc_STRVAR(slot_generation_doc,
"slot_generation(table, offset: int) -> int\n\n"
"The identity generation of the slot at `offset`: one load.");

static PyObject *
segment_slot_generation(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("slot_generation", nargs, 2) < 0) {
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer table;
    if (PyObject_GetBuffer(args[0], &table, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *slot = hot_slot(&table, offset);
    uint32_t gen = 0;
    if (slot != NULL) {
        gen = __atomic_load_n((const uint32_t *)(slot + SLOT_GEN), __ATOMIC_RELAXED);
    }
    PyBuffer_Release(&table);
    return slot == NULL ? NULL : PyLong_FromUnsignedLong(gen);
}

/* ----------------------------------------------------------------- module */

#define FASTCALL(f) (PyCFunction)(void (*)(void))(f)

static PyMethodDef segment_methods[] = {
    {.ml_name = "publish", .ml_meth = FASTCALL(segment_publish), .ml_flags = METH_FASTCALL,
     .ml_doc = publish_doc},
    {.ml_name = "read", .ml_meth = FASTCALL(segment_read), .ml_flags = METH_FASTCALL,
     .ml_doc = read_doc},
    {.ml_name = "generation", .ml_meth = segment_generation, .ml_flags = METH_O,
     .ml_doc = generation_doc},
    {.ml_name = "write_slot", .ml_meth = FASTCALL(segment_write_slot),
     .ml_flags = METH_FASTCALL, .ml_doc = write_slot_doc},
    {.ml_name = "read_slots", .ml_meth = FASTCALL(segment_read_slots),
     .ml_flags = METH_FASTCALL, .ml_doc = read_slots_doc},
    {.ml_name = "name_ready", .ml_meth = FASTCALL(segment_name_ready),
     .ml_flags = METH_FASTCALL, .ml_doc = name_ready_doc},
    {.ml_name = "slot_generation", .ml_meth = FASTCALL(segment_slot_generation),
     .ml_flags = METH_FASTCALL, .ml_doc = slot_generation_doc},
    {0}, /* the end */
};

static int
segment_exec(PyObject *module)
{
    if (size_name == NULL && (size_name = PyUnicode_InternFromString("size")) == NULL) {
        return -1;
    }
    PyObject *stuck = PyFloat_FromDouble(STUCK_SECONDS);
    int rc = stuck == NULL ? -1 : PyModule_AddObjectRef(module, "STUCK_SECONDS", stuck);
    Py_XDECREF(stuck);
    if (rc < 0 || PyModule_AddIntConstant(module, "HEADER_SIZE", HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "SLOT_BODY", SLOT_BODY) < 0 ||
        PyModule_AddIntConstant(module, "SLOT_GEN", SLOT_GEN) < 0 ||
        PyModule_AddIntConstant(module, "SLOT_READY", SLOT_READY) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot segment_slots[] = {
    {.slot = Py_mod_exec, .value = segment_exec},
    {0}, /* the end */
};

static struct PyModuleDef segment_module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "bgpool.shm._segment",
    .m_doc = "The seqlock of the readiness table and of the vars segments, both sides.",
    .m_size = 0,
    .m_methods = segment_methods,
    .m_slots = segment_slots,
};

PyMODINIT_FUNC
PyInit__segment(void)
{
    return PyModuleDef_Init(&segment_module);
}
