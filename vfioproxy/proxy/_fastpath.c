/*
 * vfioproxy.proxy._fastpath: the proxy's plain-message lane, in C.
 *
 * What nearly every message of a running device is (a REGION_READ or
 * REGION_WRITE and its reply: no fds, not VERSION, small) takes the same four
 * steps in the proxy: frame it as the receiver will, forward it, append its
 * raw record to the trace, count it. relay() takes these steps for one
 * session's two sockets without the GIL, polling them itself, for as long as
 * every message is plain; anything else is handed back, exactly where it
 * stands, to the Python forwarding (vfioproxy/proxy/relay.py), which owns
 * every decision. What is restated here, and nowhere else in C:
 *
 *   - framing (protocol/header.py framed_body_length): the u32 size at
 *     offset 4; a size below 16 or above the negotiated limit is not framed
 *     here (handed back);
 *   - VERSION (protocol/negotiation.py is_version): command u16 at offset 2
 *     equal to 1 (handed back: it changes the framing limit);
 *   - the record (recorder/records.py PlainMessagePacker): the caller gives
 *     the packed parts that never change; this fills in seq and t as
 *     msgpack's shortest unsigned ints and the data as a bin, exactly what
 *     msgpack makes (tests compare the bytes).
 *
 * The trace file is shared by sessions: Appender is its lock and the state
 * every writer of it agrees on (fd, last seq, size, the allocated end); the
 * Python TraceWriter uses the same object, so a record from here and one
 * from Python are numbered and appended one after the other.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define HEADER_SIZE 16
#define SCM_MAX_FD 253
#define VERSION_COMMAND 1
#define RECORD_HEAD_MAX 256
#define KEEP 65536 /* the largest message the lane reads whole */ /* the packed parts that never change, and the rest of a record's head */

/* ------------------------------------------------------------------ Appender */

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mutex;
    int fd;                    /* the trace's fd; -1: closed */
    unsigned long long seq;    /* the seq of the last record written */
    long long size;            /* bytes in the file */
    long long reserved_end;    /* allocated on disk up to here */
    long long reserve;         /* bytes to keep free beyond a record written here */
    int fast;                  /* records may be appended here (not paused, no fsync) */
    long long inline_max;      /* the largest message recorded here */
} Appender;

static int Appender_init(Appender *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "", kwlist))
        return -1;
    self->fd = -1;
    self->seq = 0;
    self->size = 0;
    self->reserved_end = 0;
    self->reserve = 0;
    self->fast = 0;
    self->inline_max = 0;
    return 0;
}

static PyObject *Appender_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Appender *self = (Appender *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (pthread_mutex_init(&self->mutex, NULL) != 0) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_OSError, "pthread_mutex_init failed");
        return NULL;
    }
    self->fd = -1;
    return (PyObject *)self;
}

static void Appender_dealloc(Appender *self)
{
    pthread_mutex_destroy(&self->mutex);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Appender_acquire(Appender *self, PyObject *unused)
{
    if (pthread_mutex_trylock(&self->mutex) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&self->mutex);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_TRUE;
}

static PyObject *Appender_release(Appender *self, PyObject *unused)
{
    pthread_mutex_unlock(&self->mutex);
    Py_RETURN_NONE;
}

static PyObject *Appender_enter(Appender *self, PyObject *unused)
{
    Appender_acquire(self, NULL);
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *Appender_exit(Appender *self, PyObject *args)
{
    pthread_mutex_unlock(&self->mutex);
    Py_RETURN_FALSE;
}

static PyMethodDef Appender_methods[] = {
    {"acquire", (PyCFunction)Appender_acquire, METH_NOARGS, "Take the lock (waits without the GIL)."},
    {"release", (PyCFunction)Appender_release, METH_NOARGS, "Give the lock back."},
    {"__enter__", (PyCFunction)Appender_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Appender_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Appender_members[] = {
    {"fd", T_INT, offsetof(Appender, fd), 0, "the trace's fd (-1: closed)"},
    {"seq", T_ULONGLONG, offsetof(Appender, seq), 0, "the seq of the last record written"},
    {"size", T_LONGLONG, offsetof(Appender, size), 0, "bytes in the file"},
    {"reserved_end", T_LONGLONG, offsetof(Appender, reserved_end), 0, "allocated up to here"},
    {"reserve", T_LONGLONG, offsetof(Appender, reserve), 0, "room kept beyond a record"},
    {"fast", T_INT, offsetof(Appender, fast), 0, "records may be appended by relay()"},
    {"inline_max", T_LONGLONG, offsetof(Appender, inline_max), 0,
     "the largest message relay() records"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject AppenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vfioproxy.proxy._fastpath.Appender",
    .tp_doc = "A trace file's lock and the state its writers share (see the module docstring).",
    .tp_basicsize = sizeof(Appender),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Appender_new,
    .tp_init = (initproc)Appender_init,
    .tp_dealloc = (destructor)Appender_dealloc,
    .tp_methods = Appender_methods,
    .tp_members = Appender_members,
};

/* ------------------------------------------------------------------ records */

static size_t pack_uint(unsigned char *out, unsigned long long v)
{
    if (v < 0x80) {
        out[0] = (unsigned char)v;
        return 1;
    }
    if (v <= 0xff) {
        out[0] = 0xcc;
        out[1] = (unsigned char)v;
        return 2;
    }
    if (v <= 0xffff) {
        out[0] = 0xcd;
        out[1] = (unsigned char)(v >> 8);
        out[2] = (unsigned char)v;
        return 3;
    }
    if (v <= 0xffffffffULL) {
        out[0] = 0xce;
        for (int i = 0; i < 4; i++)
            out[1 + i] = (unsigned char)(v >> (24 - 8 * i));
        return 5;
    }
    out[0] = 0xcf;
    for (int i = 0; i < 8; i++)
        out[1 + i] = (unsigned char)(v >> (56 - 8 * i));
    return 9;
}

static size_t pack_bin_header(unsigned char *out, size_t n)
{
    if (n < 0x100) {
        out[0] = 0xc4;
        out[1] = (unsigned char)n;
        return 2;
    }
    if (n < 0x10000) {
        out[0] = 0xc5;
        out[1] = (unsigned char)(n >> 8);
        out[2] = (unsigned char)n;
        return 3;
    }
    out[0] = 0xc6;
    for (int i = 0; i < 4; i++)
        out[1 + i] = (unsigned char)(n >> (24 - 8 * i));
    return 5;
}

typedef struct {
    const char *head, *middle, *tail;
    Py_ssize_t head_len, middle_len, tail_len;
} Parts;

/* An event written with each message of a direction (fault injection's
 * inject event of zero delays): recorder/records.py EventPacker's parts;
 * seq, t and the message's index filled in. */
#define EVENT_MAX 2048
typedef struct {
    int on;
    const char *head, *middle, *before, *after;
    Py_ssize_t head_len, middle_len, before_len, after_len;
    unsigned long long index; /* the index of the next message */
} Event;

/* Append a message's record; 1 written, 0 not (no room, paused, closed,
 * too large, or the write failed or fell short: what it wrote is cut off
 * before anyone else appends, and when even that fails the file is closed,
 * as TraceWriter._cut_back does). Holds the appender's lock, never the GIL. */
static int append_record(Appender *app, const Parts *parts, Event *event,
                         unsigned long long t_ns, const char *data, size_t len)
{
    unsigned char head[RECORD_HEAD_MAX];
    unsigned char ev[EVENT_MAX];
    size_t n = 0, evn = 0;
    int result = 0;
    pthread_mutex_lock(&app->mutex);
    if (!app->fast || app->fd < 0 || (long long)len > app->inline_max)
        goto out;
    unsigned long long seq = app->seq + 1;
    memcpy(head, parts->head, (size_t)parts->head_len);
    n = (size_t)parts->head_len;
    n += pack_uint(head + n, seq);
    memcpy(head + n, parts->middle, (size_t)parts->middle_len);
    n += (size_t)parts->middle_len;
    n += pack_uint(head + n, t_ns);
    memcpy(head + n, parts->tail, (size_t)parts->tail_len);
    n += (size_t)parts->tail_len;
    n += pack_bin_header(head + n, len);
    if (event->on) {
        memcpy(ev, event->head, (size_t)event->head_len);
        evn = (size_t)event->head_len;
        evn += pack_uint(ev + evn, seq + 1);
        memcpy(ev + evn, event->middle, (size_t)event->middle_len);
        evn += (size_t)event->middle_len;
        evn += pack_uint(ev + evn, t_ns);
        memcpy(ev + evn, event->before, (size_t)event->before_len);
        evn += (size_t)event->before_len;
        evn += pack_uint(ev + evn, event->index);
        memcpy(ev + evn, event->after, (size_t)event->after_len);
        evn += (size_t)event->after_len;
    }
    long long total = (long long)(n + len + evn);
    if (app->size + total + app->reserve > app->reserved_end)
        goto out;
    struct iovec iov[3] = {{head, n}, {(void *)data, len}, {ev, evn}};
    ssize_t written = writev(app->fd, iov, 3);
    if (written == total) {
        app->seq = seq + (event->on ? 1 : 0);
        app->size += total;
        result = 1;
    } else if (ftruncate(app->fd, app->size) != 0) {
        close(app->fd);
        app->fd = -1;
        app->fast = 0;
    }
out:
    pthread_mutex_unlock(&app->mutex);
    return result;
}

/* ------------------------------------------------------------------ relay */

enum { YIELD = 0, HEADER = 1, MESSAGE = 2 };

typedef struct {
    int code;
    int leg;
    /* HEADER: what the header's recvmsg brought (and the body's recv, if tried) */
    char chunk[HEADER_SIZE];
    ssize_t chunk_len;
    union {
        char buf[CMSG_SPACE(SCM_MAX_FD * sizeof(int))];
        struct cmsghdr align;
    } control;
    size_t control_len;
    int flags;
    int error;
    int body_state; /* 0 not tried, 1 read (body_len bytes of it, 0: EOF), 2 error */
    ssize_t body_len;
    int body_error;
    /* MESSAGE: a framed message (in buf), the send's result, the record's */
    size_t length;
    ssize_t sent;
    int send_error;
    unsigned long long t_ns;
} Handoff;

static unsigned long long monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ULL + (unsigned long long)ts.tv_nsec;
}

/* The messages the lane reads whole are at most KEEP bytes (a larger one
 * is handed back after its header: copying it is what costs, not the
 * Python around it). Each thread keeps one buffer of that size across
 * calls (a call per handed-back message must not cost an allocation). */
static pthread_key_t kept_key; /* the thread's buffer, freed when the thread ends */

static char *kept_buffer(void)
{
    char *kept = pthread_getspecific(kept_key);
    if (kept == NULL) {
        if ((kept = malloc(KEEP)) == NULL)
            return NULL;
        if (pthread_setspecific(kept_key, kept) != 0) {
            free(kept);
            return NULL;
        }
    }
    return kept;
}

/* One message from leg `leg`'s socket. Returns 1 when it was forwarded and
 * recorded whole (counted), 0 when there was nothing to read, -1 when `h`
 * holds a handoff. */
static int step(int leg, int src, int dst, unsigned int max_size, size_t buffer_limit,
                int handback, unsigned long long commands, Appender *app, const Parts *parts,
                Event *event, char *buf, Handoff *h)
{
    struct iovec iov = {h->chunk, HEADER_SIZE};
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = h->control.buf;
    msg.msg_controllen = sizeof(h->control.buf);
    ssize_t k = recvmsg(src, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    h->leg = leg;
    h->body_state = 0;
    if (k < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return 0;
        h->code = HEADER;
        h->chunk_len = 0;
        h->control_len = 0;
        h->flags = 0;
        h->error = errno;
        return -1;
    }
    h->chunk_len = k;
    h->control_len = msg.msg_controllen;
    h->flags = msg.msg_flags;
    h->error = 0;
    h->code = HEADER;
    if (k != HEADER_SIZE || msg.msg_controllen || (msg.msg_flags & MSG_CTRUNC))
        return -1; /* short, fds, EOF: the Python reader's slow way */
    const unsigned char *hdr = (const unsigned char *)h->chunk;
    unsigned int command = (unsigned int)hdr[2] | (unsigned int)hdr[3] << 8;
    if ((handback & (1 << leg)) && (commands >> (command < 63 ? command : 63) & 1))
        return -1; /* fault rules or an interposition mode decide this message */
    if (command == VERSION_COMMAND)
        return -1; /* VERSION */
    uint32_t size = (uint32_t)hdr[4] | (uint32_t)hdr[5] << 8 | (uint32_t)hdr[6] << 16 |
                    (uint32_t)hdr[7] << 24;
    if (size < HEADER_SIZE || size > max_size || size > buffer_limit || size > KEEP)
        return -1; /* not framable here, streamed, or large enough that Python's
                      way costs nothing more: Python reads the body */
    size_t body_len = size - HEADER_SIZE;
    memcpy(buf, h->chunk, HEADER_SIZE);
    if (body_len) {
        ssize_t got = recv(src, buf + HEADER_SIZE, body_len, MSG_DONTWAIT);
        if (got != (ssize_t)body_len) { /* part of it, EOF, nothing yet, an error */
            if (got >= 0) {
                h->body_state = 1;
                h->body_len = got;
            } else {
                h->body_state = 2;
                h->body_error = errno == EWOULDBLOCK ? EAGAIN : errno;
                h->body_len = 0;
            }
            return -1;
        }
    }
    h->t_ns = monotonic_ns();
    h->length = size;
    h->sent = send(dst, buf, size, MSG_NOSIGNAL | MSG_DONTWAIT);
    h->send_error = h->sent < 0 ? (errno == EWOULDBLOCK ? EAGAIN : errno) : 0;
    h->code = MESSAGE;
    if (h->sent != (ssize_t)size)
        return -1;
    if (app != NULL) {
        if (!append_record(app, parts, event, h->t_ns, buf, size))
            return -1;
    }
    event->index++;
    return 1;
}

static int get_event(PyObject *obj, unsigned long long index, Event *event)
{
    event->on = 0;
    event->index = index;
    if (obj == Py_None)
        return 1;
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 4) {
        PyErr_SetString(PyExc_TypeError, "event parts must be a 4-tuple of bytes");
        return 0;
    }
    const char *ptr[4];
    Py_ssize_t len[4], total = 0;
    for (int i = 0; i < 4; i++) {
        PyObject *item = PyTuple_GET_ITEM(obj, i);
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "event parts must be bytes");
            return 0;
        }
        ptr[i] = PyBytes_AS_STRING(item);
        len[i] = PyBytes_GET_SIZE(item);
        total += len[i];
    }
    if (total > EVENT_MAX - 32) { /* room for seq, t and the index */
        PyErr_SetString(PyExc_ValueError, "event parts too long");
        return 0;
    }
    event->on = 1;
    event->head = ptr[0];
    event->head_len = len[0];
    event->middle = ptr[1];
    event->middle_len = len[1];
    event->before = ptr[2];
    event->before_len = len[2];
    event->after = ptr[3];
    event->after_len = len[3];
    return 1;
}

static int get_parts(PyObject *obj, Parts *parts)
{
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 3) {
        PyErr_SetString(PyExc_TypeError, "record parts must be a (head, middle, tail) tuple");
        return 0;
    }
    PyObject *items[3];
    for (int i = 0; i < 3; i++) {
        items[i] = PyTuple_GET_ITEM(obj, i);
        if (!PyBytes_Check(items[i])) {
            PyErr_SetString(PyExc_TypeError, "record parts must be bytes");
            return 0;
        }
    }
    parts->head = PyBytes_AS_STRING(items[0]);
    parts->head_len = PyBytes_GET_SIZE(items[0]);
    parts->middle = PyBytes_AS_STRING(items[1]);
    parts->middle_len = PyBytes_GET_SIZE(items[1]);
    parts->tail = PyBytes_AS_STRING(items[2]);
    parts->tail_len = PyBytes_GET_SIZE(items[2]);
    /* room left in the record's head for seq (9), t (9) and the bin header (5) */
    if (parts->head_len + parts->middle_len + parts->tail_len > RECORD_HEAD_MAX - 32) {
        PyErr_SetString(PyExc_ValueError, "record parts too long");
        return 0;
    }
    return 1;
}

static PyObject *ancillary_list(const Handoff *h)
{
    PyObject *list = PyList_New(0);
    if (list == NULL || h->control_len == 0)
        return list;
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_control = (void *)h->control.buf;
    msg.msg_controllen = h->control_len;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        Py_ssize_t n = (Py_ssize_t)(c->cmsg_len - CMSG_LEN(0));
        PyObject *item = Py_BuildValue("(iiy#)", c->cmsg_level, c->cmsg_type,
                                       (const char *)CMSG_DATA(c), n);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
}

/* Close the fds a handed-back header brought (when they cannot be handed back). */
static void close_fds(const Handoff *h)
{
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_control = (void *)h->control.buf;
    msg.msg_controllen = h->control_len;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            close(fd);
        }
    }
}

PyDoc_STRVAR(relay_doc,
"relay(client_fd, server_fd, wake_fd, max_message_size, buffer_limit, appender, c2s_parts,\n"
"      s2c_parts, c2s_event, s2c_event, c2s_index, s2c_index, handback, max_messages,\n"
"      idle_ms[, c2s_commands, s2c_commands]) -> tuple\n"
"\n"
"Forward and record plain messages between two non-blocking sockets until\n"
"something is not plain, wake_fd is readable, max_messages were handled, or\n"
"nothing came for idle_ms after one was handled. appender is None when\n"
"nothing is recorded; the parts are PlainMessagePacker.parts() per direction.\n"
"The events (None, or EventPacker.parts()) are written with each message of\n"
"their direction, numbered from its index (fault injection's zero delays).\n"
"handback: bit 0 (c2s), bit 1 (s2c): hand every header of that direction back\n"
"(fault rules decide its messages) whose command is in that direction's\n"
"commands: a mask, bit N for command N (bit 63 for 63 and above); all when\n"
"not given (an interposition mode sees only the commands it acts on).\n"
"\n"
"Returns (code, c2s_messages, c2s_bytes, s2c_messages, s2c_bytes, leg, ...):\n"
"  (0, counts..., pending): returned; pending is -1, 3 when wake_fd is\n"
"     readable, or a leg (2: poll itself) whose events the caller's own poll\n"
"     must see before it calls again;\n"
"  (1, counts..., leg, chunk, ancdata, flags, error, body, body_error): the\n"
"     header's recvmsg as the socket module gives it (error: its errno, 0 when\n"
"     it read), then body: None when the body was not read, else what one recv\n"
"     of it gave (b'' is EOF) or None with body_error its errno;\n"
"  (2, counts..., leg, data, t_ns, sent, send_error): a framed message,\n"
"     sent bytes of it went (send_error: the send's errno), not recorded.\n"
"The counts are the messages (and bytes) forwarded and recorded here.");

static PyObject *fastpath_relay(PyObject *module, PyObject *args)
{
    int fds[2], wake, handback, max_messages, idle_ms;
    unsigned int max_size;
    Py_ssize_t buffer_limit;
    unsigned long long index[2];
    unsigned long long commands[2] = {~0ULL, ~0ULL};
    PyObject *app_obj, *parts_obj[2], *event_obj[2];
    if (!PyArg_ParseTuple(args, "iiiInOOOOOKKiii|KK", &fds[0], &fds[1], &wake, &max_size,
                          &buffer_limit, &app_obj, &parts_obj[0], &parts_obj[1], &event_obj[0],
                          &event_obj[1], &index[0], &index[1], &handback, &max_messages,
                          &idle_ms, &commands[0], &commands[1]))
        return NULL;
    Event events[2];
    if (!get_event(event_obj[0], index[0], &events[0]) ||
        !get_event(event_obj[1], index[1], &events[1]))
        return NULL;
    Appender *app = NULL;
    Parts parts[2];
    if (app_obj != Py_None) {
        if (!PyObject_TypeCheck(app_obj, &AppenderType)) {
            PyErr_SetString(PyExc_TypeError, "appender must be an Appender or None");
            return NULL;
        }
        app = (Appender *)app_obj;
        if (!get_parts(parts_obj[0], &parts[0]) || !get_parts(parts_obj[1], &parts[1]))
            return NULL;
    }
    Handoff *h = PyMem_RawMalloc(sizeof(Handoff));
    char *buf = kept_buffer();
    if (h == NULL || buf == NULL) {
        PyMem_RawFree(h);
        return PyErr_NoMemory();
    }
    long long count[2][2] = {{0, 0}, {0, 0}};
    int handled = 0;
    h->code = YIELD;
    h->leg = -1;
    PyThreadState *ts = PyEval_SaveThread();
    struct pollfd p[3] = {{fds[0], POLLIN, 0}, {fds[1], POLLIN, 0}, {wake, POLLIN, 0}};
    int done = 0;
    int pending = -1; /* YIELD: a leg (2: poll itself, 3: wake_fd) the Python side must see */
    while (!done && pending < 0 && handled < max_messages) {
        int r = poll(p, 3, handled ? idle_ms : -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            pending = 2; /* the Python forwarding polls again and sees it */
            break;
        }
        if (r == 0)
            break;
        if (p[2].revents) {
            pending = 3;
            break;
        }
        for (int leg = 0; leg < 2 && !done; leg++) {
            if (!p[leg].revents)
                continue;
            int got = step(leg, fds[leg], fds[1 - leg], max_size, (size_t)buffer_limit,
                           handback, commands[leg], app, &parts[leg], &events[leg], buf, h);
            if (got > 0) {
                count[leg][0] += 1;
                count[leg][1] += (long long)h->length;
                handled++;
            } else if (got < 0) {
                done = 1;
            } else if (p[leg].revents & ~POLLIN) {
                pending = leg; /* nothing to read, and something else: the Python forwarding's */
                break;
            }
        }
    }
    PyEval_RestoreThread(ts);
    PyObject *result = NULL;
    if (done && h->code == HEADER) {
        PyObject *anc = ancillary_list(h);
        PyObject *body;
        if (h->body_state == 1) {
            body = PyBytes_FromStringAndSize(buf + HEADER_SIZE, h->body_len);
        } else {
            body = Py_None;
            Py_INCREF(body);
        }
        if (anc != NULL && body != NULL)
            result = Py_BuildValue("(iLLLLiy#OiiOi)", HEADER, count[0][0], count[0][1],
                                   count[1][0], count[1][1], h->leg, h->chunk, h->chunk_len,
                                   anc, h->flags, h->error, body,
                                   h->body_state == 2 ? h->body_error : 0);
        Py_XDECREF(anc);
        Py_XDECREF(body);
        if (result == NULL)
            close_fds(h); /* nobody else will: every fd is passed on or closed once */
    } else if (done && h->code == MESSAGE) {
        result = Py_BuildValue("(iLLLLiy#Kni)", MESSAGE, count[0][0], count[0][1], count[1][0],
                               count[1][1], h->leg, buf, (Py_ssize_t)h->length, h->t_ns,
                               h->sent < 0 ? (Py_ssize_t)0 : (Py_ssize_t)h->sent,
                               h->send_error);
    } else {
        result = Py_BuildValue("(iLLLLi)", YIELD, count[0][0], count[0][1], count[1][0],
                               count[1][1], pending);
    }
    PyMem_RawFree(h);
    return result;
}

static PyMethodDef module_methods[] = {
    {"relay", fastpath_relay, METH_VARARGS, relay_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "vfioproxy.proxy._fastpath",
    .m_doc = "The proxy's plain-message lane in C (see vfioproxy/proxy/fastpath.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&AppenderType) < 0)
        return NULL;
    if (pthread_key_create(&kept_key, free) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_key_create failed");
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    Py_INCREF(&AppenderType);
    if (PyModule_AddObject(module, "Appender", (PyObject *)&AppenderType) < 0) {
        Py_DECREF(&AppenderType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
