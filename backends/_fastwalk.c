/*
 * backends._fastwalk -- exact, parallel, race-safe directory-tree usage walker.
 *
 * tree_usage(path, threads=1, max_open_dirs=0) -> (entries, size_bytes, allocated_bytes, errors, chain_reopens)
 *
 * Semantics (identical to the pure-Python fallback in backends/walk.py):
 *   entries / size_bytes: every entry strictly below the root (lstat, symlinks never followed).
 *   allocated_bytes:      st_blocks*512 of the root and every entry below it, non-directories with
 *                         st_nlink > 1 counted once per (st_dev, st_ino) -- i.e. `du -s -B1 root`.
 *   errors:               entries that vanished before lstat, directories that could not be opened
 *                         (gone, replaced by a symlink/file, EACCES, ...) or read.  Skipped, not fatal.
 *
 * Design:
 *   - Nothing is ever resolved by path.  The root is opened with O_DIRECTORY|O_NOFOLLOW; every other
 *     directory is opened with openat(parent_fd, name, O_RDONLY|O_DIRECTORY|O_NOFOLLOW|O_CLOEXEC), so a
 *     directory swapped for a symlink mid-walk makes openat fail (ELOOP/ENOTDIR -> error) instead of
 *     leading the walker outside the tree.  After opening, fstat() must report the (st_dev, st_ino) that
 *     the parent's fstatat() saw, otherwise the directory was swapped and is skipped as an error.
 *   - Work unit = "node": a directory that was lstat'ed but not yet opened.  It points to its parent
 *     node, whose fd stays open ("parked") until all its child nodes have been opened, so children are
 *     opened relative to their parent's fd without any path.  Nodes live on one mutex-protected LIFO
 *     stack shared by a small pthread pool; the GIL is released for the whole walk.  LIFO order keeps
 *     the walk roughly depth-first, so the number of parked fds stays near (depth x threads) and the
 *     stack never needs recursion (no depth limit).
 *   - fd cap: at most max_open_dirs parked fds.  Beyond that a finished directory closes its fd instead
 *     of parking it; its children are then opened by re-walking the node chain from the nearest ancestor
 *     that still has an fd (the root always does), one openat(O_NOFOLLOW) per component, verifying each
 *     component's (st_dev, st_ino) against what was recorded when it was first lstat'ed.  Slower, but
 *     only needed for pathological deep-and-bushy trees, and just as safe.
 *   - Directories are read with getdents64 in 64 KiB chunks (Linux; fdopendir/readdir elsewhere); each
 *     chunk is sorted by inode number before lstat-ing (as gnulib fts does), and child directories are
 *     pushed so the lowest inode is popped first, which keeps cold-cache inode-table reads moving
 *     forward.  Counters are per thread; hard-link candidates (non-dir, st_nlink > 1) are appended to a
 *     per-thread vector and de-duplicated once at the end by sorting on (st_dev, st_ino) -- exact, and
 *     no shared hash set to lock during the walk.
 *   - open/openat/fstatat/getdents64 retry on EINTR (network filesystems), like Python (PEP 475).
 *   - A node is freed when it has been processed and all its children are freed (refcount), so ancestor
 *     chains needed for re-opening are always valid; names/dev/ino/parent are immutable after creation
 *     and only fd/pending/refs/stack are touched, under the mutex.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#if defined(__linux__) && !defined(FW_NO_GETDENTS) /* -DFW_NO_GETDENTS tests the portable path */
#include <sys/syscall.h>
#define FW_USE_GETDENTS 1
#endif

#define DIR_FLAGS (O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
#define MAX_THREADS 64
#define GETDENTS_BUF (64 * 1024)
#define SORT_MIN_ENTRIES 16

typedef struct node {
    struct node *parent; /* NULL for the root */
    struct node *next;   /* LIFO stack link */
    int fd;              /* parked fd for children to openat() from, -1 if none */
    int is_root;
    size_t pending;      /* children published but not yet opened */
    size_t refs;         /* 1 until processed + number of live children (+1 held by the caller for root) */
    dev_t dev;
    ino_t ino;
    char name[];         /* NUL-terminated entry name */
} node;

typedef struct {
    uint64_t dev;
    uint64_t ino;
    uint64_t bytes;
} linkrec;

/* Child directories found while scanning one directory, in scan (inode) order. */
typedef struct {
    node *head, *tail;
    size_t count;
} childlist;

typedef struct walker {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    node *stack;
    int active;  /* workers currently processing a node */
    int waiting; /* workers blocked on cv */
    int abort;   /* out of memory: stop everything */
    size_t parked;
    size_t max_parked;
} walker;

typedef struct {
    walker *wk;
    uint64_t entries, size, alloc, errors, reopens;
    linkrec *links;
    size_t nlinks, caplinks;
    int oom;
#ifdef FW_USE_GETDENTS
    char *buf;
    struct fw_dirent64 **ents;
    size_t entscap;
#endif
} worker;

#ifdef FW_USE_GETDENTS
struct fw_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};
#endif

static node *
node_new(node *parent, const char *name, size_t namelen, dev_t dev, ino_t ino)
{
    node *n = malloc(sizeof(node) + namelen + 1);
    if (n == NULL)
        return NULL;
    n->parent = parent;
    n->next = NULL;
    n->fd = -1;
    n->is_root = 0;
    n->pending = 0;
    n->refs = 1;
    n->dev = dev;
    n->ino = ino;
    memcpy(n->name, name, namelen);
    n->name[namelen] = '\0';
    return n;
}

/* Drop one reference; free nodes whose count reaches zero, cascading to ancestors.  Caller holds mu
 * (or is the only thread left).  A node reaching zero has no pending children, so its fd is closed. */
static void
node_release(node *n)
{
    while (n != NULL && --n->refs == 0) {
        node *p = n->parent;
        free(n);
        n = p;
    }
}

/* EINTR retries: network filesystems (NFS/CephFS/FUSE) can interrupt these; Python retries them too (PEP 475). */
static int
openat_dir(int dfd, const char *name)
{
    int fd;
    do {
        fd = openat(dfd, name, DIR_FLAGS);
    } while (fd < 0 && errno == EINTR);
    return fd;
}

static int
lstat_at(int dfd, const char *name, struct stat *st)
{
    int rc;
    do {
        rc = fstatat(dfd, name, st, AT_SYMLINK_NOFOLLOW);
    } while (rc != 0 && errno == EINTR);
    return rc;
}

static int
is_dot(const char *name)
{
    return name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'));
}

/* lstat one entry and account for it.  Returns -1 on out-of-memory. */
static int
handle_entry(worker *w, int dfd, const char *name, node *parent, childlist *kids)
{
    struct stat st;
    if (lstat_at(dfd, name, &st) != 0) {
        w->errors++; /* vanished (ENOENT) or unreadable: skip */
        return 0;
    }
    w->entries++;
    w->size += (uint64_t)st.st_size;
    uint64_t bytes = (uint64_t)st.st_blocks * 512u;
    if (!S_ISDIR(st.st_mode) && st.st_nlink > 1) {
        if (w->nlinks == w->caplinks) {
            size_t ncap = w->caplinks ? w->caplinks * 2 : 256;
            linkrec *nl = realloc(w->links, ncap * sizeof(linkrec));
            if (nl == NULL)
                return -1;
            w->links = nl;
            w->caplinks = ncap;
        }
        linkrec *r = &w->links[w->nlinks++];
        r->dev = (uint64_t)st.st_dev;
        r->ino = (uint64_t)st.st_ino;
        r->bytes = bytes;
    }
    else {
        w->alloc += bytes;
    }
    if (S_ISDIR(st.st_mode)) {
        node *c = node_new(parent, name, strlen(name), st.st_dev, st.st_ino);
        if (c == NULL)
            return -1;
        if (kids->tail != NULL)
            kids->tail->next = c;
        else
            kids->head = c;
        kids->tail = c;
        kids->count++;
    }
    return 0;
}

#ifdef FW_USE_GETDENTS
static int
cmp_dirent_ino(const void *a, const void *b)
{
    uint64_t x = (*(struct fw_dirent64 *const *)a)->d_ino;
    uint64_t y = (*(struct fw_dirent64 *const *)b)->d_ino;
    return (x > y) - (x < y);
}
#endif

/* Read directory fd (owned by the caller) and lstat every entry.  Child directories are returned as a
 * linked list of fresh nodes.  Returns -1 on out-of-memory. */
static int
scan_dir(worker *w, node *n, int fd, childlist *kids)
{
#ifdef FW_USE_GETDENTS
    if (w->buf == NULL) {
        w->buf = malloc(GETDENTS_BUF);
        if (w->buf == NULL)
            return -1;
    }
    for (;;) {
        long nread = syscall(SYS_getdents64, fd, w->buf, GETDENTS_BUF);
        if (nread < 0) {
            if (errno == EINTR)
                continue;
            w->errors++;
            return 0;
        }
        if (nread == 0)
            return 0;
        size_t count = 0;
        for (long off = 0; off < nread;) {
            struct fw_dirent64 *d = (struct fw_dirent64 *)(w->buf + off);
            off += d->d_reclen;
            if (is_dot(d->d_name))
                continue;
            if (count == w->entscap) {
                size_t ncap = w->entscap ? w->entscap * 2 : 1024;
                struct fw_dirent64 **ne = realloc(w->ents, ncap * sizeof(*ne));
                if (ne == NULL)
                    return -1;
                w->ents = ne;
                w->entscap = ncap;
            }
            w->ents[count++] = d;
        }
        if (count >= SORT_MIN_ENTRIES)
            qsort(w->ents, count, sizeof(*w->ents), cmp_dirent_ino);
        for (size_t i = 0; i < count; i++) {
            if (handle_entry(w, fd, w->ents[i]->d_name, n, kids) != 0)
                return -1;
        }
    }
#else
    int dfd = dup(fd);
    if (dfd < 0) {
        w->errors++;
        return 0;
    }
    DIR *dir = fdopendir(dfd);
    if (dir == NULL) {
        close(dfd);
        w->errors++;
        return 0;
    }
    for (;;) {
        errno = 0;
        struct dirent *d = readdir(dir);
        if (d == NULL) {
            if (errno != 0)
                w->errors++;
            break;
        }
        if (is_dot(d->d_name))
            continue;
        if (handle_entry(w, fd, d->d_name, n, kids) != 0) {
            closedir(dir);
            return -1;
        }
    }
    closedir(dir);
    return 0;
#endif
}

/* Open `fd` must refer to the directory recorded in n (same dev/ino), else close it and fail. */
static int
verify_dir(int fd, const node *n)
{
    struct stat st;
    if (fd < 0)
        return -1;
    if (fstat(fd, &st) != 0 || st.st_dev != n->dev || st.st_ino != n->ino) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Open n's parent by re-walking the chain below `anc` (an ancestor whose fd was dup'ed into anc_fd),
 * then open n itself.  Consumes anc_fd.  Every component is opened with O_NOFOLLOW and verified. */
static int
reopen_via_chain(node *anc, int anc_fd, node *n)
{
    size_t depth = 0;
    for (node *x = n->parent; x != anc; x = x->parent)
        depth++;
    node **path = malloc((depth ? depth : 1) * sizeof(node *));
    if (path == NULL) {
        close(anc_fd);
        errno = ENOMEM;
        return -1;
    }
    size_t i = depth;
    for (node *x = n->parent; x != anc; x = x->parent)
        path[--i] = x;
    int cur = anc_fd;
    for (i = 0; i < depth && cur >= 0; i++) {
        int nfd = openat_dir(cur, path[i]->name);
        close(cur);
        cur = verify_dir(nfd, path[i]);
    }
    free(path);
    if (cur < 0)
        return -1;
    int fd = openat_dir(cur, n->name);
    close(cur);
    return fd;
}

static void *
worker_main(void *arg)
{
    worker *w = arg;
    walker *wk = w->wk;
    int to_close[2];
    int nclose = 0;

    pthread_mutex_lock(&wk->mu);
    for (;;) {
        while (wk->stack == NULL && wk->active > 0 && !wk->abort) {
            wk->waiting++;
            pthread_cond_wait(&wk->cv, &wk->mu);
            wk->waiting--;
        }
        if (wk->stack == NULL || wk->abort)
            break;
        node *n = wk->stack;
        wk->stack = n->next;
        n->next = NULL;
        wk->active++;

        int base = -1, anc_fd = -1;
        node *anc = NULL;
        if (!n->is_root) {
            base = n->parent->fd; /* stable: parent->pending > 0 until we report back */
            if (base < 0) {
                for (anc = n->parent->parent; anc->fd < 0; anc = anc->parent)
                    ; /* terminates: the root's fd is open for the whole walk */
                anc_fd = fcntl(anc->fd, F_DUPFD_CLOEXEC, 0);
            }
        }
        pthread_mutex_unlock(&wk->mu);

        for (int i = 0; i < nclose; i++)
            close(to_close[i]);
        nclose = 0;

        int fd;
        if (n->is_root)
            fd = n->fd;
        else if (base >= 0)
            fd = verify_dir(openat_dir(base, n->name), n);
        else if (anc_fd >= 0) {
            w->reopens++;
            fd = verify_dir(reopen_via_chain(anc, anc_fd, n), n);
        }
        else
            fd = -1;

        childlist kids = {NULL, NULL, 0};
        if (fd < 0)
            w->errors++;
        else if (scan_dir(w, n, fd, &kids) != 0)
            w->oom = 1;

        pthread_mutex_lock(&wk->mu);
        if (!n->is_root) {
            node *p = n->parent;
            if (--p->pending == 0 && p->fd >= 0 && !p->is_root) {
                to_close[nclose++] = p->fd;
                p->fd = -1;
                wk->parked--;
            }
        }
        if (kids.count > 0) {
            n->pending = kids.count;
            n->refs += kids.count;
            if (!n->is_root) {
                if (wk->parked < wk->max_parked) {
                    n->fd = fd;
                    wk->parked++;
                }
                else {
                    to_close[nclose++] = fd; /* children will re-walk the chain */
                }
            }
            /* Lowest inode on top: the next pops read the disk forward, not backward. */
            kids.tail->next = wk->stack;
            wk->stack = kids.head;
            if (wk->waiting > 0)
                pthread_cond_broadcast(&wk->cv);
        }
        else if (fd >= 0 && !n->is_root) {
            to_close[nclose++] = fd;
        }
        node_release(n);
        wk->active--;
        if (w->oom)
            wk->abort = 1;
        if ((wk->stack == NULL && wk->active == 0) || wk->abort)
            pthread_cond_broadcast(&wk->cv);
    }
    pthread_cond_broadcast(&wk->cv);
    pthread_mutex_unlock(&wk->mu);
    for (int i = 0; i < nclose; i++)
        close(to_close[i]);
    return NULL;
}

static int
cmp_linkrec(const void *a, const void *b)
{
    const linkrec *x = a, *y = b;
    if (x->dev != y->dev)
        return (x->dev > y->dev) - (x->dev < y->dev);
    return (x->ino > y->ino) - (x->ino < y->ino);
}

static size_t
default_max_parked(void)
{
    struct rlimit rl;
    rlim_t lim = 1024;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
        lim = rl.rlim_cur;
    lim /= 4;
    if (lim > 1024)
        lim = 1024;
    if (lim < 16)
        lim = 16;
    return (size_t)lim;
}

typedef struct {
    uint64_t entries, size, alloc, errors, reopens;
    int oom;
} walk_result;

/* Walk the already-opened root directory.  Runs without the GIL. */
static void
walk(int rootfd, const struct stat *rootst, int nthreads, size_t max_parked, walk_result *res)
{
    walker wk;
    worker workers[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started = 0;

    memset(res, 0, sizeof(*res));
    memset(&wk, 0, sizeof(wk));
    memset(workers, 0, sizeof(workers));
    pthread_mutex_init(&wk.mu, NULL);
    pthread_cond_init(&wk.cv, NULL);
    wk.max_parked = max_parked;

    node *root = node_new(NULL, "", 0, rootst->st_dev, rootst->st_ino);
    if (root == NULL) {
        res->oom = 1;
        goto out;
    }
    root->is_root = 1;
    root->fd = rootfd;
    root->refs = 2; /* processing + ours: freed below, never inside a worker */
    wk.stack = root;

    for (int i = 0; i < nthreads; i++)
        workers[i].wk = &wk;
    for (int i = 1; i < nthreads; i++) {
        if (pthread_create(&tids[i], NULL, worker_main, &workers[i]) != 0)
            break;
        started = i;
    }
    worker_main(&workers[0]);
    for (int i = 1; i <= started; i++)
        pthread_join(tids[i], NULL);

    /* After an abort, drain unprocessed nodes so every parked fd gets closed. */
    while (wk.stack != NULL) {
        node *n = wk.stack;
        wk.stack = n->next;
        node *p = n->parent;
        if (--p->pending == 0 && p->fd >= 0 && !p->is_root) {
            close(p->fd);
            p->fd = -1;
        }
        node_release(n);
    }
    node_release(root);

    size_t nlinks = 0;
    for (int i = 0; i < nthreads; i++) {
        res->entries += workers[i].entries;
        res->size += workers[i].size;
        res->alloc += workers[i].alloc;
        res->errors += workers[i].errors;
        res->reopens += workers[i].reopens;
        res->oom |= workers[i].oom;
        nlinks += workers[i].nlinks;
    }
    res->alloc += (uint64_t)rootst->st_blocks * 512u;

    if (nlinks > 0 && !res->oom) {
        linkrec *all = malloc(nlinks * sizeof(linkrec));
        if (all == NULL) {
            res->oom = 1;
        }
        else {
            size_t k = 0;
            for (int i = 0; i < nthreads; i++) {
                if (workers[i].nlinks) {
                    memcpy(all + k, workers[i].links, workers[i].nlinks * sizeof(linkrec));
                    k += workers[i].nlinks;
                }
            }
            qsort(all, nlinks, sizeof(linkrec), cmp_linkrec);
            for (size_t i = 0; i < nlinks; i++) {
                if (i == 0 || all[i].dev != all[i - 1].dev || all[i].ino != all[i - 1].ino)
                    res->alloc += all[i].bytes;
            }
            free(all);
        }
    }

out:
    for (int i = 0; i < nthreads; i++) {
        free(workers[i].links);
#ifdef FW_USE_GETDENTS
        free(workers[i].buf);
        free(workers[i].ents);
#endif
    }
    pthread_cond_destroy(&wk.cv);
    pthread_mutex_destroy(&wk.mu);
}

static PyObject *
fw_tree_usage(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"path", "threads", "max_open_dirs", NULL};
    PyObject *pathobj;
    PyObject *pathbytes = NULL;
    int threads = 1;
    Py_ssize_t max_open_dirs = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|in:tree_usage", kwlist, &pathobj, &threads,
                                     &max_open_dirs))
        return NULL;
    if (threads < 1 || threads > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be in 1..%d", MAX_THREADS);
        return NULL;
    }
    if (max_open_dirs < 0) {
        PyErr_SetString(PyExc_ValueError, "max_open_dirs must be >= 0");
        return NULL;
    }
    if (!PyUnicode_FSConverter(pathobj, &pathbytes))
        return NULL;
    const char *path = PyBytes_AS_STRING(pathbytes);
    size_t max_parked = max_open_dirs > 0 ? (size_t)max_open_dirs : default_max_parked();

    int rootfd, saved_errno = 0;
    struct stat rootst;
    walk_result res;
    memset(&res, 0, sizeof(res));

    Py_BEGIN_ALLOW_THREADS
    do {
        rootfd = open(path, DIR_FLAGS);
    } while (rootfd < 0 && errno == EINTR);
    if (rootfd < 0) {
        saved_errno = errno;
    }
    else if (fstat(rootfd, &rootst) != 0) {
        saved_errno = errno;
        close(rootfd);
        rootfd = -1;
    }
    else {
        walk(rootfd, &rootst, threads, max_parked, &res);
        close(rootfd);
    }
    Py_END_ALLOW_THREADS

    Py_DECREF(pathbytes);
    if (rootfd < 0) {
        errno = saved_errno;
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, pathobj);
    }
    if (res.oom)
        return PyErr_NoMemory();
    return Py_BuildValue("(KKKKK)", (unsigned long long)res.entries, (unsigned long long)res.size,
                         (unsigned long long)res.alloc, (unsigned long long)res.errors,
                         (unsigned long long)res.reopens);
}

static PyMethodDef fw_methods[] = {
    {"tree_usage", (PyCFunction)(void (*)(void))fw_tree_usage, METH_VARARGS | METH_KEYWORDS,
     "tree_usage(path, threads=1, max_open_dirs=0)\n"
     "    -> (entries, size_bytes, allocated_bytes, errors, chain_reopens)\n\n"
     "Exact parallel usage walk; see backends/walk.py for semantics. Releases the GIL.\n"
     "chain_reopens counts directories opened by re-walking from an ancestor (fd cap reached)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fw_module = {
    PyModuleDef_HEAD_INIT,
    "backends._fastwalk",
    "Parallel fd-based directory usage walker (C accelerator for backends.walk).",
    -1,
    fw_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__fastwalk(void)
{
    return PyModule_Create(&fw_module);
}
