/* bgpool._segment: publishing into a vars segment and reading it back, in C.

Why C: a worker that publishes now and then runs its publish cold, right after
a sleep. The same dozen Python statements (a lock, header reads, a copy, the
flip) then took 10 to 16 us instead of 4, and a reader's copy of a new snapshot
took as long again. Here each is one call, and the order of the seqlock's
stores is stated with barriers instead of being left to the interpreter.

The layout (bgpool/varstore.py describes the design):

    offset  0  u64  seq       odd while the header changes (a seqlock)
    offset  8  u64  gen       0 until the first publication
    offset 16  u8   active    the area readers use: 0 or 1
    offset 20  u32  len0      the lengths of areas 0 and 1
    offset 24  u32  len1
    offset 28  f64  time      when the active area was published (Unix time)
    offset 64               area 0, then area 1, `capacity` bytes each

All fields are little-endian (what x86-64 and arm64 use natively), unaligned
ones read and written with memcpy.
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the vars segment's header is little-endian: byte-swap its fields here first"
#endif

#define HEADER_SIZE 64

typedef struct {
    uint64_t gen;
    unsigned char active;
    uint32_t lengths[2];
    double time;
} Meta;

static inline uint64_t *
seq_of(unsigned char *segment)
{
    return (uint64_t *)segment; /* mmap'd: page-aligned */
}

static void
read_meta(const unsigned char *segment, Meta *m)
{
    memcpy(&m->gen, segment + 8, 8);
    m->active = segment[16];
    memcpy(&m->lengths[0], segment + 20, 4);
    memcpy(&m->lengths[1], segment + 24, 4);
    memcpy(&m->time, segment + 28, 8);
}

static void
write_meta(unsigned char *segment, const Meta *m)
{
    memcpy(segment + 8, &m->gen, 8);
    segment[16] = m->active;
    memcpy(segment + 20, &m->lengths[0], 4);
    memcpy(segment + 24, &m->lengths[1], 4);
    memcpy(segment + 28, &m->time, 8);
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

/* The segment's area `which` of `capacity` bytes, if `length` fits in it. */
static unsigned char *
area(Py_buffer *segment, Py_ssize_t capacity, int which, Py_ssize_t length)
{
    if (which > 1 || length > capacity ||
        HEADER_SIZE + (which + 1) * capacity > segment->len) {
        return NULL;
    }
    return (unsigned char *)segment->buf + HEADER_SIZE + which * capacity;
}

PyDoc_STRVAR(publish_doc,
"publish(segment, fd: int, capacity: int, data: bytes) -> bool\n\n"
"Make `data` the current snapshot of the mapped segment `segment` (`fd` is\n"
"its file, locked with flock while this writes). False if it equals the\n"
"current one: nothing changes.");

static PyObject *
segment_publish(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        return PyErr_Format(PyExc_TypeError, "publish() takes 4 arguments (%zd given)", nargs);
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
    PyObject *result = NULL;
    if (area(&segment, capacity, 1, data.len) == NULL || capacity > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "the snapshot does not fit the segment");
    }
    else if (lock((int)fd, LOCK_EX) == 0) {
        unsigned char *base = segment.buf;
        uint64_t seq = __atomic_load_n(seq_of(base), __ATOMIC_RELAXED);
        Meta m;
        read_meta(base, &m);
        int active = m.active & 1;
        unsigned char *current = area(&segment, capacity, active, m.lengths[active]);
        if (m.gen && current != NULL && m.lengths[active] == data.len &&
            memcmp(current, data.buf, (size_t)data.len) == 0) {
            result = Py_NewRef(Py_False);
        }
        else {
            int target = m.gen ? 1 - active : 0;
            memcpy(area(&segment, capacity, target, data.len), data.buf, (size_t)data.len);
            struct timespec now;
            clock_gettime(CLOCK_REALTIME, &now);
            m.gen += 1;
            m.active = (unsigned char)target;
            m.lengths[target] = (uint32_t)data.len;
            m.time = (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
            seq += seq & 1; /* a writer died mid-flip: go on from the next even value */
            __atomic_store_n(seq_of(base), seq + 1, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_SEQ_CST); /* odd before the new header */
            write_meta(base, &m);
            __atomic_store_n(seq_of(base), seq + 2, __ATOMIC_RELEASE); /* data and header first */
            result = Py_NewRef(Py_True);
        }
        if (lock((int)fd, LOCK_UN) < 0) {
            Py_CLEAR(result);
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&segment);
    return result;
}

static double
monotonic(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

PyDoc_STRVAR(read_doc,
"read(segment, capacity: int, patience: float) -> tuple[int, float, bytes] | None\n\n"
"The current (generation, publish time, bytes) of the mapped segment, or None\n"
"before the first publication. Takes no lock: it retries while a publish\n"
"flips the header (yielding the CPU after a few tries, so a writer on this\n"
"CPU can finish). TimeoutError if that lasts `patience` seconds (the writer\n"
"died mid-flip), ValueError if the header points outside the segment.");

static PyObject *
segment_read(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        return PyErr_Format(PyExc_TypeError, "read() takes 3 arguments (%zd given)", nargs);
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
    unsigned char *base = segment.buf;
    if (segment.len < HEADER_SIZE) {
        PyErr_SetString(PyExc_ValueError, "the vars segment is smaller than its header");
        goto done;
    }
    double since = 0.0;
    for (int attempt = 0;; attempt++) {
        if (attempt >= 64) { /* not the usual race with one flip: wait, but not forever */
            since = since ? since : monotonic();
            if (monotonic() - since > patience) {
                PyErr_SetString(PyExc_TimeoutError, "the vars segment stays mid-update");
                goto done;
            }
            sched_yield();
        }
        uint64_t seq = __atomic_load_n(seq_of(base), __ATOMIC_ACQUIRE);
        if (seq & 1) {
            continue;
        }
        Meta m;
        read_meta(base, &m);
        unsigned char *data = area(&segment, capacity, m.active, m.lengths[m.active & 1]);
        PyObject *bytes = NULL;
        if (data != NULL) {
            bytes = PyBytes_FromStringAndSize((const char *)data, m.lengths[m.active]);
            if (bytes == NULL) {
                goto done;
            }
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the copy before the check */
        if (__atomic_load_n(seq_of(base), __ATOMIC_RELAXED) != seq) {
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
"generation(segment) -> int\n\n"
"The mapped segment's generation: one load, no lock, no retry (what a reader\n"
"compares with the one it holds, to learn that it should read()).");

static PyObject *
segment_generation(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer segment;
    if (PyObject_GetBuffer(arg, &segment, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    uint64_t gen = 0;
    if (segment.len >= HEADER_SIZE) {
        gen = __atomic_load_n((uint64_t *)((unsigned char *)segment.buf + 8), __ATOMIC_RELAXED);
    }
    PyBuffer_Release(&segment);
    return PyLong_FromUnsignedLongLong(gen);
}

static PyMethodDef segment_methods[] = {
    {"generation", segment_generation, METH_O, generation_doc},
    {"publish", (PyCFunction)(void (*)(void))segment_publish, METH_FASTCALL, publish_doc},
    {"read", (PyCFunction)(void (*)(void))segment_read, METH_FASTCALL, read_doc},
    {NULL, NULL, 0, NULL},
};

static int
segment_exec(PyObject *module)
{
    return PyModule_AddIntConstant(module, "HEADER_SIZE", HEADER_SIZE);
}

static PyModuleDef_Slot segment_slots[] = {
    {Py_mod_exec, segment_exec},
    {0, NULL},
};

static struct PyModuleDef segment_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "bgpool._segment",
    .m_doc = "Publishing into a vars segment and reading it back (the seqlock's two sides).",
    .m_size = 0,
    .m_methods = segment_methods,
    .m_slots = segment_slots,
};

PyMODINIT_FUNC
PyInit__segment(void)
{
    return PyModuleDef_Init(&segment_module);
}
