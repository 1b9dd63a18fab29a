/* bgpool._oscalls: the system calls bgpool makes that Python's os module has
no function for (prctl, clone with CLONE_PARENT, inotify, sigqueue, and a
singleton worker's lease guard: a POSIX timer that kills it), and the loop in
which a code generation forks its workers (`fork_server`). Only
bgpool/platform.py imports it; everything else goes through platform's
functions.

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
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <sys/inotify.h>
#include <sys/prctl.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
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

#ifdef __linux__
/* Fork, the child becoming a child of this process's parent (CLONE_PARENT):
0 in the child, its pid here, -1 with errno set. The interpreter's before- and
after-fork steps run around the call, as os.fork() runs them. */
static long
fork_sibling(void)
{
    PyOS_BeforeFork();
    /* raw clone: glibc's fork() wrapper takes no flags, and clone() wants a
       new stack; the kernel's clone with a NULL stack is fork with flags */
    long pid = syscall(SYS_clone, (unsigned long)(CLONE_PARENT | SIGCHLD), NULL, NULL, NULL, NULL);
    if (pid == 0) {
        PyOS_AfterFork_Child();
        return 0;
    }
    int saved = errno;
    PyOS_AfterFork_Parent();
    errno = saved;
    return pid;
}

/* The most spares fork_server keeps (zygote.SPARES is 2), and the most
descriptors a request may bring (a Boot has four). */
#define MAX_SPARES 8
#define MAX_FDS 16

/* One message on `sock`, with `fd` as SCM_RIGHTS when it is not -1. */
static int
send_message(int sock, const char *text, int fd)
{
    struct iovec part = {.iov_base = (void *)text, .iov_len = strlen(text)};
    union {
        char space[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr message = {.msg_iov = &part, .msg_iovlen = 1};
    if (fd >= 0) {
        memset(&control, 0, sizeof(control));
        message.msg_control = control.space;
        message.msg_controllen = sizeof(control.space);
        struct cmsghdr *header = CMSG_FIRSTHDR(&message);
        header->cmsg_level = SOL_SOCKET;
        header->cmsg_type = SCM_RIGHTS;
        header->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(header), &fd, sizeof(int));
    }
    return sendmsg(sock, &message, 0) < 0 ? -1 : 0;
}

/* Wait until one of `count` descriptors is readable or `timeout_ms` passes
(-1: no limit), the GIL released; the number readable (0: timed out), or -1
with a Python exception set (a signal handler raised, or poll failed). */
static int
wait_readable(struct pollfd *fds, int count, int timeout_ms)
{
    while (1) {
        int ready;
        Py_BEGIN_ALLOW_THREADS
        ready = poll(fds, (nfds_t)count, timeout_ms);
        Py_END_ALLOW_THREADS
        if (ready >= 0)
            return ready;
        if (errno != EINTR) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
}

/* One packet read from `sock` into `buffer`, the descriptors it brought (at
most MAX_FDS) into `fds` and their number into `count`: its size (0: the
other end closed), or -1 with errno set. */
static ssize_t
receive(int sock, char *buffer, Py_ssize_t size, char *control, size_t control_size, int *fds,
        int *count)
{
    struct iovec part = {.iov_base = buffer, .iov_len = (size_t)size};
    struct msghdr message = {.msg_iov = &part, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = control_size};
    ssize_t got;
    do
        got = recvmsg(sock, &message, 0);
    while (got < 0 && errno == EINTR);
    if (got <= 0)
        return got;
    for (struct cmsghdr *header = CMSG_FIRSTHDR(&message); header != NULL;
         header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS)
            continue;
        int *data = (int *)CMSG_DATA(header);
        size_t n = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < n && *count < MAX_FDS; i++)
            fds[(*count)++] = data[i];
    }
    return got;
}

/* A request as a forked child returns it: (data, [descriptors]). */
static PyObject *
request(const char *data, ssize_t size, const int *fds, int count)
{
    PyObject *list = PyList_New(count);
    for (int i = 0; list != NULL && i < count; i++) {
        PyObject *fd = PyLong_FromLong(fds[i]);
        if (fd == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, fd);
    }
    return list == NULL ? NULL : Py_BuildValue("(y#N)", data, (Py_ssize_t)size, list);
}
#endif

/* fork_server(sock, max_fds, spares, spare_after_ms, max_packet): fork one
child per request read on `sock` (a SOCK_SEQPACKET socket; a request comes
with up to `max_fds` descriptors), answering each with its pid, and keep up to
`spares` children forked ahead, each offered on `sock` with its own socket,
until `sock` closes: zygote.py says what for, and what the messages are.

Returns in the parent only once `sock` closed: None. Returns in each child:
a request's (data, [descriptors]), or a spare's own socket (an int). The
children are this process's parent's (CLONE_PARENT).

In C, not Python, because a code generation forks here: every page this
process writes after a fork stays with the child forked before it as its own.
The same loop in Python wrote, between forks, the reference counts and the
specialised code of every function it ran, most of all the first time it
served a request, after it had forked its spares. Measured in turn with that
loop on 3.11 (the benchmark's worker_uss, 16 idle workers): 0.99 MiB of
their own against 1.05, and the largest of them, a worker started as a spare,
1.06-1.08 against 1.18. */
static PyObject *
oscalls_fork_server(PyObject *Py_UNUSED(module), PyObject *args)
{
    int sock, max_fds, spares, spare_after_ms;
    Py_ssize_t max_packet;
    if (!PyArg_ParseTuple(args, "iiiin:fork_server", &sock, &max_fds, &spares, &spare_after_ms,
                          &max_packet))
        return NULL;
#ifdef __linux__
    if (max_fds < 0 || max_fds > MAX_FDS || spares < 0 || spares > MAX_SPARES || max_packet <= 0) {
        PyErr_SetString(PyExc_ValueError, "fork_server: bad limits");
        return NULL;
    }
    size_t control_size = CMSG_SPACE((size_t)max_fds * sizeof(int));
    char *buffer = PyMem_RawMalloc((size_t)max_packet + control_size);
    if (buffer == NULL)
        return PyErr_NoMemory();
    char *control = buffer + max_packet;
    struct pollfd watched[1 + MAX_SPARES];
    int waiting = 0; /* spares on offer: our end of each one's socket, watched[1..] */
    int patience = 0; /* the first spare at once: no worker of ours boots yet */
    PyObject *result = NULL;
    char text[64];
    while (1) {
        watched[0].fd = sock;
        for (int i = 0; i <= waiting; i++) {
            watched[i].events = POLLIN;
            watched[i].revents = 0;
        }
        int ready = wait_readable(watched, 1 + waiting, waiting < spares ? patience : -1);
        if (ready < 0)
            break;
        if (ready == 0) { /* a moment without requests: fork a spare */
            int pair[2];
            if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0)
                continue; /* the next request forks, as without spares */
            long pid = fork_sibling();
            if (pid == 0) {
                close(pair[0]);
                for (int i = 1; i <= waiting; i++)
                    close(watched[i].fd);
                PyMem_RawFree(buffer);
                return PyLong_FromLong(pair[1]);
            }
            close(pair[1]);
            if (pid < 0) {
                close(pair[0]);
                continue;
            }
            snprintf(text, sizeof(text), "{\"t\": \"spare\", \"pid\": %ld}", pid);
            if (send_message(sock, text, pair[0]) != 0) {
                PyErr_SetFromErrno(PyExc_OSError);
                close(pair[0]);
                break;
            }
            watched[1 + waiting++].fd = pair[0]; /* it hangs up once the spare is taken */
            continue;
        }
        patience = spare_after_ms; /* a worker of ours boots now: leave it the CPUs a moment */
        for (int i = waiting; i >= 1; i--) {
            if (watched[i].revents) { /* taken, or dead */
                close(watched[i].fd);
                watched[i] = watched[waiting--];
            }
        }
        if (!watched[0].revents)
            continue;
        int fds[MAX_FDS];
        int count = 0;
        ssize_t size = receive(sock, buffer, max_packet, control, control_size, fds, &count);
        if (size < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            break;
        }
        if (size == 0) { /* the supervisor closed its end */
            Py_INCREF(Py_None);
            result = Py_None;
            break;
        }
        long pid = fork_sibling();
        if (pid == 0) {
            result = request(buffer, size, fds, count);
            PyMem_RawFree(buffer);
            return result;
        }
        int failure = pid < 0 ? errno : 0;
        for (int i = 0; i < count; i++)
            close(fds[i]);
        if (failure)
            snprintf(text, sizeof(text), "{\"t\": \"failed\", \"errno\": %d}", failure);
        else
            snprintf(text, sizeof(text), "{\"t\": \"spawned\", \"pid\": %ld}", pid);
        if (send_message(sock, text, -1) != 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            break;
        }
    }
    for (int i = 1; i <= waiting; i++)
        close(watched[i].fd);
    PyMem_RawFree(buffer);
    return result;
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
    {"fork_server", oscalls_fork_server, METH_VARARGS, "Fork a child per request, and spares."},
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
