/* bgpool.shm._segment: every access bgpool makes to its shared memory, the
seqlock of both kinds of segment, and the guard that turns a read or write of
a truncated segment into an exception instead of the process's death.

Two kinds of segment share the seqlock. The readiness table
(bgpool/shm/table.py) has a counter at the start of each slot and one writer,
the supervisor. A vars segment (bgpool/shm/varstore.py describes the design;
its layout is below, and this module owns it) has one counter for its header,
and the workers of one name as writers, serialised by flock.

Why C: the order of a seqlock's stores and loads must be stated with barriers;
Python states none, and on a weakly ordered CPU (arm64) a reader could see a
slot's new counter with its old fields. And speed: a worker that publishes now
and then runs its publish cold, right after a sleep. The same dozen Python
statements (a lock, header reads, a copy, the flip) then took 10 to 16 us
instead of 4, and a reader's copy of a new snapshot took as long again. Here
each is one call. And the guard, which only C can set.

The guard. Another process of the same user can truncate a segment; touching
a mapped page past the file's new end raises SIGBUS, which kills the process.
Databases and JVMs, which read mapped files, meet the same, and answer it as
this module does: a SIGBUS handler, installed once for the process when the
module is imported, and a per-thread guard that every access to a mapping
arms. An
access is a few loads or a copy between sigsetjmp() and disarming (guarded(),
below: nothing in it calls Python, allocates or releases the GIL; what waits
with the GIL released arms its own guard). If the access faults, the handler
finds this thread's guard armed, and the fault's address inside the mapping
it guards, and siglongjmp()s back: the access returns FAULTED, the caller
raises Truncated (a ValueError, which table.py and varstore.py reword), and
the process goes on. Arming costs a sigsetjmp without the signal mask (no
system call: the fault path restores the mask, which the handler leaves with
SIGBUS blocked), two stores to a thread-local and a call: 4 to 9 ns
measured, where the fstat each read used to make cost 0.4 to 0.5 us; and the
hot path of ensure() (name_ready, the table's status) is covered too, which
an fstat would have cost several times over. (table.py's writer goes further:
the supervisor repairs a table that a write of its finds truncated.)

Any other SIGBUS is not ours: a fault outside a guarded access (another
extension's mapping, or a guarded access's own buffer that is a mapping too),
or one sent by another process. The handler then puts back the action it
replaced and returns; a fault strikes again at once, under that action, and
a sent signal is raised again. So the process dies of it as it would have
without bgpool (the default action dumps core), or whatever handler came
before ours sees it; the guard is gone from then on (a process seldom
outlives a SIGBUS).

faulthandler (which pytest and `python -X faulthandler` enable) dumps the
Python traceback on SIGBUS, restores the action it replaced, and raises the
signal again (SA_NODEFER: it arrives at once, inside faulthandler's handler).
Observed, both ways round:
- faulthandler enabled before this module is imported: ours replaces it, and
  keeps it as the previous action. A guarded fault is recovered without a
  word. Any other SIGBUS goes back to faulthandler, which dumps and re-raises
  under the default action: the process dies with the traceback, as before.
- enabled after: faulthandler runs first. On a guarded fault it dumps the
  traceback ("Fatal Python error: Bus error"), puts our handler back and
  raises again; our handler sees the raise (SI_TKILL from this process)
  while the guard is armed and recovers all the same. The process goes on,
  but that dump was printed, and faulthandler's handler is gone for SIGBUS
  from then on (ours is back in its place; faulthandler still says it is
  enabled): a later SIGBUS outside a guard kills the process with no dump.
  Another SIGBUS before that is dumped by faulthandler, comes to us, is not
  ours, and kills the process under the default action. pytest's own process
  is in this case: tests/conftest.py imports bgpool before pytest enables
  faulthandler, so the tests take their faults in fresh interpreters.
What undoes the guard: faulthandler.disable(), if faulthandler was enabled
before this import (it puts back what it replaced: the default action, as
observed), and any later signal.signal(SIGBUS, ...) or sigaction(SIGBUS). A
truncated segment then kills its reader again, as it did before the guard.
The guard never installs itself again: ours in front of a handler that puts
ours back (faulthandler enabled after) would make a loop between the two.

SA_ONSTACK: the handler runs on the thread's alternate signal stack if it has
one (faulthandler gives the main thread one), which costs nothing, and is
what lets a handler run at all when a fault strikes near the end of a stack.
siglongjmp() off that stack is fine: the kernel decides whether a thread is
on it by its stack pointer. No SA_NODEFER: SIGBUS stays blocked while the
handler runs (the fault path unblocks it), so a second one cannot nest.
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the segments' fields are little-endian: byte-swap them here first"
#endif

/* ------------------------------------------------------------------ guard */

/* What an access returns besides its own results (which are >= 0). */
enum {
    STUCK = -1,   /* a seqlock's counter stayed odd (no exception set) */
    FAULTED = -2, /* the access touched a page past the end of its file */
};

typedef struct {
    sigjmp_buf env;
    const unsigned char *start, *end; /* the mapping the access touches */
    const unsigned char *address;     /* where it faulted (NULL: not known) */
    sigset_t mask;                    /* the mask the fault interrupted */
} Guard;

/* This thread's armed guard, or NULL. The initial-exec model makes it one
   load from the thread pointer, in the hot path and in the handler alike:
   the model a shared object gets by default calls __tls_get_addr(), which
   may allocate (not safe in a signal handler). It takes 8 bytes of the static
   TLS space that glibc keeps for modules loaded later. */
static __thread Guard *armed __attribute__((tls_model("initial-exec")));

static struct sigaction previous; /* SIGBUS's action before ours */
static int installed;

static void
on_sigbus(int signum, siginfo_t *info, void *context)
{
    Guard *guard = __atomic_load_n(&armed, __ATOMIC_RELAXED);
    if (guard != NULL) {
        const unsigned char *at = info->si_addr;
        /* A fault (si_code > 0: BUS_ADRERR and the like) inside the mapping
           the access guards; or the same raised again by a handler that ran
           before ours (faulthandler's: see the top of this file). */
        int fault = info->si_code > 0 && at >= guard->start && at < guard->end;
        int again = info->si_code == SI_TKILL && info->si_pid == getpid();
        if (fault || again) {
            __atomic_store_n(&armed, NULL, __ATOMIC_RELAXED);
            guard->address = fault ? at : NULL;
            guard->mask = ((const ucontext_t *)context)->uc_sigmask;
            siglongjmp(guard->env, 1);
        }
    }
    /* Not ours: as if we had never been here. */
    int saved = errno;
    sigaction(SIGBUS, &previous, NULL);
    if (info->si_code <= 0) { /* sent, not a fault: it would not strike again */
        raise(signum);        /* pending until we return (SIGBUS is blocked) */
    }
    errno = saved;
}

static int
install_guard(void)
{
    if (__atomic_exchange_n(&installed, 1, __ATOMIC_SEQ_CST)) {
        return 0;
    }
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &previous) < 0) {
        __atomic_store_n(&installed, 0, __ATOMIC_SEQ_CST);
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* Run `access(context)` with this thread's guard armed over the mapping
   `view`: what it returns, or FAULTED (and, in `*at` if not NULL, the offset
   in the mapping of the byte that faulted, -1 if not known). `access` must
   not call Python, allocate, take locks or release the GIL: a fault leaves
   it wherever it was. */
static int
guarded(const Py_buffer *view, int (*access)(void *), void *context, Py_ssize_t *at)
{
    Guard guard;
    if (sigsetjmp(guard.env, 0) != 0) {
        /* The handler disarmed the guard, and SIGBUS is still blocked:
           the mask as the fault found it, SIGBUS unblocked. */
        sigdelset(&guard.mask, SIGBUS);
        pthread_sigmask(SIG_SETMASK, &guard.mask, NULL);
        if (at != NULL) {
            *at = guard.address == NULL ? -1 : guard.address - guard.start;
        }
        return FAULTED;
    }
    guard.start = view->buf;
    guard.end = guard.start + view->len;
    __atomic_store_n(&armed, &guard, __ATOMIC_RELAXED);
    __atomic_signal_fence(__ATOMIC_SEQ_CST); /* armed before the first access */
    int result = access(context);
    __atomic_signal_fence(__ATOMIC_SEQ_CST); /* the last access before disarming */
    __atomic_store_n(&armed, NULL, __ATOMIC_RELAXED);
    return result;
}

static PyObject *Truncated; /* bgpool.shm._segment.Truncated, a ValueError */

/* Raise Truncated for a fault at offset `at` (-1: not known) of `view`. */
static void
truncated(const Py_buffer *view, Py_ssize_t at)
{
    if (at >= 0) {
        PyErr_Format(Truncated, "byte %zd of the %zd mapped lies past the end of its file", at,
                     view->len);
    }
    else {
        PyErr_Format(Truncated, "an access to its %zd mapped bytes went past the end of its file",
                     view->len);
    }
}

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
   after `patience` seconds.

   Every load and store below is of a mapping: each runs inside guarded(). */

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
    const Py_buffer *view; /* the mapping the counter is in */
    const uint64_t *counter;
    double patience; /* seconds */
    double since;    /* when the waiting began (0: not yet) */
    int tries;
    uint64_t begun; /* the even value the current try began with */
} SeqReader;

static SeqReader
seq_reader(const Py_buffer *view, const uint64_t *counter, double patience)
{
    return (SeqReader){.view = view, .counter = counter, .patience = patience};
}

/* The first tries, at once: 0 with an even counter in r->begun, 1 if it
   stayed odd (the caller waits). Guarded, the GIL held. */
static int
seq_spin(void *context)
{
    SeqReader *r = context;
    for (; r->tries < SPIN_TRIES; r->tries++) {
        uint64_t c = __atomic_load_n(r->counter, __ATOMIC_ACQUIRE);
        if (!(c & 1)) {
            r->begun = c;
            return 0;
        }
    }
    return 1;
}

/* The later tries, a yield between two: 0 with an even counter in r->begun,
   or STUCK once the patience ran out. Guarded, the GIL released (the caller
   holds the buffer, so nobody can unmap it meanwhile). */
static int
seq_wait(void *context)
{
    SeqReader *r = context;
    int stuck = 0;
    uint64_t c = 1;
    for (; (c & 1) && !stuck; r->tries++) {
        double now = monotonic();
        if (r->since == 0.0) {
            r->since = now;
        }
        stuck = now - r->since > r->patience;
        sched_yield();
        c = __atomic_load_n(r->counter, __ATOMIC_ACQUIRE);
    }
    r->begun = c;
    return (c & 1) ? STUCK : 0;
}

/* Begin a try: 0 with an even counter in r->begun, STUCK (no exception set:
   the caller says what is stuck), or FAULTED (the fault's offset in `*at`). */
static int
seq_read_begin(SeqReader *r, Py_ssize_t *at)
{
    int rc = r->tries < SPIN_TRIES ? guarded(r->view, seq_spin, r, at) : 1;
    if (rc == 1) {
        /* Not the usual race with one write: wait, but not forever, and let
           the process's other threads run meanwhile. */
        Py_BEGIN_ALLOW_THREADS
        rc = guarded(r->view, seq_wait, r, at);
        Py_END_ALLOW_THREADS
    }
    return rc;
}

/* Whether what was copied since seq_read_begin() is consistent (1); if not
   (0), the caller starts again, which counts as a try. Inside the access
   that copied. */
static int
seq_read_valid(SeqReader *r)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the copy before the check */
    if (__atomic_load_n(r->counter, __ATOMIC_RELAXED) == r->begun) {
        return 1;
    }
    r->tries++;
    return 0;
}

/* A consistent copy: `length` bytes at `source` to `out`, checked against
   the counter afterwards. */
typedef struct {
    SeqReader *reader;
    const unsigned char *source;
    size_t length;
    char *out;
} SeqCopy;

/* 1 if the copy is consistent, 0 if torn. Guarded. */
static int
seq_copy(void *context)
{
    SeqCopy *c = context;
    if (c->length > 0) {
        memcpy(c->out, c->source, c->length);
    }
    return seq_read_valid(c->reader);
}

/* ----------------------------------------------------------- the plumbing */

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

/* A plain copy between a mapping and memory of ours, either way. */
typedef struct {
    void *to;
    const void *from;
    size_t length;
} Copy;

static int
copy(void *context)
{
    Copy *c = context;
    memcpy(c->to, c->from, c->length);
    return 0;
}

/* The range [offset, offset + length) of `view`, or -1 with IndexError. */
static int
check_range(const Py_buffer *view, Py_ssize_t offset, Py_ssize_t length)
{
    if (offset < 0 || length < 0 || offset > view->len - length) {
        PyErr_Format(PyExc_IndexError, "%zd bytes at offset %zd are outside the %zd mapped",
                     length, offset, view->len);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(read_bytes_doc,
"read_bytes(mapping, offset: int, length: int) -> bytes\n\n"
"A copy of `length` bytes at `offset` of the buffer `mapping` (no seqlock:\n"
"what does not change, such as a header). IndexError outside it; Truncated\n"
"if they lie past the end of its file.");

static PyObject *
segment_read_bytes(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("read_bytes", nargs, 3) < 0) {
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    Py_ssize_t length = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    if (check_range(&view, offset, length) == 0 &&
        (result = PyBytes_FromStringAndSize(NULL, length)) != NULL) {
        Copy c = {PyBytes_AS_STRING(result), (const char *)view.buf + offset, (size_t)length};
        Py_ssize_t at;
        if (guarded(&view, copy, &c, &at) == FAULTED) {
            Py_CLEAR(result);
            truncated(&view, at);
        }
    }
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(write_bytes_doc,
"write_bytes(mapping, offset: int, data: bytes) -> None\n\n"
"Copy `data` to `offset` of the writable buffer `mapping` (no seqlock: what\n"
"nobody reads yet, such as a new table's header). IndexError outside it;\n"
"Truncated if it lies past the end of its file.");

static PyObject *
segment_write_bytes(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("write_bytes", nargs, 3) < 0) {
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer view, data;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &data, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *result = NULL;
    if (check_range(&view, offset, data.len) == 0) {
        Copy c = {(char *)view.buf + offset, data.buf, (size_t)data.len};
        Py_ssize_t at;
        if (guarded(&view, copy, &c, &at) == FAULTED) {
            truncated(&view, at);
        }
        else {
            result = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&view);
    return result;
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

/* The segment's area `which` of `capacity` bytes, if `length` fits in it
   (pointer arithmetic only: no access). */
static unsigned char *
area(const Py_buffer *segment, Py_ssize_t capacity, int which, Py_ssize_t length)
{
    if (which > 1 || length > capacity || HEADER_SIZE + (which + 1) * capacity > segment->len) {
        return NULL;
    }
    return (unsigned char *)segment->buf + HEADER_SIZE + which * capacity;
}

/* Grow the file `fd` back to the `mapped` bytes of its mapping if another
   process truncated it, so that writing through the mapping does not fault.
   The bytes it lost read as zeros: the publish then rewrites the header,
   which makes the segment whole again. */
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

typedef struct {
    const Py_buffer *segment;
    Py_ssize_t capacity;
    const Py_buffer *data;
} Publish;

/* The publish itself, once the lock is held: 1 if it published, 0 if `data`
   is the current snapshot already. Guarded. */
static int
publish_access(void *context)
{
    const Publish *p = context;
    const Py_buffer *segment = p->segment, *data = p->data;
    unsigned char *base = segment->buf;
    Meta m;
    read_meta(base, &m); /* no seqlock needed: only writers change it, and this one has the lock */
    int active = m.active & 1;
    const unsigned char *current = area(segment, p->capacity, active, m.lengths[active]);
    if (m.gen && current != NULL && m.lengths[active] == data->len &&
        memcmp(current, data->buf, (size_t)data->len) == 0) {
        return 0;
    }
    /* The area readers do not use, then the header that points them to it. */
    int target = m.gen ? 1 - active : 0;
    memcpy(area(segment, p->capacity, target, data->len), data->buf, (size_t)data->len);
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

/* publish() once the lock is held: 1 if it published, 0 if `data` is the
   current snapshot already, -1 with an exception. A truncation that lands
   between growing the file back and the writes faults them: grow it back
   again and start over, once. */
static int
publish_locked(const Py_buffer *segment, int fd, Py_ssize_t capacity, const Py_buffer *data)
{
    Publish p = {segment, capacity, data};
    Py_ssize_t at = -1;
    for (int attempt = 0; attempt < 2; attempt++) {
        if (restore_size(fd, segment->len) < 0) {
            return -1;
        }
        int rc = guarded(segment, publish_access, &p, &at);
        if (rc != FAULTED) {
            return rc;
        }
    }
    truncated(segment, at);
    return -1;
}

PyDoc_STRVAR(publish_doc,
"publish(segment: mmap, fd: int, capacity: int, data: bytes) -> bool\n\n"
"Make `data` the current snapshot of the mapped segment `segment` (`fd` is\n"
"its file, locked with flock while this writes, and grown back to the\n"
"mapping's size if another process truncated it). False if it equals the\n"
"current one: nothing changes. Truncated if the segment was truncated again\n"
"while this wrote, twice.");

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

typedef struct {
    const unsigned char *base;
    Meta meta;
} MetaRead;

static int
meta_access(void *context)
{
    MetaRead *m = context;
    read_meta(m->base, &m->meta);
    return 0;
}

PyDoc_STRVAR(read_doc,
"read(segment: mmap, capacity: int, patience: float) -> tuple[int, float, bytes] | None\n\n"
"The current (generation, publish time, bytes) of the mapped segment, or None\n"
"before the first publication. Takes no lock: it retries while a publish\n"
"flips the header. TimeoutError if that lasts `patience` seconds (the writer\n"
"died mid-flip); ValueError if the header points outside the segment;\n"
"Truncated (a ValueError) if what it reads lies past the end of the file\n"
"(another process truncated it).");

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
    if (segment.len < HEADER_SIZE) {
        PyErr_SetString(PyExc_ValueError, "the vars segment is smaller than its header");
        goto done;
    }
    const uint64_t *counter = counter_at(&segment, VARS_SEQ, 0);
    if (counter == NULL) {
        goto done;
    }
    SeqReader r = seq_reader(&segment, counter, patience);
    MetaRead m = {.base = segment.buf};
    Py_ssize_t at;
    for (;;) {
        int rc = seq_read_begin(&r, &at);
        if (rc == STUCK) {
            PyErr_SetString(PyExc_TimeoutError, "the vars segment stays mid-update");
            goto done;
        }
        if (rc == FAULTED || guarded(&segment, meta_access, &m, &at) == FAULTED) {
            truncated(&segment, at);
            goto done;
        }
        Py_ssize_t length = m.meta.lengths[m.meta.active & 1];
        const unsigned char *data = area(&segment, capacity, m.meta.active, length);
        PyObject *bytes = NULL;
        if (data != NULL && (bytes = PyBytes_FromStringAndSize(NULL, length)) == NULL) {
            goto done;
        }
        /* With no area to copy, the check alone: the header may have been
           read mid-flip. */
        SeqCopy c = {&r, data, bytes == NULL ? 0 : (size_t)length,
                     bytes == NULL ? NULL : PyBytes_AS_STRING(bytes)};
        rc = guarded(&segment, seq_copy, &c, &at);
        if (rc == FAULTED) {
            Py_XDECREF(bytes);
            truncated(&segment, at);
            goto done;
        }
        if (!rc) {
            Py_XDECREF(bytes);
            continue;
        }
        if (bytes == NULL) {
            PyErr_SetString(PyExc_ValueError, "the vars segment's header points outside it");
        }
        else if (m.meta.gen == 0) {
            Py_DECREF(bytes);
            result = Py_NewRef(Py_None);
        }
        else {
            result = Py_BuildValue("(KdN)", (unsigned long long)m.meta.gen, m.meta.time, bytes);
        }
        goto done;
    }
done:
    PyBuffer_Release(&segment);
    return result;
}

typedef struct {
    const void *at;
    uint64_t value;
} Load;

static int
load_u64(void *context)
{
    Load *l = context;
    l->value = __atomic_load_n((const uint64_t *)l->at, __ATOMIC_RELAXED);
    return 0;
}

PyDoc_STRVAR(generation_doc,
"generation(segment: mmap) -> int\n\n"
"The mapped segment's generation: one load, no lock, no retry (what a reader\n"
"compares with the one it holds, to learn that it should read()). 0 if the\n"
"load faults (another process truncated the file): read() then says why.");

static PyObject *
segment_generation(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer segment;
    if (PyObject_GetBuffer(arg, &segment, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Load l = {.at = (const unsigned char *)segment.buf + VARS_GEN};
    if (segment.len < HEADER_SIZE || guarded(&segment, load_u64, &l, NULL) == FAULTED) {
        l.value = 0;
    }
    PyBuffer_Release(&segment);
    return PyLong_FromUnsignedLongLong(l.value);
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

/* The two fields of the table's header that change (table.py packs the
   rest): the in-use slot count and the pool's status, each stored with
   release and loaded with acquire, one writer (the supervisor). */
enum {
    TABLE_IN_USE = 24, /* u32: slots below it may be in use, written before it */
    TABLE_STATUS = 28, /* u8: table.Status */
};

typedef struct {
    unsigned char *slot;
    const unsigned char *body;
    Py_ssize_t length;
} SlotWrite;

static int
write_slot_access(void *context)
{
    SlotWrite *w = context;
    unsigned char *slot = w->slot;
    const unsigned char *b = w->body;
    uint32_t gen;
    memcpy(&gen, b + BODY_GEN, sizeof(gen));
    uint64_t *counter = (uint64_t *)slot;
    uint64_t begun = seq_write_begin(counter);
    memcpy(slot + SLOT_BODY + BODY_REST, b + BODY_REST, (size_t)(w->length - BODY_REST));
    /* The two fields the hot path reads without the seqlock are stored
       whole, the flag last: a reader that sees the flag set then sees the
       generation written with it, or a later one. */
    __atomic_store_n((uint32_t *)(slot + SLOT_GEN), gen, __ATOMIC_RELAXED);
    __atomic_store_n(slot + SLOT_READY, b[BODY_READY], __ATOMIC_RELEASE);
    seq_write_end(counter, begun);
    return 0;
}

PyDoc_STRVAR(write_slot_doc,
"write_slot(table, offset: int, body: bytes) -> None\n\n"
"Publish `body` as the slot at `offset` of the writable buffer `table`, under\n"
"the slot's seqlock (one writer at a time: the caller's). Truncated if the\n"
"slot lies past the end of the table's file.");

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
        SlotWrite w = {(unsigned char *)counter, body.buf, body.len};
        Py_ssize_t at;
        if (guarded(&table, write_slot_access, &w, &at) == FAULTED) {
            truncated(&table, at);
        }
        else {
            result = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&body);
    PyBuffer_Release(&table);
    return result;
}

/* Copy the `length` bytes after the counter at `counter` of `table` into
   `out`, consistently: 0, STUCK if the counter stayed odd for `patience`
   seconds, FAULTED (offset in `*at`). */
static int
read_under_counter(const Py_buffer *table, const uint64_t *counter, Py_ssize_t length,
                   double patience, char *out, Py_ssize_t *at)
{
    SeqReader r = seq_reader(table, counter, patience);
    SeqCopy c = {&r, (const unsigned char *)counter + sizeof(uint64_t), (size_t)length, out};
    for (;;) {
        int rc = seq_read_begin(&r, at);
        if (rc < 0) {
            return rc;
        }
        rc = guarded(table, seq_copy, &c, at);
        if (rc != 0) {
            return rc == FAULTED ? FAULTED : 0;
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
"stopped between two stores); Truncated if a slot lies past the end of the\n"
"table's file (another process truncated it).");

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
    if (count < 0 || length < 0 ||
        (count > 1 && (stride < (Py_ssize_t)sizeof(uint64_t) + length ||
                       count - 1 > table.len / stride))) {
        PyErr_Format(PyExc_ValueError, "%zd slots of %zd bytes every %zd do not fit", count,
                     length, stride);
    }
    else if ((result = PyList_New(count)) != NULL) {
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
            Py_ssize_t at;
            int rc = read_under_counter(&table, counter, length, patience,
                                        PyBytes_AS_STRING(body), &at);
            if (rc == FAULTED) {
                truncated(&table, at);
            }
            else if (rc == STUCK) {
                PyObject *exc_args = Py_BuildValue("(sn)", "the slot stays mid-update", i);
                if (exc_args != NULL) {
                    PyErr_SetObject(PyExc_TimeoutError, exc_args);
                    Py_DECREF(exc_args);
                }
            }
            if (rc < 0) {
                Py_CLEAR(result);
                break;
            }
        }
    }
    PyBuffer_Release(&table);
    return result;
}

/* ---------------------------------------------------------- the hot path */

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

typedef struct {
    const unsigned char *table;
    const unsigned char *slot;
    long long gen;
} Ready;

/* 1 if the pool serves and the slot is ready with that generation, else 0.
   Guarded. */
static int
name_ready_access(void *context)
{
    const Ready *r = context;
    return __atomic_load_n(r->table + TABLE_STATUS, __ATOMIC_ACQUIRE) == 0 &&
           __atomic_load_n(r->slot + SLOT_READY, __ATOMIC_ACQUIRE) == 1 &&
           __atomic_load_n((const uint32_t *)(r->slot + SLOT_GEN), __ATOMIC_RELAXED) == r->gen;
}

PyDoc_STRVAR(name_ready_doc,
"name_ready(table, offset: int, gen: int) -> bool\n\n"
"Whether the pool serves (the table's status) and the slot at `offset` says\n"
"its name is ready and still holds generation `gen`: three loads, the status\n"
"and the flag first (see TableReader.name_ready). Truncated if the slot lies\n"
"past the end of the table's file.");

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
    Ready r = {.table = table.buf, .slot = hot_slot(&table, offset), .gen = gen};
    int ready = -1;
    Py_ssize_t at;
    if (r.slot != NULL && (ready = guarded(&table, name_ready_access, &r, &at)) == FAULTED) {
        truncated(&table, at);
    }
    PyBuffer_Release(&table);
    return ready < 0 ? NULL : PyBool_FromLong(ready);
}

/* 1 if the pool serves and the slot still holds generation `gen` (its
   ready flag unread). Guarded. */
static int
slot_current_access(void *context)
{
    const Ready *r = context;
    return __atomic_load_n(r->table + TABLE_STATUS, __ATOMIC_ACQUIRE) == 0 &&
           __atomic_load_n((const uint32_t *)(r->slot + SLOT_GEN), __ATOMIC_ACQUIRE) == r->gen;
}

PyDoc_STRVAR(vars_current_doc,
"vars_current(table, offset: int, gen: int, segment, vars_gen: int) -> bool\n\n"
"get_vars()'s hot path in one call: whether the pool serves, the slot at\n"
"`offset` still holds generation `gen` (its name did not move) and the vars\n"
"`segment` still holds generation `vars_gen` (nothing newer was published).\n"
"Truncated if the table's slot lies past the end of its file; False if the\n"
"segment's load faults (read() then says why).");

static PyObject *
segment_vars_current(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("vars_current", nargs, 5) < 0) {
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    long long gen = PyLong_AsLongLong(args[2]);
    unsigned long long vars_gen = PyLong_AsUnsignedLongLong(args[4]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer table;
    if (PyObject_GetBuffer(args[0], &table, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_buffer segment;
    if (PyObject_GetBuffer(args[3], &segment, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&table);
        return NULL;
    }
    Ready r = {.table = table.buf, .slot = hot_slot(&table, offset), .gen = gen};
    int current = -1;
    Py_ssize_t at;
    if (r.slot != NULL && (current = guarded(&table, slot_current_access, &r, &at)) == FAULTED) {
        truncated(&table, at);
        current = -1;
    }
    if (current == 1) {
        Load l = {.at = (const unsigned char *)segment.buf + VARS_GEN};
        current = segment.len >= HEADER_SIZE &&
                  guarded(&segment, load_u64, &l, NULL) != FAULTED && l.value == vars_gen;
    }
    PyBuffer_Release(&segment);
    PyBuffer_Release(&table);
    return current < 0 ? NULL : PyBool_FromLong(current);
}

static int
load_u32(void *context)
{
    Load *l = context;
    l->value = __atomic_load_n((const uint32_t *)l->at, __ATOMIC_ACQUIRE);
    return 0;
}

static int
load_u8(void *context)
{
    Load *l = context;
    l->value = __atomic_load_n((const unsigned char *)l->at, __ATOMIC_ACQUIRE);
    return 0;
}

/* The field of `size` bytes (1 or 4) at `offset` of `table`, loaded with
   acquire; NULL with IndexError or Truncated. */
static PyObject *
load_field(PyObject *mapping, Py_ssize_t offset, Py_ssize_t size)
{
    Py_buffer table;
    if (PyObject_GetBuffer(mapping, &table, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    Load l = {.at = (const unsigned char *)table.buf + offset};
    Py_ssize_t at;
    if (check_range(&table, offset, size) < 0) {
        /* IndexError set */
    }
    else if (guarded(&table, size == 1 ? load_u8 : load_u32, &l, &at) == FAULTED) {
        truncated(&table, at);
    }
    else {
        result = PyLong_FromUnsignedLong((unsigned long)l.value);
    }
    PyBuffer_Release(&table);
    return result;
}

typedef struct {
    void *at;
    uint32_t value;
} Store;

static int
store_u32(void *context)
{
    Store *s = context;
    __atomic_store_n((uint32_t *)s->at, s->value, __ATOMIC_RELEASE);
    return 0;
}

static int
store_u8(void *context)
{
    Store *s = context;
    __atomic_store_n((unsigned char *)s->at, (unsigned char)s->value, __ATOMIC_RELEASE);
    return 0;
}

/* Store `value` into the field of `size` bytes (1 or 4) at `offset` of the
   writable `mapping`, with release; NULL with an exception. */
static PyObject *
store_field(PyObject *mapping, Py_ssize_t offset, Py_ssize_t size, PyObject *value)
{
    unsigned long v = PyLong_AsUnsignedLong(value);
    if (v == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (v > (size == 1 ? 0xffUL : 0xffffffffUL)) {
        return PyErr_Format(PyExc_OverflowError, "%lu does not fit %zd byte(s)", v, size);
    }
    Py_buffer table;
    if (PyObject_GetBuffer(mapping, &table, PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    Store s = {(unsigned char *)table.buf + offset, (uint32_t)v};
    Py_ssize_t at;
    if (check_range(&table, offset, size) < 0) {
        /* IndexError set */
    }
    else if (guarded(&table, size == 1 ? store_u8 : store_u32, &s, &at) == FAULTED) {
        truncated(&table, at);
    }
    else {
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&table);
    return result;
}

PyDoc_STRVAR(in_use_doc,
"in_use(table) -> int\n\n"
"The table header's in-use slot count (one acquire load: the slots below it\n"
"were written before it). Truncated past the end of the table's file.");

static PyObject *
segment_in_use(PyObject *Py_UNUSED(module), PyObject *table)
{
    return load_field(table, TABLE_IN_USE, 4);
}

PyDoc_STRVAR(set_in_use_doc,
"set_in_use(table, count: int) -> None\n\n"
"Store the in-use slot count (release: after the slots it counts).");

static PyObject *
segment_set_in_use(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("set_in_use", nargs, 2) < 0) {
        return NULL;
    }
    return store_field(args[0], TABLE_IN_USE, 4, args[1]);
}

PyDoc_STRVAR(status_doc,
"status(table) -> int\n\n"
"The table header's status byte (one acquire load). Truncated past the end\n"
"of the table's file.");

static PyObject *
segment_status(PyObject *Py_UNUSED(module), PyObject *table)
{
    return load_field(table, TABLE_STATUS, 1);
}

PyDoc_STRVAR(set_status_doc,
"set_status(table, status: int) -> None\n\n"
"Store the status byte (release).");

static PyObject *
segment_set_status(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("set_status", nargs, 2) < 0) {
        return NULL;
    }
    return store_field(args[0], TABLE_STATUS, 1, args[1]);
}

PyDoc_STRVAR(slot_generation_doc,
"slot_generation(table, offset: int) -> int\n\n"
"The identity generation of the slot at `offset`: one load. Truncated if\n"
"the slot lies past the end of the table's file.");

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
    PyObject *result = NULL;
    if (slot != NULL) {
        Load l = {.at = slot + SLOT_GEN};
        Py_ssize_t at;
        if (guarded(&table, load_u32, &l, &at) == FAULTED) {
            truncated(&table, at);
        }
        else {
            result = PyLong_FromUnsignedLong((unsigned long)l.value);
        }
    }
    PyBuffer_Release(&table);
    return result;
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
    {.ml_name = "vars_current", .ml_meth = FASTCALL(segment_vars_current),
     .ml_flags = METH_FASTCALL, .ml_doc = vars_current_doc},
    {.ml_name = "in_use", .ml_meth = segment_in_use, .ml_flags = METH_O,
     .ml_doc = in_use_doc},
    {.ml_name = "set_in_use", .ml_meth = FASTCALL(segment_set_in_use),
     .ml_flags = METH_FASTCALL, .ml_doc = set_in_use_doc},
    {.ml_name = "status", .ml_meth = segment_status, .ml_flags = METH_O, .ml_doc = status_doc},
    {.ml_name = "set_status", .ml_meth = FASTCALL(segment_set_status),
     .ml_flags = METH_FASTCALL, .ml_doc = set_status_doc},
    {.ml_name = "read_bytes", .ml_meth = FASTCALL(segment_read_bytes),
     .ml_flags = METH_FASTCALL, .ml_doc = read_bytes_doc},
    {.ml_name = "write_bytes", .ml_meth = FASTCALL(segment_write_bytes),
     .ml_flags = METH_FASTCALL, .ml_doc = write_bytes_doc},
    {0}, /* the end */
};

PyDoc_STRVAR(truncated_doc,
"An access to a mapped segment went past the end of its file: another process\n"
"truncated it. A ValueError, as what a reader finds wrong in a segment is.");

static int
segment_exec(PyObject *module)
{
    if (Truncated == NULL &&
        (Truncated = PyErr_NewExceptionWithDoc("bgpool.shm._segment.Truncated", truncated_doc,
                                               PyExc_ValueError, NULL)) == NULL) {
        return -1;
    }
    if (install_guard() < 0 || PyModule_AddObjectRef(module, "Truncated", Truncated) < 0) {
        return -1;
    }
    PyObject *stuck = PyFloat_FromDouble(STUCK_SECONDS);
    int rc = stuck == NULL ? -1 : PyModule_AddObjectRef(module, "STUCK_SECONDS", stuck);
    Py_XDECREF(stuck);
    if (rc < 0 || PyModule_AddIntConstant(module, "HEADER_SIZE", HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "SLOT_BODY", SLOT_BODY) < 0 ||
        PyModule_AddIntConstant(module, "SLOT_GEN", SLOT_GEN) < 0 ||
        PyModule_AddIntConstant(module, "SLOT_READY", SLOT_READY) < 0 ||
        PyModule_AddIntConstant(module, "TABLE_IN_USE", TABLE_IN_USE) < 0 ||
        PyModule_AddIntConstant(module, "TABLE_STATUS", TABLE_STATUS) < 0) {
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
    .m_doc = "Every access to bgpool's shared memory: the seqlock of the readiness table\n"
             "and of the vars segments, both sides, guarded against truncated files.",
    .m_size = 0,
    .m_methods = segment_methods,
    .m_slots = segment_slots,
};

PyMODINIT_FUNC
PyInit__segment(void)
{
    return PyModuleDef_Init(&segment_module);
}
