/* One directory's own entries, counted with the GIL released (the usage engine's hot loop).
 *
 * read(fd) -> (entries, size, alloc, subdirs, links)
 *   fd       an open directory (not consumed; read through a dup)
 *   entries  number of entries (".", ".." excluded) that could be lstat'ed
 *   size     sum of their st_size
 *   alloc    sum of st_blocks*512, except non-directories with st_nlink > 1
 *   subdirs  [(name, st_ino, st_size, st_blocks*512)] of the subdirectories
 *   links    [(st_dev, st_ino, st_blocks*512, st_size, st_nlink)] of non-directories with st_nlink > 1
 * Exactly what agent/usage_engine/aggregates.py computes in Python when this module is not built.
 */
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
    char *name; /* NULL for a link */
    unsigned long long dev, ino, size, alloc, nlink;
} item;

typedef struct {
    item *v;
    size_t n, cap;
} items;

static int push(items *a, item it) {
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 16;
        item *v = realloc(a->v, cap * sizeof(item));
        if (!v)
            return -1;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = it;
    return 0;
}

static void drop(items *a) {
    for (size_t i = 0; i < a->n; i++)
        free(a->v[i].name);
    free(a->v);
}

static PyObject *dr_read(PyObject *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    unsigned long long entries = 0, size = 0, alloc = 0;
    items subdirs = {0}, links = {0};
    int err = 0;

    Py_BEGIN_ALLOW_THREADS
    int dfd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    DIR *dir = dfd >= 0 ? fdopendir(dfd) : NULL;
    if (!dir) {
        err = errno;
        if (dfd >= 0)
            close(dfd);
    } else {
        struct dirent *de;
        for (;;) {
            errno = 0;
            de = readdir(dir);
            if (!de) {
                err = errno;
                break;
            }
            const char *n = de->d_name;
            if (n[0] == '.' && (n[1] == 0 || (n[1] == '.' && n[2] == 0)))
                continue;
            struct stat st;
            if (fstatat(dfd, n, &st, AT_SYMLINK_NOFOLLOW) != 0)
                continue; /* vanished between readdir and lstat: an event follows */
            unsigned long long blocks = (unsigned long long)st.st_blocks * 512ULL;
            entries++;
            size += (unsigned long long)st.st_size;
            if (S_ISDIR(st.st_mode)) {
                alloc += blocks;
                item it = {strdup(n), st.st_dev, st.st_ino, (unsigned long long)st.st_size, blocks, st.st_nlink};
                if (!it.name || push(&subdirs, it) != 0) {
                    free(it.name);
                    err = ENOMEM;
                    break;
                }
            } else if (st.st_nlink > 1) {
                item it = {NULL, st.st_dev, st.st_ino, (unsigned long long)st.st_size, blocks, st.st_nlink};
                if (push(&links, it) != 0) {
                    err = ENOMEM;
                    break;
                }
            } else {
                alloc += blocks;
            }
        }
        closedir(dir);
    }
    Py_END_ALLOW_THREADS

    if (err) {
        drop(&subdirs);
        drop(&links);
        errno = err;
        return PyErr_SetFromErrno(err == ENOMEM ? PyExc_MemoryError : PyExc_OSError);
    }
    PyObject *sub = PyList_New((Py_ssize_t)subdirs.n);
    PyObject *lnk = PyList_New((Py_ssize_t)links.n);
    if (!sub || !lnk)
        goto fail;
    for (size_t i = 0; i < subdirs.n; i++) {
        item *it = &subdirs.v[i];
        PyObject *name = PyUnicode_DecodeFSDefault(it->name);
        if (!name)
            goto fail;
        PyObject *t = Py_BuildValue("(NKKK)", name, it->ino, it->size, it->alloc);
        if (!t)
            goto fail;
        PyList_SET_ITEM(sub, (Py_ssize_t)i, t);
    }
    for (size_t i = 0; i < links.n; i++) {
        item *it = &links.v[i];
        PyObject *t = Py_BuildValue("(KKKKK)", it->dev, it->ino, it->alloc, it->size, it->nlink);
        if (!t)
            goto fail;
        PyList_SET_ITEM(lnk, (Py_ssize_t)i, t);
    }
    drop(&subdirs);
    drop(&links);
    return Py_BuildValue("(KKKNN)", entries, size, alloc, sub, lnk);
fail:
    Py_XDECREF(sub);
    Py_XDECREF(lnk);
    drop(&subdirs);
    drop(&links);
    return NULL;
}

static PyMethodDef dr_methods[] = {
    {"read", dr_read, METH_VARARGS, "read(fd) -> (entries, size, alloc, subdirs, links) of one directory"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef dr_module = {PyModuleDef_HEAD_INIT, "_dirread", NULL, -1, dr_methods};

PyMODINIT_FUNC PyInit__dirread(void) { return PyModule_Create(&dr_module); }
