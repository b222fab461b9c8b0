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
 * has a negative field; OSError for a failed read (bytes read before it are in the buffer). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <unistd.h>

typedef struct {
    long long offset;
    Py_ssize_t length;
    Py_ssize_t at;
} run_t;

/* The runs as C structs, each checked against the buffer; NULL with an exception set. */
static run_t *parse_runs(PyObject *runs_obj, Py_ssize_t buffer_len, Py_ssize_t *count) {
    PyObject *seq = PySequence_Fast(runs_obj, "runs must be a sequence of tuples");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    run_t *runs = PyMem_New(run_t, n > 0 ? n : 1);
    if (runs == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
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
    Py_ssize_t total = 0;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    if (advise)
        for (Py_ssize_t i = 0; i < n; i++)
            (void)posix_fadvise(fd, (off_t)runs[i].offset, (off_t)runs[i].length,
                                POSIX_FADV_WILLNEED);  /* a hint: its failure changes nothing */
    for (Py_ssize_t i = 0; i < n && !failed; i++) {
        Py_ssize_t got = 0;
        while (got < runs[i].length) {
            ssize_t k = pread(fd, base + runs[i].at + got, (size_t)(runs[i].length - got),
                              (off_t)(runs[i].offset + got));
            if (k < 0) {
                if (errno == EINTR)
                    continue;
                failed = errno;
                break;
            }
            if (k == 0)
                break;
            got += k;
        }
        total += got;
        if (got < runs[i].length)
            break;
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(runs);
    PyBuffer_Release(&buf);
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
