/* bgpool._oscalls: the system calls bgpool makes that Python's os module has
no function for (prctl, clone with CLONE_PARENT, inotify). Only bgpool/platform.py
imports it; everything else goes through platform's functions.

Why C and not ctypes: these run in code generations and workers, right after a
fork, where every page the process writes stops being shared with its siblings.
A ctypes call builds argument converters and call records as Python objects
each time: one clone through ctypes made a generation write about 90 pages
(360 KiB), which the worker forked just before then kept as its own; through
this module about 40, as os.fork() (measured as the growth of a forked
child's USS when its parent forks once more). Each function here is a C
call, as os.fork() is.

Linux only; on another platform every function raises OSError(ENOSYS), and
platform.py says what is missing. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>

#ifdef __linux__
#include <sched.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

static PyObject *
unsupported(void)
{
    errno = ENOSYS;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* fork_sibling(): fork, the child becoming a child of this process's parent
(CLONE_PARENT); 0 in the child, its pid here. The interpreter's before- and
after-fork steps run around the call, as os.fork() runs them. */
static PyObject *
oscalls_fork_sibling(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
#ifdef __linux__
    PyOS_BeforeFork();
    /* raw clone: glibc's fork() wrapper takes no flags, and clone() wants a
       new stack; the kernel's clone with a NULL stack is fork with flags */
    long pid = syscall(SYS_clone, (unsigned long)(CLONE_PARENT | SIGCHLD), NULL, NULL, NULL, NULL);
    if (pid == 0) {
        PyOS_AfterFork_Child();
        return PyLong_FromLong(0);
    }
    int saved = errno;
    PyOS_AfterFork_Parent();
    if (pid < 0) {
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(pid);
#else
    return unsupported();
#endif
}

/* prctl(option, value): prctl with one integer argument. */
static PyObject *
oscalls_prctl_int(PyObject *Py_UNUSED(module), PyObject *args)
{
    int option;
    unsigned long value;
    if (!PyArg_ParseTuple(args, "ik:prctl", &option, &value))
        return NULL;
#ifdef __linux__
    if (prctl(option, value, 0, 0, 0) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
#else
    return unsupported();
#endif
}

/* set_name(name): rename this process (the kernel keeps 15 bytes). */
static PyObject *
oscalls_set_name(PyObject *Py_UNUSED(module), PyObject *arg)
{
    char *name;
    Py_ssize_t size;
    if (PyBytes_AsStringAndSize(arg, &name, &size) < 0)
        return NULL;
#ifdef __linux__
    if (prctl(PR_SET_NAME, name, 0, 0, 0) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
#else
    return unsupported();
#endif
}

/* inotify_init(): a new inotify descriptor, non-blocking and close-on-exec. */
static PyObject *
oscalls_inotify_init(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
#ifdef __linux__
    int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(fd);
#else
    return unsupported();
#endif
}

/* inotify_add_watch(fd, path, mask): the watch descriptor. */
static PyObject *
oscalls_add_watch(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd;
    const char *path;
    unsigned int mask;
    if (!PyArg_ParseTuple(args, "iyI:inotify_add_watch", &fd, &path, &mask))
        return NULL;
#ifdef __linux__
    int wd = inotify_add_watch(fd, path, mask);
    if (wd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(wd);
#else
    return unsupported();
#endif
}

/* inotify_rm_watch(fd, wd). */
static PyObject *
oscalls_rm_watch(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd, wd;
    if (!PyArg_ParseTuple(args, "ii:inotify_rm_watch", &fd, &wd))
        return NULL;
#ifdef __linux__
    if (inotify_rm_watch(fd, wd) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
#else
    return unsupported();
#endif
}

static PyMethodDef methods[] = {
    {"fork_sibling", oscalls_fork_sibling, METH_NOARGS, "Fork with CLONE_PARENT: 0 in the child."},
    {"prctl", oscalls_prctl_int, METH_VARARGS, "prctl(option, value)."},
    {"set_name", oscalls_set_name, METH_O, "Rename this process (comm)."},
    {"inotify_init", oscalls_inotify_init, METH_NOARGS, "inotify_init1(IN_NONBLOCK | IN_CLOEXEC)."},
    {"inotify_add_watch", oscalls_add_watch, METH_VARARGS, "inotify_add_watch(fd, path, mask)."},
    {"inotify_rm_watch", oscalls_rm_watch, METH_VARARGS, "inotify_rm_watch(fd, wd)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "bgpool._oscalls",
    .m_doc = "The system calls bgpool makes that the os module has no function for.",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__oscalls(void)
{
    return PyModule_Create(&module_def);
}
