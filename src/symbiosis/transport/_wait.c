/* Waiting for a socket's next message, polling briefly before blocking.
 *
 * Built at install time (optional: transport/waiting.py falls back to plain blocking receives).
 *
 * receive(fd, buffer, spin_ns) -> (nbytes, truncated, waited_ns): one message of a SOCK_SEQPACKET
 * socket.
 * Without the GIL, polls the socket (MSG_DONTWAIT, with sched_yield() between polls: a hint that
 * lets other threads runnable on this CPU run) for up to spin_ns nanoseconds, then — after handling
 * any signal that arrived meanwhile — blocks in recvmsg() (honouring SO_RCVTIMEO: BlockingIOError
 * when it expires). The socket must be in blocking mode (no Python-level timeout). A message that arrives while polling
 * costs no wake-up of a sleeping thread; on a virtual machine whose idle vCPUs halt, one wake-up
 * costs about 25 us (docs/architecture-service.md). nbytes 0 is end-of-file; truncated: the
 * message was longer than the buffer (its rest is discarded); waited_ns: time from the call to
 * the message. Signals interrupt a blocking wait as for Python's own socket calls.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static PyObject *receive(PyObject *self, PyObject *args) {
    int fd;
    Py_buffer buffer;
    long long spin_ns;
    if (!PyArg_ParseTuple(args, "iw*L", &fd, &buffer, &spin_ns)) {
        return NULL;
    }
    struct iovec iov = {buffer.buf, (size_t)buffer.len};
    struct msghdr msg;
    ssize_t n = -1;
    int error = 0;
    long long start = now_ns();
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (spin_ns > 0) {
        Py_BEGIN_ALLOW_THREADS
        long long deadline = start + spin_ns;
        do {
            n = recvmsg(fd, &msg, MSG_DONTWAIT);
            error = n < 0 ? errno : 0;
            if (n >= 0 || (error != EAGAIN && error != EWOULDBLOCK)) {
                break;
            }
            sched_yield();
        } while (now_ns() < deadline);
        Py_END_ALLOW_THREADS
        if (n < 0 && (error == EAGAIN || error == EWOULDBLOCK) && PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&buffer);
            return NULL;
        }
    } else {
        error = EAGAIN;
    }
    while (n < 0 && (error == EAGAIN || error == EWOULDBLOCK || error == EINTR)) {
        if (error == EINTR && PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&buffer);
            return NULL;
        }
        Py_BEGIN_ALLOW_THREADS
        n = recvmsg(fd, &msg, 0);
        error = n < 0 ? errno : 0;
        Py_END_ALLOW_THREADS
        if (n < 0 && (error == EAGAIN || error == EWOULDBLOCK)) {
            break; /* SO_RCVTIMEO expired */
        }
    }
    if (n < 0) {
        PyBuffer_Release(&buffer);
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyBuffer_Release(&buffer);
    return Py_BuildValue("(nOL)", (Py_ssize_t)n, (msg.msg_flags & MSG_TRUNC) ? Py_True : Py_False, now_ns() - start);
}

/* readable(fd, spin_ns) -> (ready, waited_ns): poll (without the GIL, sched_yield() between polls) until
 * the socket has something to read (data, end-of-file or an error: the next read returns at once)
 * or spin_ns have passed; the caller then reads, blocking if need be. For byte streams (TCP data
 * channels), whose reads Python's socket and ssl modules do. */
static PyObject *readable(PyObject *self, PyObject *args) {
    int fd;
    long long spin_ns;
    if (!PyArg_ParseTuple(args, "iL", &fd, &spin_ns)) {
        return NULL;
    }
    struct pollfd polled = {fd, POLLIN, 0};
    int ready = 0;
    long long start = now_ns(), waited;
    Py_BEGIN_ALLOW_THREADS
    long long deadline = start + spin_ns;
    for (;;) {
        ready = poll(&polled, 1, 0) != 0; /* an error (-1) also means: let the read report it */
        if (ready || now_ns() >= deadline) {
            break;
        }
        sched_yield();
    }
    waited = now_ns() - start;
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(OL)", ready ? Py_True : Py_False, waited);
}

static PyMethodDef methods[] = {
    {"receive", receive, METH_VARARGS, "receive(fd, buffer, spin_ns) -> (nbytes, truncated, waited_ns)"},
    {"readable", readable, METH_VARARGS, "readable(fd, spin_ns) -> (ready, waited_ns)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wait", NULL, -1, methods};

PyMODINIT_FUNC PyInit__wait(void) { return PyModule_Create(&module); }
