/* A btrfs tree search's extent items as extents, in one call.
 *
 * Why: a paged file's extent map is read from its subvolume's tree at every commit (for the
 * file in the last commit's snapshot, in the new snapshot and, after its changed pages were
 * read from it, in the working folder). Random page writes leave about 1,300 more extents in
 * such a file per commit; with 21,000, decoding the items in Python (struct, then a tuple per
 * extent) took 20-27 ms of the 28-35 ms a map cost, the kernel's search 6-8 ms.
 *
 * items(body, count, ino) -> (extents, last_offset): ``body`` holds ``count`` search results
 * (btrfs_ioctl_search_header in this CPU's order, then a btrfs_file_extent_item, little
 * endian), each an EXTENT_DATA item of inode ``ino``. Each extent is (file offset, disk
 * address, length, FIEMAP-like flags), as fs/btrfs.py's ``extents`` maps them: holes are
 * left out; an inline extent is (offset, 0, its bytes, INLINE|NOT_ALIGNED); a compressed or
 * otherwise encoded one gives the address of its whole encoded extent (ENCODED); a
 * preallocated one is UNWRITTEN. ``last_offset``: the file offset of the last item (where the
 * next search starts). ValueError for an item of another inode or key, of an unknown form,
 * one that runs past the buffer or whose address would pass 2**64, or a negative count (the
 * caller then asks FIEMAP).
 *
 * common(old, new) compares two such maps' shared extents at C speed (see below).
 *
 * inodes_since(body, count, since) -> (inodes, folders, last_objectid): of ``count`` search
 * results of a subvolume's tree (any items), the objectids of the INODE_ITEMs whose
 * ``transid`` (the transaction that last wrote the inode: btrfs writes it with every change
 * to the inode, its data or its names) is past ``since``, and which of those are folders (by
 * the item's mode); and the objectid of the last result, past which the next search starts
 * (an inode's other items, its extents above all, tell nothing more). ValueError for a
 * result that runs past the buffer, an inode item too short to hold its mode, or a negative
 * count.
 *
 * ioctl(fd, request, buf) is fcntl.ioctl with a mutable buffer, but with the GIL released
 * while the kernel works: fcntl.ioctl holds it, and a tree search of a file with thousands
 * of extents keeps the kernel busy for milliseconds, while the commit's other reader waits
 * to run any Python. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <sys/ioctl.h>

#include <linux/btrfs.h>

#define EXTENT_DATA_KEY 108
#define HEADER_SIZE 32  /* transid, objectid, offset (u64); type, len (u32) */
#define FILE_EXTENT_SIZE 21  /* generation, ram_bytes (u64); compression, encryption (u8),
                                other_encoding (u16), type (u8) */
#define DISK_EXTENT_SIZE 32  /* disk_bytenr, disk_num_bytes, offset, num_bytes (u64) */
#define FLAG_INLINE (0x200 | 0x100)  /* FIEMAP_EXTENT_DATA_INLINE | NOT_ALIGNED */
#define FLAG_ENCODED 0x8
#define FLAG_UNWRITTEN 0x800

static uint64_t le64_at(const unsigned char *p) {  /* items are little endian on any CPU */
    uint64_t v = 0;
    for (int k = 7; k >= 0; k--)
        v = (v << 8) | p[k];
    return v;
}

static PyObject *extent(uint64_t offset, uint64_t address, uint64_t length, long flags) {
    return Py_BuildValue("(KKKl)", (unsigned long long)offset, (unsigned long long)address,
                         (unsigned long long)length, flags);
}

static PyObject *items(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer body;
    Py_ssize_t count;
    PyObject *ino_obj;
    if (!PyArg_ParseTuple(args, "y*nO!", &body, &count, &PyLong_Type, &ino_obj))
        return NULL;
    unsigned long long ino = PyLong_AsUnsignedLongLong(ino_obj);  /* no silent masking */
    if (ino == (unsigned long long)-1 && PyErr_Occurred()) {
        PyBuffer_Release(&body);
        return NULL;
    }
    if (count < 0) {
        PyBuffer_Release(&body);
        PyErr_SetString(PyExc_ValueError, "a negative count of search results");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        PyBuffer_Release(&body);
        return NULL;
    }
    const unsigned char *buf = body.buf;
    size_t size = (size_t)body.len, pos = 0;
    uint64_t offset = 0;
    const char *refusal = NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t objectid;
        uint32_t key_type, length;
        if (size - pos < HEADER_SIZE) {
            refusal = "a search result runs past its buffer";
            break;
        }
        memcpy(&objectid, buf + pos + 8, 8);  /* the header is in this CPU's order */
        memcpy(&offset, buf + pos + 16, 8);
        memcpy(&key_type, buf + pos + 24, 4);
        memcpy(&length, buf + pos + 28, 4);
        pos += HEADER_SIZE;
        if (size - pos < length) {
            refusal = "a search result runs past its buffer";
            break;
        }
        const unsigned char *item = buf + pos;
        pos += length;
        if (objectid != ino || key_type != EXTENT_DATA_KEY || length < FILE_EXTENT_SIZE) {
            refusal = "not a file extent item of this file";
            break;
        }
        uint64_t ram_bytes = le64_at(item + 8);
        unsigned char compression = item[16], encryption = item[17], kind = item[20];
        uint16_t other;
        memcpy(&other, item + 18, 2);
        long encoded = (compression || encryption || other) ? FLAG_ENCODED : 0;
        PyObject *e;
        if (kind == 0) {  /* inline: its bytes follow in the item */
            e = extent(offset, 0, ram_bytes, FLAG_INLINE | encoded);
        } else {
            if (length != FILE_EXTENT_SIZE + DISK_EXTENT_SIZE || (kind != 1 && kind != 2)) {
                refusal = "a file extent item of unknown form";
                break;
            }
            uint64_t disk = le64_at(item + FILE_EXTENT_SIZE);
            uint64_t within = le64_at(item + FILE_EXTENT_SIZE + 16);
            uint64_t num = le64_at(item + FILE_EXTENT_SIZE + 24);
            if (disk == 0 && kind == 1)  /* a hole */
                continue;
            if (!encoded && within > UINT64_MAX - disk) {  /* no address wraps around */
                refusal = "a file extent item past the end of the address space";
                break;
            }
            e = extent(offset, encoded ? disk : disk + within, num,
                       encoded | (kind == 2 ? FLAG_UNWRITTEN : 0));
        }
        if (e == NULL || PyList_Append(out, e) < 0) {
            Py_XDECREF(e);
            Py_DECREF(out);
            PyBuffer_Release(&body);
            return NULL;
        }
        Py_DECREF(e);
    }
    PyBuffer_Release(&body);
    if (refusal != NULL) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_ValueError, refusal);
        return NULL;
    }
    return Py_BuildValue("(NK)", out, (unsigned long long)offset);
}

/* common(old, new) -> (old_rest, new_rest, both): two extent maps, each sorted by file offset
 * with every offset once (as FIEMAP and a tree search give them), split into the extents both
 * hold identically and the rest of each, in order: a merge by offset, not a set. A map out of
 * order, or holding an offset twice, raises ValueError (the caller then splits by sets: the
 * walk after the split needs sorted maps, and a merge would pair such extents differently).
 * Extents must be tuples of four with an int offset, exactly: comparing them then runs no
 * Python code that could change the lists while they are read. */
static PyObject *offset_of(PyObject *e) {
    if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 4 ||
            !PyLong_CheckExact(PyTuple_GET_ITEM(e, 0))) {
        PyErr_SetString(PyExc_TypeError, "an extent is a tuple of four, from an int offset");
        return NULL;
    }
    return PyTuple_GET_ITEM(e, 0);
}

/* Whether ``at`` comes strictly after ``prev`` (NULL: the first); -1 with ValueError if not. */
static int in_order(PyObject *prev, PyObject *at) {
    if (prev == NULL)
        return 0;
    int after = PyObject_RichCompareBool(at, prev, Py_GT);
    if (after == 0)
        PyErr_SetString(PyExc_ValueError, "an extent map out of order");
    return after == 1 ? 0 : -1;
}

static PyObject *common(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *old, *new_;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &old, &PyList_Type, &new_))
        return NULL;
    PyObject *old_rest = PyList_New(0), *new_rest = PyList_New(0), *both = PyList_New(0);
    PyObject *prev_a = NULL, *prev_b = NULL;  /* borrowed: the lists are not changed */
    if (old_rest == NULL || new_rest == NULL || both == NULL)
        goto fail;
    Py_ssize_t i = 0, j = 0, n = PyList_GET_SIZE(old), m = PyList_GET_SIZE(new_);
    while (i < n || j < m) {
        PyObject *a = i < n ? PyList_GET_ITEM(old, i) : NULL;
        PyObject *b = j < m ? PyList_GET_ITEM(new_, j) : NULL;
        PyObject *oa = NULL, *ob = NULL;
        if (a != NULL && ((oa = offset_of(a)) == NULL || in_order(prev_a, oa) < 0))
            goto fail;
        if (b != NULL && ((ob = offset_of(b)) == NULL || in_order(prev_b, ob) < 0))
            goto fail;
        int order = 0;  /* <0: a first, >0: b first, 0: the same offset */
        if (a == NULL) {
            order = 1;
        } else if (b == NULL) {
            order = -1;
        } else {
            int lt = PyObject_RichCompareBool(oa, ob, Py_LT);
            int gt = lt == 0 ? PyObject_RichCompareBool(oa, ob, Py_GT) : 0;
            if (lt < 0 || gt < 0)
                goto fail;
            order = lt ? -1 : gt ? 1 : 0;
        }
        if (order < 0) {
            if (PyList_Append(old_rest, a) < 0)
                goto fail;
            prev_a = oa;
            i++;
            continue;
        }
        if (order > 0) {
            if (PyList_Append(new_rest, b) < 0)
                goto fail;
            prev_b = ob;
            j++;
            continue;
        }
        int same = PyObject_RichCompareBool(a, b, Py_EQ);
        if (same < 0)
            goto fail;
        if (same ? PyList_Append(both, a) < 0
                 : (PyList_Append(old_rest, a) < 0 || PyList_Append(new_rest, b) < 0))
            goto fail;
        prev_a = oa;
        prev_b = ob;
        i++;
        j++;
    }
    return Py_BuildValue("(NNN)", old_rest, new_rest, both);
fail:
    Py_XDECREF(old_rest);
    Py_XDECREF(new_rest);
    Py_XDECREF(both);
    return NULL;
}

#define INODE_ITEM_KEY 1
#define INODE_MODE_AT 52  /* generation, transid, size, nbytes, block_group (u64); nlink, uid,
                             gid (u32); then mode (u32), all little endian */
#define INODE_MODE_END 56

/* Inodes found by a search: their objectids, and whether each is a folder. */
struct found {
    uint64_t *ids;
    unsigned char *folder;
    size_t count, room;
};

static void found_free(struct found *f) {
    free(f->ids);
    free(f->folder);
}

static int found_add(struct found *f, uint64_t id, int folder) {
    if (f->count == f->room) {
        size_t room = f->room ? f->room * 2 : 256;
        uint64_t *ids = realloc(f->ids, room * sizeof *ids);
        if (ids == NULL)
            return -1;
        f->ids = ids;
        unsigned char *dirs = realloc(f->folder, room);
        if (dirs == NULL)
            return -1;
        f->folder = dirs;
        f->room = room;
    }
    f->ids[f->count] = id;
    f->folder[f->count++] = (unsigned char)folder;
    return 0;
}

/* The inode items of ``count`` search results in ``buf`` written after ``since`` go into
 * ``f``; ``*last`` is the last result's objectid. Returns NULL, or why the results were
 * refused; "" if memory ran out. Touches no Python object: runs without the GIL. */
static const char *parse_inodes(const unsigned char *buf, size_t size, uint64_t count,
                                uint64_t since, struct found *f, uint64_t *last) {
    size_t pos = 0;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t objectid;
        uint32_t key_type, length;
        if (size - pos < HEADER_SIZE)
            return "a search result runs past its buffer";
        memcpy(&objectid, buf + pos + 8, 8);  /* the header is in this CPU's order */
        memcpy(&key_type, buf + pos + 24, 4);
        memcpy(&length, buf + pos + 28, 4);
        pos += HEADER_SIZE;
        if (size - pos < length)
            return "a search result runs past its buffer";
        const unsigned char *item = buf + pos;
        pos += length;
        *last = objectid;
        if (key_type != INODE_ITEM_KEY)
            continue;
        if (length < INODE_MODE_END)
            return "an inode item too short to hold its mode";
        if (le64_at(item + 8) <= since)
            continue;
        uint32_t mode = (uint32_t)item[INODE_MODE_AT] | (uint32_t)item[INODE_MODE_AT + 1] << 8
                        | (uint32_t)item[INODE_MODE_AT + 2] << 16
                        | (uint32_t)item[INODE_MODE_AT + 3] << 24;
        if (found_add(f, objectid, (mode & 0170000) == 0040000) < 0)
            return "";
    }
    return NULL;
}

static PyObject *found_lists(struct found *f) {
    PyObject *all = PyList_New((Py_ssize_t)f->count), *folders = PyList_New(0);
    if (all == NULL || folders == NULL)
        goto fail;
    for (size_t i = 0; i < f->count; i++) {
        PyObject *ino = PyLong_FromUnsignedLongLong((unsigned long long)f->ids[i]);
        if (ino == NULL)
            goto fail;
        PyList_SET_ITEM(all, (Py_ssize_t)i, ino);  /* steals the reference */
        if (f->folder[i] && PyList_Append(folders, ino) < 0)
            goto fail;
    }
    return Py_BuildValue("(NN)", all, folders);
fail:
    Py_XDECREF(all);
    Py_XDECREF(folders);
    return NULL;
}

static PyObject *refused(const char *refusal) {
    if (*refusal == '\0')
        return PyErr_NoMemory();
    PyErr_SetString(PyExc_ValueError, refusal);
    return NULL;
}

/* inodes_since(body, count, since): see the top of this file. */
static PyObject *inodes_since(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer body;
    Py_ssize_t count;
    unsigned long long since;
    if (!PyArg_ParseTuple(args, "y*nK", &body, &count, &since))
        return NULL;
    if (count < 0) {
        PyBuffer_Release(&body);
        PyErr_SetString(PyExc_ValueError, "a negative count of search results");
        return NULL;
    }
    struct found f = {0};
    uint64_t last = 0;
    const char *refusal = parse_inodes(body.buf, (size_t)body.len, (uint64_t)count, since,
                                       &f, &last);
    PyBuffer_Release(&body);
    PyObject *lists = refusal == NULL ? found_lists(&f) : refused(refusal);
    found_free(&f);
    if (lists == NULL)
        return NULL;
    PyObject *out = Py_BuildValue("(OOK)", PyTuple_GET_ITEM(lists, 0),
                                  PyTuple_GET_ITEM(lists, 1), (unsigned long long)last);
    Py_DECREF(lists);
    return out;
}

#define SEARCH_BUFFER (64 << 10)
#define FIRST_INODE 256ULL
#define LAST_INODE (UINT64_MAX - 255)  /* BTRFS_LAST_FREE_OBJECTID */

/* changed_inodes(fd, since) -> (inodes, folders): every search of the subvolume of fd for
 * inodes written after transaction since, one after another with the GIL released once:
 * released and taken back per call, each return waited up to the switch interval for the
 * GIL while the commit's readers hashed (42 calls: 2-4 ms alone, 11-39 ms beside them).
 * OSError from the kernel (PermissionError without CAP_SYS_ADMIN); ValueError as
 * inodes_since. */
static PyObject *changed_inodes(PyObject *self, PyObject *args) {
    (void)self;
    int fd;
    unsigned long long since;
    if (!PyArg_ParseTuple(args, "iK", &fd, &since))
        return NULL;
    if (since == UINT64_MAX) {
        PyErr_SetString(PyExc_ValueError, "no transaction comes after the last one");
        return NULL;
    }
    struct btrfs_ioctl_search_args_v2 *sa = malloc(sizeof *sa + SEARCH_BUFFER);
    if (sa == NULL)
        return PyErr_NoMemory();
    struct found f = {0};
    const char *refusal = NULL;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    uint64_t start = FIRST_INODE;
    while (start <= LAST_INODE) {
        memset(&sa->key, 0, sizeof sa->key);
        sa->key.min_objectid = start;
        sa->key.max_objectid = LAST_INODE;
        sa->key.max_offset = UINT64_MAX;
        sa->key.min_transid = since + 1;
        sa->key.max_transid = UINT64_MAX;
        sa->key.max_type = 255;
        sa->key.nr_items = UINT32_MAX;
        sa->buf_size = SEARCH_BUFFER;
        if (ioctl(fd, BTRFS_IOC_TREE_SEARCH_V2, sa) < 0) {
            err = errno;
            break;
        }
        if (sa->key.nr_items == 0)
            break;
        uint64_t last = 0;
        refusal = parse_inodes((const unsigned char *)sa->buf, SEARCH_BUFFER, sa->key.nr_items,
                               since, &f, &last);
        if (refusal != NULL || last >= LAST_INODE)
            break;
        start = last + 1;
    }
    Py_END_ALLOW_THREADS
    free(sa);
    PyObject *out = NULL;
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else if (refusal != NULL) {
        refused(refusal);
    } else {
        out = found_lists(&f);
    }
    found_free(&f);
    return out;
}

static PyObject *ioctl_released(PyObject *self, PyObject *args) {
    (void)self;
    int fd;
    unsigned long request;
    Py_buffer buf;
    /* w*: a writable buffer, held (a bytearray cannot be resized) until released */
    if (!PyArg_ParseTuple(args, "ikw*", &fd, &request, &buf))
        return NULL;
    int ret, err;
    Py_BEGIN_ALLOW_THREADS
    ret = ioctl(fd, request, buf.buf);
    err = errno;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    if (ret < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(ret);
}

static PyMethodDef methods[] = {
    {"ioctl", ioctl_released, METH_VARARGS,
     "ioctl(fd, request, buf) -> int: ioctl(2) on a writable buffer, which the kernel may "
     "fill, with the GIL released; OSError from errno."},
    {"items", items, METH_VARARGS,
     "items(body, count, ino) -> (extents, last_offset): a btrfs tree search's "
     "EXTENT_DATA items of inode ino as (offset, address, length, flags), holes left out."},
    {"changed_inodes", changed_inodes, METH_VARARGS,
     "changed_inodes(fd, since) -> (inodes, folders): the inodes of the subvolume of fd "
     "written after transaction since, and which of them are folders, in one call."},
    {"inodes_since", inodes_since, METH_VARARGS,
     "inodes_since(body, count, since) -> (inodes, folders, last_objectid): the objectids of a "
     "tree search's inode items written after transaction since, those of them that are "
     "folders, and the last result's objectid."},
    {"common", common, METH_VARARGS,
     "common(old, new) -> (old_rest, new_rest, both): two extent maps sorted by offset (each "
     "offset once), split into the extents both hold identically and the rest of each; "
     "ValueError for a map out of order."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_extents",
    "A btrfs tree search's extent items, in one call; extent maps compared; ioctl without the GIL.",
    -1,
    methods,
};

PyMODINIT_FUNC PyInit__extents(void) { return PyModule_Create(&module); }
