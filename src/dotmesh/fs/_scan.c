/* A folder's entries with their lstat, in one call that holds the GIL only to build the result.
 *
 * Why: a commit with nothing changed is a walk over every file's stat. From Python that is an
 * os.stat_result per file (19 fields, float times) and the GIL taken back after each lstat;
 * here the whole folder is read (readdir + fstatat) with the GIL released, so a thread can list
 * the next folder while Python compares the last one with the stat cache.
 *
 * scan(path, nofollow=False) -> (folder, entries): each one (name, mode, ino, nlink, uid, gid,
 * size, mtime_ns, ctime_ns); the folder's own (named "") is taken with fstat before its entries
 * are read, so a change made to it during the listing shows in its ctime. Entries that vanish
 * between readdir and fstatat are left out; a folder that is gone or not a folder raises
 * FileNotFoundError / NotADirectoryError (ELOOP when following a symlink loop). Names
 * are decoded as os.fsdecode does (surrogateescape). ``nofollow``: a symlink at ``path`` is not
 * followed (NotADirectoryError): a folder swapped for a link mid-walk never leads outside.
 *
 * match(...) is the comparison's own hot path: the files of a listing whose stat matches their
 * stat cache entry become tree rows and cache hits here, the others go back to Python. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    size_t name_at; /* offset of the NUL-terminated name in the names buffer */
    struct stat st;
} entry_t;

typedef struct {
    entry_t *items;
    size_t count, cap;
    char *names;
    size_t used, room;
} listing_t;

static void listing_free(listing_t *l) {
    free(l->items);
    free(l->names);
}

/* 0, or an errno. Runs without the GIL. */
static int read_folder(const char *path, int nofollow, struct stat *own, listing_t *l) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC | (nofollow ? O_NOFOLLOW : 0));
    if (fd < 0)
        return errno == ELOOP && nofollow ? ENOTDIR : errno;
    /* Before the entries: a change to the folder after this shows in its ctime. */
    if (fstat(fd, own) != 0) {
        int e = errno;
        close(fd);
        return e;
    }
    DIR *d = fdopendir(fd);
    if (d == NULL) {
        int e = errno;
        close(fd);
        return e;
    }
    int err = 0;
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (de == NULL) {
            err = errno;
            break;
        }
        const char *n = de->d_name;
        if (n[0] == '.' && (n[1] == '\0' || (n[1] == '.' && n[2] == '\0')))
            continue;
        if (l->count == l->cap) {
            size_t cap = l->cap ? l->cap * 2 : 256;
            entry_t *items = realloc(l->items, cap * sizeof(entry_t));
            if (items == NULL) {
                err = ENOMEM;
                break;
            }
            l->items = items;
            l->cap = cap;
        }
        entry_t *e = &l->items[l->count];
        if (fstatat(fd, n, &e->st, AT_SYMLINK_NOFOLLOW) != 0) {
            if (errno == ENOENT)
                continue; /* removed since it was listed */
            err = errno;
            break;
        }
        size_t len = strlen(n) + 1;
        if (l->used + len > l->room) {
            size_t room = l->room ? l->room * 2 : 16384;
            while (room < l->used + len)
                room *= 2;
            char *names = realloc(l->names, room);
            if (names == NULL) {
                err = ENOMEM;
                break;
            }
            l->names = names;
            l->room = room;
        }
        memcpy(l->names + l->used, n, len);
        e->name_at = l->used;
        l->used += len;
        l->count++;
    }
    closedir(d);
    return err;
}

/* (name, mode, ino, nlink, uid, gid, size, mtime_ns, ctime_ns); steals ``name``. */
static PyObject *entry(PyObject *name, const struct stat *st) {
    return Py_BuildValue(
        "(NIKkIILLL)", name, (unsigned int)st->st_mode, (unsigned long long)st->st_ino,
        (unsigned long)st->st_nlink, (unsigned int)st->st_uid, (unsigned int)st->st_gid,
        (long long)st->st_size,
        (long long)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec,
        (long long)st->st_ctim.tv_sec * 1000000000LL + st->st_ctim.tv_nsec);
}

static PyObject *scan(PyObject *self, PyObject *args) {
    PyObject *arg, *encoded = NULL;
    int nofollow = 0;
    if (!PyArg_ParseTuple(args, "O|p", &arg, &nofollow))
        return NULL;
    if (!PyUnicode_FSConverter(arg, &encoded))
        return NULL;
    listing_t l = {0};
    struct stat own;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = read_folder(PyBytes_AS_STRING(encoded), nofollow, &own, &l);
    Py_END_ALLOW_THREADS
    if (err) {
        listing_free(&l);
        errno = err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, arg);
        Py_DECREF(encoded);
        return NULL;
    }
    Py_DECREF(encoded);
    PyObject *out = PyList_New((Py_ssize_t)l.count);
    if (out == NULL) {
        listing_free(&l);
        return NULL;
    }
    for (size_t i = 0; i < l.count; i++) {
        PyObject *row = entry(PyUnicode_DecodeFSDefault(l.names + l.items[i].name_at),
                              &l.items[i].st);
        if (row == NULL) {
            Py_DECREF(out);
            listing_free(&l);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, row);
    }
    listing_free(&l);
    return Py_BuildValue("(NN)", entry(PyUnicode_FromString(""), &own), out);
}

/* A lowercase hex str of a bytes object, as bytes.hex() makes it. */
static PyObject *hex_of(PyObject *raw) {
    static const char digits[] = "0123456789abcdef";
    Py_ssize_t n = PyBytes_GET_SIZE(raw);
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(raw);
    PyObject *out = PyUnicode_New(2 * n, 127);
    if (out == NULL)
        return NULL;
    Py_UCS1 *d = PyUnicode_1BYTE_DATA(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        d[2 * i] = (Py_UCS1)digits[b[i] >> 4];
        d[2 * i + 1] = (Py_UCS1)digits[b[i] & 15];
    }
    return out;
}

/* 1 if the cache entry ``old`` vouches for the listing entry ``e`` (same size, mtime, ctime
 * and inode, not a hint), 0 if not, -1 on error. */
static int vouches(PyObject *old, PyObject *e, long hint_only) {
    if (!PyTuple_Check(old) || PyTuple_GET_SIZE(old) != 6 || !PyBytes_Check(PyTuple_GET_ITEM(old, 4)))
        return 0;
    long flags = PyLong_AsLong(PyTuple_GET_ITEM(old, 5));
    if (flags == -1 && PyErr_Occurred())
        return -1;
    if (flags & hint_only)
        return 0;
    static const int pairs[4][2] = {{0, 6}, {1, 7}, {2, 8}, {3, 2}}; /* size, mtime, ctime, ino */
    for (int i = 0; i < 4; i++) {
        int same = PyObject_RichCompareBool(PyTuple_GET_ITEM(old, pairs[i][0]),
                                            PyTuple_GET_ITEM(e, pairs[i][1]), Py_EQ);
        if (same != 1)
            return same;
    }
    return 1;
}

/* The hot path of a commit's walk (snapshot._Walk.rows), for the regular files of one listing
 * with a single link whose stat matches their cache entry: each one's tree row is appended to
 * ``rows`` and its entry put in ``hits`` under its key (``prefix`` + its encoded name). Returns
 * (the other entries, in order, for the caller's loop; the size of the matched files; the
 * newest ctime among them). */
static PyObject *match(PyObject *self, PyObject *args) {
    PyObject *prefix, *entries, *cache, *hits, *rows, *file_kind;
    long hint_only, has_content, chunked;
    if (!PyArg_ParseTuple(args, "SO!O!O!O!Ulll", &prefix, &PyList_Type, &entries, &PyDict_Type,
                          &cache, &PyDict_Type, &hits, &PyList_Type, &rows, &file_kind,
                          &hint_only, &has_content, &chunked))
        return NULL;
    PyObject *rest = PyList_New(0);
    if (rest == NULL)
        return NULL;
    long long total = 0, newest = 0;
    /* Strong references throughout: comparing runs the operands' code, which for anything
     * but the ints of a listing and a decoded cache could change the list or the dict. */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(entries); i++) {
        PyObject *e = Py_NewRef(PyList_GET_ITEM(entries, i));
        PyObject *key = NULL, *encoded = NULL, *row = NULL, *old = NULL;
        int matched = 0;
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 9) {
            PyErr_SetString(PyExc_TypeError, "match: an entry is not a 9-tuple");
            goto fail;
        }
        long mode = PyLong_AsLong(PyTuple_GET_ITEM(e, 1));
        long nlink = PyLong_AsLong(PyTuple_GET_ITEM(e, 3));
        long long size = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 6));
        long long ctime = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 8));
        if (PyErr_Occurred())
            goto fail;
        if (S_ISREG(mode) && nlink <= 1) {
            encoded = PyUnicode_EncodeFSDefault(PyTuple_GET_ITEM(e, 0));
            if (encoded == NULL)
                goto fail;
            Py_ssize_t at = PyBytes_GET_SIZE(prefix), n = PyBytes_GET_SIZE(encoded);
            key = PyBytes_FromStringAndSize(NULL, at + n);
            if (key == NULL)
                goto fail;
            memcpy(PyBytes_AS_STRING(key), PyBytes_AS_STRING(prefix), at);
            memcpy(PyBytes_AS_STRING(key) + at, PyBytes_AS_STRING(encoded), n);
            old = PyDict_GetItemWithError(cache, key);
            if (old == NULL && PyErr_Occurred())
                goto fail;
            Py_XINCREF(old);
            matched = old == NULL ? 0 : vouches(old, e, hint_only);
            if (matched < 0)
                goto fail;
        }
        if (matched) {
            long flags = PyLong_AsLong(PyTuple_GET_ITEM(old, 5));
            PyObject *content = (flags & has_content) ? hex_of(PyTuple_GET_ITEM(old, 4))
                                                      : Py_NewRef(Py_None);
            if (content == NULL)
                goto fail;
            row = Py_BuildValue("[OONOOOONN]", PyTuple_GET_ITEM(e, 0), file_kind,
                                PyLong_FromLong(mode & 07777), PyTuple_GET_ITEM(e, 4),
                                PyTuple_GET_ITEM(e, 5), PyTuple_GET_ITEM(e, 7),
                                PyTuple_GET_ITEM(e, 6), content, PyLong_FromLong(flags & chunked));
            if (row == NULL || PyList_Append(rows, row) < 0 || PyDict_SetItem(hits, key, old) < 0)
                goto fail;
            total += size;
            if (ctime > newest)
                newest = ctime;
        } else if (PyList_Append(rest, e) < 0) {
            goto fail;
        }
        Py_XDECREF(encoded);
        Py_XDECREF(key);
        Py_XDECREF(row);
        Py_XDECREF(old);
        Py_DECREF(e);
        continue;
    fail:
        Py_XDECREF(encoded);
        Py_XDECREF(key);
        Py_XDECREF(row);
        Py_XDECREF(old);
        Py_DECREF(e);
        Py_DECREF(rest);
        return NULL;
    }
    return Py_BuildValue("(NLL)", rest, total, newest);
}

static PyMethodDef methods[] = {
    {"match", match, METH_VARARGS,
     "match(prefix, entries, cache, hits, rows, file_kind, hint_only, has_content, chunked) "
     "-> (rest, size, newest): the rows of the files whose stat matches the cache; the "
     "other entries are left to the caller."},
    {"scan", scan, METH_VARARGS,
     "scan(path, nofollow=False) -> (folder, [entry]), each (name, mode, ino, nlink, uid, "
     "gid, size, mtime_ns, ctime_ns): the folder's fstat and its entries' lstat, read with "
     "the GIL released."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scan", "A folder's entries with their lstat, in one call.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }
