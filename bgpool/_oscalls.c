/* bgpool._oscalls: the system calls bgpool makes that Python's os module has
no function for (prctl, clone with CLONE_PARENT, inotify, sigqueue, and a
singleton worker's lease guard: a POSIX timer that kills it). Only bgpool/platform.py
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
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
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

/* The lease guard of a singleton worker (supervisor/leases.py says why).

A POSIX timer on CLOCK_BOOTTIME (it counts a suspended machine's sleep, as
the lease's expiry in Redis does) that sends SIGKILL to this process at an
absolute deadline: the worker dies by then even if its supervisor and the
coordinator that renews its lease are frozen. Each renewal moves the deadline
on: the supervisor sigqueue()s the lease signal with the new deadline (in
nanoseconds) as its value, and the handler below re-arms the timer from
inside the signal, with no Python code involved (timer_settime and getppid
are async-signal-safe), so a worker busy in C code, or holding the GIL, is
re-armed all the same. Only its parent (the supervisor) may move it. */
#ifdef __linux__
static timer_t lease_timer;
static volatile sig_atomic_t lease_timer_made = 0;

static int
lease_arm(int64_t deadline_ns)
{
    struct itimerspec when;
    memset(&when, 0, sizeof(when));
    if (deadline_ns <= 0)
        deadline_ns = 1; /* at once: 0 would disarm it */
    when.it_value.tv_sec = (time_t)(deadline_ns / 1000000000LL);
    when.it_value.tv_nsec = (long)(deadline_ns % 1000000000LL);
    return timer_settime(lease_timer, TIMER_ABSTIME, &when, NULL);
}

static void
on_lease_signal(int Py_UNUSED(sig), siginfo_t *info, void *Py_UNUSED(context))
{
    int saved = errno;
    if (lease_timer_made && info->si_code == SI_QUEUE && info->si_pid == getppid())
        lease_arm((int64_t)(intptr_t)info->si_value.sival_ptr);
    errno = saved;
}
#endif

/* lease_guard(deadline_ns, signal): SIGKILL to this process at deadline_ns
(CLOCK_BOOTTIME), moved by `signal` queued by the parent with a new deadline. */
static PyObject *
oscalls_lease_guard(PyObject *Py_UNUSED(module), PyObject *args)
{
    long long deadline;
    int signo;
    if (!PyArg_ParseTuple(args, "Li:lease_guard", &deadline, &signo))
        return NULL;
#if defined(__linux__) && UINTPTR_MAX >= 0xffffffffffffffffULL
    if (!lease_timer_made) {
        struct sigevent event;
        memset(&event, 0, sizeof(event));
        event.sigev_notify = SIGEV_SIGNAL;
        event.sigev_signo = SIGKILL;
        if (timer_create(CLOCK_BOOTTIME, &event, &lease_timer) != 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        lease_timer_made = 1;
        struct sigaction action;
        memset(&action, 0, sizeof(action));
        action.sa_sigaction = on_lease_signal;
        action.sa_flags = SA_SIGINFO | SA_RESTART;
        sigemptyset(&action.sa_mask);
        if (sigaction(signo, &action, NULL) != 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (lease_arm((int64_t)deadline) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
#else
    return unsupported();
#endif
}

/* sigqueue(pid, signal, value): queue `signal` to `pid` with a 64-bit value. */
static PyObject *
oscalls_sigqueue(PyObject *Py_UNUSED(module), PyObject *args)
{
    int pid, signo;
    long long value;
    if (!PyArg_ParseTuple(args, "iiL:sigqueue", &pid, &signo, &value))
        return NULL;
#if defined(__linux__) && UINTPTR_MAX >= 0xffffffffffffffffULL
    union sigval sv;
    sv.sival_ptr = (void *)(intptr_t)value;
    if (sigqueue(pid, signo, sv) != 0)
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
    {"lease_guard", oscalls_lease_guard, METH_VARARGS, "SIGKILL to self at a deadline (boottime ns)."},
    {"sigqueue", oscalls_sigqueue, METH_VARARGS, "sigqueue(pid, signal, value)."},
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
