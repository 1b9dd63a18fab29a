/* bgpool._heap: make the objects a process has loaded immortal (PEP 683), so
that the processes it forks share their pages for good.

A forked worker shares its code generation's memory until it writes to it, and
CPython writes to every object it references: the reference count lives in the
object's first word. A worker that takes a handful of steps through code its
generation loaded (the runtime, the target's module) so copies the page of each
object it touches, and keeps the copy. An immortal object's count is never
written (Py_INCREF and Py_DECREF skip it), so its page stays shared: an idle
worker's own memory went from 1.32 MiB to 0.77 on 3.12, from 1.43 to 0.79 on
3.13 (the benchmark's worker_uss). Pre-fork servers sharing memory with
their workers, Instagram's first, are the use PEP 683 was written for.

The price is that an immortal object is never freed: it lives as long as the
process, whatever refers to it, and its finalizer and weakref callbacks never
run. That is what a generation's objects do anyway (they are loaded once to be
forked from and never collected: gc.freeze()), and in a worker it means that
an object its generation loaded stays when the worker drops it.

Only 3.12 and later have immortal objects; on 3.11 immortalize() does nothing
and returns 0 (IMMORTAL_OBJECTS tells which). Not on a free-threaded build,
whose reference counts work differently. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if PY_VERSION_HEX >= 0x030C0000 && !defined(Py_GIL_DISABLED)
#define HAVE_IMMORTAL 1
#else
#define HAVE_IMMORTAL 0
#endif

#if HAVE_IMMORTAL

/* The objects made immortal whose referents are still to be visited. */
typedef struct {
    PyObject **items;
    Py_ssize_t length;
    Py_ssize_t capacity;
    Py_ssize_t made;
} Pending;

/* Make `op` immortal; false if it was already (made so here, or born so:
None, small ints, interned strings, static types). */
static int
make(PyObject *op, Pending *pending)
{
    if (_Py_IsImmortal(op)) {
        return 0;
    }
    Py_SET_REFCNT(op, _Py_IMMORTAL_REFCNT);
    pending->made++;
    return 1;
}

/* A traversal's visit: make `op` immortal and remember to reach what it
refers to, unless it was immortal already, which ends the walk there. */
static int
reach(PyObject *op, void *arg)
{
    Pending *pending = (Pending *)arg;
    if (op == NULL || !make(op, pending)) {
        return 0;
    }
    if (pending->length == pending->capacity) {
        Py_ssize_t capacity = pending->capacity ? pending->capacity * 2 : 4096;
        PyObject **items = PyMem_Realloc(pending->items, capacity * sizeof(PyObject *));
        if (items == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        pending->items = items;
        pending->capacity = capacity;
    }
    pending->items[pending->length++] = op;
    return 0;
}

/* Reach what `op` refers to: its type, what the garbage collector's traversal
visits (containers), and a code object's constants and names (code objects
are not containers the collector knows of). */
static int
reach_referents(PyObject *op, Pending *pending)
{
    if (reach((PyObject *)Py_TYPE(op), pending) < 0) {
        return -1;
    }
    if (PyCode_Check(op)) {
        PyCodeObject *code = (PyCodeObject *)op;
        PyObject *parts[] = {code->co_consts, code->co_names, code->co_exceptiontable,
                             code->co_localsplusnames, code->co_localspluskinds,
                             code->co_filename, code->co_name, code->co_qualname,
                             code->co_linetable};
        for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
            if (reach(parts[i], pending) < 0) {
                return -1;
            }
        }
        return 0;
    }
    traverseproc traverse = Py_TYPE(op)->tp_traverse;
    if (traverse == NULL || !PyObject_IS_GC(op)) {
        return 0;
    }
    return traverse(op, reach, pending);
}

/* Make every object in `objects`, and all they reach, immortal; how many were
made so. */
static Py_ssize_t
immortalize_all(PyObject *objects)
{
    Pending pending = {NULL, 0, 0, 0};
    int failed = 0;
    /* Every listed object's referents are visited, even an immortal one's: a
    container made immortal by an earlier call may hold objects made since. */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(objects) && !failed; i++) {
        PyObject *op = PyList_GET_ITEM(objects, i);
        make(op, &pending);
        failed = reach_referents(op, &pending) < 0;
        while (pending.length > 0 && !failed) {
            failed = reach_referents(pending.items[--pending.length], &pending) < 0;
        }
    }
    PyMem_Free(pending.items);
    return failed ? -1 : pending.made;
}

#endif

static PyObject *
heap_immortalize(PyObject *Py_UNUSED(module), PyObject *objects)
{
    if (!PyList_Check(objects)) {
        PyErr_SetString(PyExc_TypeError, "immortalize() takes a list (gc.get_objects())");
        return NULL;
    }
#if HAVE_IMMORTAL
    Py_ssize_t made = immortalize_all(objects);
    return made < 0 ? NULL : PyLong_FromSsize_t(made);
#else
    return PyLong_FromLong(0);
#endif
}

static PyMethodDef methods[] = {
    {"immortalize", heap_immortalize, METH_O,
     "Make the listed objects, and every object they reach, immortal; return how many were "
     "made so (0 without immortal objects)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "bgpool._heap",
    .m_doc = "Make a process's objects immortal, so that what it forks shares them for good.",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__heap(void)
{
    PyObject *module = PyModule_Create(&module_def);
    PyObject *immortal = HAVE_IMMORTAL ? Py_True : Py_False;
    if (module != NULL && PyModule_AddObjectRef(module, "IMMORTAL_OBJECTS", immortal) < 0) {
        Py_CLEAR(module);
    }
    return module;
}
