/* Scattered reads of one file in one call, the GIL released once for all of them.
 *
 * Why: a 1% commit reads about 730 scattered 8 KiB pages of each database file, on a worker
 * thread, while the main thread walks the snapshot in Python. A read from Python releases
 * the GIL and must then wait for it: with another thread running Python, each wait lasts up
 * to the switch interval (5 ms). Measured here, 1,440 cached page reads took 4 ms alone and
 * 1.5 s beside a busy Python thread; a worker patching a file stalled for as long as the walk
 * ran.
 *
 * read_runs(fd, buffer, runs, advise) -> bytes_read: ``runs`` is a sequence of (file offset,
 * length, position in ``buffer``). With ``advise``, the kernel is first told of every run
 * (posix_fadvise WILLNEED: scattered pages of a snapshot come from the disk in its own
 * order). Each run is then read in full into ``buffer`` at its position; the reading stops
 * at the first run the file ends in. Returns the bytes read, so a caller that needs every
 * run compares it with their total. ValueError for a run that would not fit the buffer or
 * has a negative field; OSError for a failed read (bytes read before it are in the buffer).
 * A read interrupted by a signal runs Python's handlers (Ctrl-C raises) and goes on. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <unistd.h>

_Static_assert(sizeof(off_t) == 8, "file offsets must be 64 bits");

typedef struct {
    long long offset;
    Py_ssize_t length;
    Py_ssize_t at;
} run_t;

/* The runs as C structs, each checked against the buffer; NULL with an exception set. The
 * sequence is copied into a tuple first: parsing a field may run Python code (``__index__``),
 * which could otherwise shrink a list being read or free the item being parsed. */
static run_t *parse_runs(PyObject *runs_obj, Py_ssize_t buffer_len, Py_ssize_t *count) {
    PyObject *seq = PySequence_Tuple(runs_obj);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    run_t *runs = PyMem_New(run_t, n > 0 ? n : 1);
    if (runs == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(seq, i);
        run_t *r = &runs[i];
        if (!PyTuple_Check(item) ||
            !PyArg_ParseTuple(item, "Lnn;a run is (offset, length, position)", &r->offset,
                              &r->length, &r->at)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "a run is a tuple (offset, length, position)");
            goto fail;
        }
        if (r->offset < 0 || r->length < 0 || r->at < 0) {
            PyErr_Format(PyExc_ValueError, "run %zd has a negative field", i);
            goto fail;
        }
        if (r->at > buffer_len || r->length > buffer_len - r->at) {
            PyErr_Format(PyExc_ValueError, "run %zd does not fit the buffer", i);
            goto fail;
        }
        if (r->offset > LLONG_MAX - (long long)r->length) {
            PyErr_Format(PyExc_ValueError, "run %zd ends past the largest file offset", i);
            goto fail;
        }
    }
    Py_DECREF(seq);
    *count = n;
    return runs;
fail:
    Py_DECREF(seq);
    PyMem_Free(runs);
    return NULL;
}

/* Reads runs[*next..] on from *got bytes into its current run, without the GIL: returns 0
 * when done (the file ended or every run is read), EINTR when a signal came (to be looked at
 * with the GIL held, then called again), another errno when a read failed. */
static int read_some(int fd, char *base, const run_t *runs, Py_ssize_t n, Py_ssize_t *next,
                     Py_ssize_t *got, Py_ssize_t *total) {
    for (; *next < n; (*next)++, *got = 0) {
        const run_t *r = &runs[*next];
        while (*got < r->length) {
            ssize_t k = pread(fd, base + r->at + *got, (size_t)(r->length - *got),
                              (off_t)(r->offset + *got));
            if (k < 0)
                return errno;
            if (k == 0)
                return 0;  /* the file ends in this run: the rest is not read */
            *got += k;
            *total += k;
        }
    }
    return 0;
}

static PyObject *read_runs(PyObject *self, PyObject *args) {
    (void)self;
    int fd, advise;
    Py_buffer buf;
    PyObject *runs_obj;
    if (!PyArg_ParseTuple(args, "iw*Op", &fd, &buf, &runs_obj, &advise))
        return NULL;
    Py_ssize_t n = 0;
    run_t *runs = parse_runs(runs_obj, buf.len, &n);
    if (runs == NULL) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    char *base = (char *)buf.buf;
    Py_ssize_t total = 0, next = 0, got = 0;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    if (advise)
        for (Py_ssize_t i = 0; i < n; i++)
            if (runs[i].length > 0)  /* a length of 0 would mean "to the end of the file" */
                (void)posix_fadvise(fd, (off_t)runs[i].offset, (off_t)runs[i].length,
                                    POSIX_FADV_WILLNEED);  /* a hint: a failure changes nothing */
    Py_END_ALLOW_THREADS
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        failed = read_some(fd, base, runs, n, &next, &got, &total);
        Py_END_ALLOW_THREADS
        /* interrupted (a slow filesystem): Python's handlers run first, as os.pread's would;
         * Ctrl-C then raises here, anything else goes on reading */
        if (failed != EINTR || PyErr_CheckSignals() < 0)
            break;
    }
    PyMem_Free(runs);
    PyBuffer_Release(&buf);
    if (failed == EINTR)
        return NULL;  /* a signal handler raised */
    if (failed) {
        errno = failed;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(total);
}

static PyMethodDef methods[] = {
    {"read_runs", read_runs, METH_VARARGS,
     "read_runs(fd, buffer, runs, advise) -> bytes_read: read each (offset, length, position) "
     "run of the file into buffer, the GIL released once; stops where the file ends."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_reads", "Scattered reads of one file, in one call.", -1, methods,
};

PyMODINIT_FUNC PyInit__reads(void) { return PyModule_Create(&module); }
