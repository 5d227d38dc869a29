/* One directory's own entries, counted with the GIL released (the usage engine's hot loop).
 *
 * read(fd) -> (entries, size, alloc, subdirs, links, newest)
 *   fd       an open directory (not consumed; read through a dup)
 *   entries  number of entries (".", ".." excluded) that could be lstat'ed
 *   size     sum of their st_size
 *   alloc    sum of st_blocks*512, except non-directories with st_nlink > 1
 *   subdirs  [(name, st_ino, st_size, st_blocks*512)] of the subdirectories
 *   links    [(st_dev, st_ino, st_blocks*512, st_size, st_nlink)] of non-directories with st_nlink > 1
 *   newest   the latest st_ctime (seconds, float) of the non-directories, 0.0 if none: a file written
 *            lately may still change st_blocks at writeback, with no event (the engine re-reads it)
 * read_path(root_fd, relpath: bytes) -> (own_ino, own_size, own_alloc, counts)
 *   the same for the directory at relpath below root_fd ("" = root_fd itself), opened with openat2
 *   RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS (never leaving the tree, never through a link); None when it is
 *   gone or is no longer a directory. One call per directory: no Python work between the syscalls.
 * Exactly what agent/engine/usage/aggregates.py computes in Python when this module is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
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

typedef struct {
    unsigned long long entries, size, alloc;
    double newest;
    items subdirs, links;
} counts;

/* Count the entries of an open directory; GIL not needed. Returns 0 or an errno. */
static int count_dir(int fd, counts *c) {
    int err = 0;
    int dfd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    DIR *dir = dfd >= 0 ? fdopendir(dfd) : NULL;
    if (!dir) {
        err = errno;
        if (dfd >= 0)
            close(dfd);
        return err;
    }
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(dir);
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
        c->entries++;
        c->size += (unsigned long long)st.st_size;
        if (S_ISDIR(st.st_mode)) {
            c->alloc += blocks;
            item it = {strdup(n), st.st_dev, st.st_ino, (unsigned long long)st.st_size, blocks, st.st_nlink};
            if (!it.name || push(&c->subdirs, it) != 0) {
                free(it.name);
                err = ENOMEM;
                break;
            }
            continue;
        }
        double ct = (double)st.st_ctim.tv_sec + (double)st.st_ctim.tv_nsec * 1e-9;
        if (ct > c->newest)
            c->newest = ct;
        if (st.st_nlink > 1) {
            item it = {NULL, st.st_dev, st.st_ino, (unsigned long long)st.st_size, blocks, st.st_nlink};
            if (push(&c->links, it) != 0) {
                err = ENOMEM;
                break;
            }
        } else {
            c->alloc += blocks;
        }
    }
    closedir(dir);
    return err;
}

/* (entries, size, alloc, subdirs, links, newest) as Python objects; frees the C lists. */
static PyObject *build(counts *c) {
    PyObject *sub = PyList_New((Py_ssize_t)c->subdirs.n);
    PyObject *lnk = PyList_New((Py_ssize_t)c->links.n);
    if (!sub || !lnk)
        goto fail;
    for (size_t i = 0; i < c->subdirs.n; i++) {
        item *it = &c->subdirs.v[i];
        PyObject *name = PyUnicode_DecodeFSDefault(it->name);
        if (!name)
            goto fail;
        PyObject *t = Py_BuildValue("(NKKK)", name, it->ino, it->size, it->alloc);
        if (!t)
            goto fail;
        PyList_SET_ITEM(sub, (Py_ssize_t)i, t);
    }
    for (size_t i = 0; i < c->links.n; i++) {
        item *it = &c->links.v[i];
        PyObject *t = Py_BuildValue("(KKKKK)", it->dev, it->ino, it->alloc, it->size, it->nlink);
        if (!t)
            goto fail;
        PyList_SET_ITEM(lnk, (Py_ssize_t)i, t);
    }
    drop(&c->subdirs);
    drop(&c->links);
    return Py_BuildValue("(KKKNNd)", c->entries, c->size, c->alloc, sub, lnk, c->newest);
fail:
    Py_XDECREF(sub);
    Py_XDECREF(lnk);
    drop(&c->subdirs);
    drop(&c->links);
    return NULL;
}

static PyObject *dr_read(PyObject *self, PyObject *args) {
    int fd, err;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    counts c = {0};
    Py_BEGIN_ALLOW_THREADS
    err = count_dir(fd, &c);
    Py_END_ALLOW_THREADS
    if (err) {
        drop(&c.subdirs);
        drop(&c.links);
        errno = err;
        return PyErr_SetFromErrno(err == ENOMEM ? PyExc_MemoryError : PyExc_OSError);
    }
    return build(&c);
}

static PyObject *dr_read_path(PyObject *self, PyObject *args) {
    int root_fd, err = 0, fd = -1;
    const char *path;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "iy#", &root_fd, &path, &len))
        return NULL;
    if ((Py_ssize_t)strlen(path) != len) {
        PyErr_SetString(PyExc_ValueError, "relpath contains a NUL byte");
        return NULL;
    }
    counts c = {0};
    struct stat own;
    Py_BEGIN_ALLOW_THREADS
    if (len == 0) {
        fd = openat(root_fd, ".", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    } else {
        struct open_how how = {0};
        how.flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
        how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS;
        for (int i = 0; i < 16; i++) {
            fd = (int)syscall(SYS_openat2, root_fd, path, &how, sizeof how);
            if (fd >= 0 || (errno != EAGAIN && errno != EINTR))
                break;
        }
    }
    if (fd < 0) {
        err = errno;
    } else {
        if (fstat(fd, &own) != 0)
            err = errno;
        else
            err = count_dir(fd, &c);
        close(fd);
    }
    Py_END_ALLOW_THREADS
    if (err) {
        drop(&c.subdirs);
        drop(&c.links);
        if (err == ENOENT || err == ENOTDIR || err == ELOOP)
            Py_RETURN_NONE; /* gone, or a link / non-directory stands there now */
        errno = err;
        return PyErr_SetFromErrnoWithFilename(err == ENOMEM ? PyExc_MemoryError : PyExc_OSError, path);
    }
    PyObject *counted = build(&c);
    if (!counted)
        return NULL;
    PyObject *res = Py_BuildValue("(KKKO)", (unsigned long long)own.st_ino, (unsigned long long)own.st_size,
                                  (unsigned long long)own.st_blocks * 512ULL, counted);
    Py_DECREF(counted);
    return res;
}

static PyMethodDef dr_methods[] = {
    {"read", dr_read, METH_VARARGS, "read(fd) -> (entries, size, alloc, subdirs, links, newest) of one directory"},
    {"read_path", dr_read_path, METH_VARARGS, "read_path(root_fd, relpath) -> (ino, size, alloc, counts) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef dr_module = {PyModuleDef_HEAD_INIT, "_dirread", NULL, -1, dr_methods};

PyMODINIT_FUNC PyInit__dirread(void) {
    PyObject *m = PyModule_Create(&dr_module);
    /* 2: counts end with ``newest`` (aggregates.py refuses an older build and reads in Python instead) */
    if (m && PyModule_AddIntConstant(m, "ABI", 2) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
