/* The DATA path's byte loops in C, each one pass over the bytes it needs, and
 * the writeback of a batch's files in one call.
 *
 * find_dot_or_bare_lf_counted(buf, pos) -> (int, int)
 *     The offset of the first LF at or after pos that starts a line with a
 *     dot or lacks its CR, or -1: exactly re.compile(rb"\n(?:\.|(?<!\r\n))")
 *     .search(buf, pos).start() (the look at the byte before the LF may fall
 *     before pos, as the regex's lookbehind does); and the LFs passed before
 *     it (before the end of buf if it is -1): the reader's count of line
 *     ends, taken on its way.
 *
 * judge_lines(buf, start, end, width) -> (int, bool)
 *     The reader's line-length check over buf[start:end]: steps from CRLF to
 *     CRLF, at most width bytes at a time, each step found by looking back
 *     from the end of its window (so only each window's last line is read);
 *     returns where it stopped and whether a whole window held no CRLF (a
 *     line longer than width). The same steps as one bytes.rfind per window
 *     in Python (smtp/reader.py, judge_lines_py), without a call per window.
 *
 * to_lf_counted(body, crlf=-1) -> (bytes, int)
 *     body with every CRLF turned into LF (a bare CR or bare LF stays), and
 *     the result's LF count minus its CRLF count: exactly
 *     lf = body.replace(b"\r\n", b"\n"); (lf, lf.count(b"\n") - lf.count(b"\r\n")).
 *     crlf, if not negative, is the caller's count of CRLFs in body: then
 *     the result is allocated at its size without a counting pass (a wrong
 *     count only costs that pass: the copy checks its room). Releases the
 *     GIL past 64 KiB (body is immutable bytes).
 *
 * unstuff_to_lf(buf, start, dots, crlf) -> (bytes, int) or None
 *     The reader's raw body buf[start:] without the stuffing dots at the
 *     offsets in dots (ascending; each starts a line) and with every CRLF
 *     turned into LF, in one copy straight from the reader's buffer: the
 *     same result as to_lf_counted(b"".join(the slices between the dots)).
 *     crlf is the reader's count of CRLFs (the result is allocated at its
 *     size); None if that count was wrong. ValueError for a dot that is not
 *     at a line start. Releases the GIL past 64 KiB (the buffer is held
 *     exported, so it cannot be resized meanwhile).
 *
 * writeback(fds) -> None or (int, int)       (Linux only)
 *     sync_file_range(fd, 0, 0, WRITE) on every fd, then
 *     sync_file_range(fd, 0, 0, WAIT_BEFORE|WRITE|WAIT_AFTER) on each, with the
 *     GIL released once for all of them; None, or (index, errno) of the first
 *     call that failed (nothing after it is made; EINTR is retried). The same
 *     calls as FsOps.start_writeback then FsOps.wait_writeback per file (fsops.py),
 *     which go through ctypes one by one: a thread making them must win the
 *     GIL back after each, from an event loop that may be busy.
 *
 * The scan reads the buffer once; the conversion once when the count is
 * given, else twice (a memchr pass that counts, so that the result is
 * allocated at its size, then the copy). The
 * Python fallbacks (smtp/reader.py, smtp/handler.py) give the same results
 * and the tests compare the two.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define RELEASE_GIL_ABOVE (64 * 1024)

/* The first LF at or after pos that starts a dot line or lacks its CR (-1
 * if none), and in *lfs the LFs passed before it: in [pos, found), or in
 * [pos, n) when none is found. */
static Py_ssize_t
scan(const char *s, Py_ssize_t n, Py_ssize_t pos, Py_ssize_t *lfs)
{
    Py_ssize_t count = 0;
    if (pos < 0) {
        pos = 0;
    }
    while (pos < n) {
        const char *p = memchr(s + pos, '\n', (size_t)(n - pos));
        if (p == NULL) {
            break;
        }
        Py_ssize_t j = p - s;
        if ((j + 1 < n && s[j + 1] == '.') || j == 0 || s[j - 1] != '\r') {
            *lfs = count;
            return j;
        }
        count++;
        pos = j + 1;
    }
    *lfs = count;
    return -1;
}

static int
scan_args(const char *name, PyObject *const *args, Py_ssize_t nargs, Py_buffer *view,
          Py_ssize_t *pos)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s(buf, pos) takes 2 arguments", name);
        return -1;
    }
    *pos = PyLong_AsSsize_t(args[1]);
    if (*pos == -1 && PyErr_Occurred()) {
        return -1;
    }
    return PyObject_GetBuffer(args[0], view, PyBUF_SIMPLE);
}

static PyObject *
find_dot_or_bare_lf_counted(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t pos, lfs;
    if (scan_args("find_dot_or_bare_lf_counted", args, nargs, &view, &pos) < 0) {
        return NULL;
    }
    Py_ssize_t found = scan((const char *)view.buf, view.len, pos, &lfs);
    PyBuffer_Release(&view);
    return Py_BuildValue("(nn)", found, lfs);
}

/* The offset of the last CRLF that lies wholly in [lo, hi), or -1:
 * bytes.rfind(b"\r\n", lo, hi). Walks back from hi, so it reads only the
 * window's last line. */
static Py_ssize_t
rfind_crlf(const char *s, Py_ssize_t lo, Py_ssize_t hi)
{
    for (Py_ssize_t p = hi - 1; p > lo; p--) {
        if (s[p] == '\n' && s[p - 1] == '\r') {
            return p - 1;
        }
    }
    return -1;
}

static PyObject *
judge_lines(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "judge_lines(buf, start, end, width) takes 4 arguments");
        return NULL;
    }
    Py_ssize_t v[3];
    for (int k = 0; k < 3; k++) {
        v[k] = PyLong_AsSsize_t(args[k + 1]);
        if (v[k] == -1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    Py_ssize_t start = v[0], end = v[1], w = v[2];
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (start < 0 || start > end || end > view.len || w < 1) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError,
                     "judge_lines: need 0 <= start <= end <= len(buf) and width >= 1, "
                     "got start=%zd end=%zd len=%zd width=%zd",
                     start, end, view.len, w);
        return NULL;
    }
    const char *buf = (const char *)view.buf;
    int too_long = 0;
    while (end - start >= w) {
        Py_ssize_t i = rfind_crlf(buf, start, start + w);
        if (i < 0) {
            too_long = 1;
            break;
        }
        start = i + 2;
    }
    if (!too_long) {
        Py_ssize_t i = rfind_crlf(buf, start, end);
        if (i >= 0) {
            start = i + 2;
        }
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nO)", start, too_long ? Py_True : Py_False);
}

/* Copies s into d (room for cap bytes) with every CRLF turned into LF; the
 * result's length, or -1 if it would not fit in cap (nothing past d + cap is
 * written). *extra: the result's LF count minus its CRLF count. */
static Py_ssize_t
convert(const char *s, Py_ssize_t n, char *d, Py_ssize_t cap, Py_ssize_t *extra)
{
    Py_ssize_t i = 0, k = 0, lf = 0, crlf = 0;
    while (i < n) {
        const char *p = memchr(s + i, '\n', (size_t)(n - i));
        if (p == NULL) {
            if (k + (n - i) > cap) {
                return -1;
            }
            memcpy(d + k, s + i, (size_t)(n - i));
            k += n - i;
            break;
        }
        Py_ssize_t j = p - s, end = j;
        /* s[i - 1] is the previous LF, so a CR before this LF lies at or after i. */
        if (j > i && s[j - 1] == '\r') {
            end = j - 1;
            if (end > i && s[end - 1] == '\r') {
                crlf++; /* "\r\r\n" leaves a CRLF in the result */
            }
        }
        /* A CR kept right before this LF would itself have been deleted, so
         * the case above is the only one that leaves a CRLF in the result. */
        if (k + (end - i) + 1 > cap) {
            return -1;
        }
        memcpy(d + k, s + i, (size_t)(end - i));
        k += end - i;
        d[k++] = '\n';
        lf++;
        i = j + 1;
    }
    *extra = lf - crlf;
    return k;
}

/* The CRLFs of s: the bytes convert() will drop. */
static Py_ssize_t
count_crlf(const char *s, Py_ssize_t n)
{
    Py_ssize_t i = 1, c = 0;
    while (i < n) {
        const char *p = memchr(s + i, '\n', (size_t)(n - i));
        if (p == NULL) {
            break;
        }
        c += p[-1] == '\r';
        i = p - s + 1;
    }
    return c;
}

/* convert() over buf[start:] in pieces, skipping the byte at each dot
 * offset; -1 if the pieces do not fill exactly cap bytes. Each dot starts a
 * line, so no CRLF straddles two pieces and the result is convert() of the
 * joined pieces. */
static Py_ssize_t
convert_pieces(const char *s, Py_ssize_t start, Py_ssize_t n, const Py_ssize_t *dots,
               Py_ssize_t ndots, char *d, Py_ssize_t cap, Py_ssize_t *extra)
{
    Py_ssize_t k = 0, at = start, total = 0;
    for (Py_ssize_t i = 0; i <= ndots; i++) {
        Py_ssize_t end = i < ndots ? dots[i] : n, piece_extra = 0;
        Py_ssize_t w = convert(s + at, end - at, d + k, cap - k, &piece_extra);
        if (w < 0) {
            return -1;
        }
        k += w;
        total += piece_extra;
        at = end + 1;
    }
    *extra = total;
    return k == cap ? k : -1;
}

/* One allocation of cap bytes and the conversion of s[start:n] (without the
 * bytes at dots) into it; NULL with no error set if the result would not be
 * cap bytes (a wrong count from the caller). Releases the GIL past 64 KiB. */
static PyObject *
convert_into_new(const char *s, Py_ssize_t start, Py_ssize_t n, const Py_ssize_t *dots,
                 Py_ssize_t ndots, Py_ssize_t cap, Py_ssize_t *extra)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, cap);
    if (out == NULL) {
        return NULL;
    }
    char *d = PyBytes_AS_STRING(out);
    Py_ssize_t k;
    if (n > RELEASE_GIL_ABOVE) {
        Py_BEGIN_ALLOW_THREADS
        k = convert_pieces(s, start, n, dots, ndots, d, cap, extra);
        Py_END_ALLOW_THREADS
    }
    else {
        k = convert_pieces(s, start, n, dots, ndots, d, cap, extra);
    }
    if (k < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* convert_into_new() of all of s, dropping drop CRs; NULL if drop is wrong. */
static PyObject *
to_lf_into_new(const char *s, Py_ssize_t n, Py_ssize_t drop, Py_ssize_t *extra)
{
    if (drop < 0 || drop > n / 2) { /* each dropped CR comes with its LF */
        return NULL;
    }
    return convert_into_new(s, 0, n, NULL, 0, n - drop, extra);
}

static PyObject *
to_lf_counted(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "to_lf_counted(body, crlf=-1) takes 1 or 2 arguments");
        return NULL;
    }
    PyObject *body = args[0];
    if (!PyBytes_Check(body)) {
        PyErr_Format(PyExc_TypeError, "to_lf_counted() needs bytes, not %.100s",
                     Py_TYPE(body)->tp_name);
        return NULL;
    }
    Py_ssize_t hint = -1;
    if (nargs == 2) {
        hint = PyLong_AsSsize_t(args[1]);
        if (hint == -1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    Py_ssize_t n = PyBytes_GET_SIZE(body), extra;
    const char *s = PyBytes_AS_STRING(body);
    /* With the caller's count of CRLFs (the reader's scan counted them) the
     * result is allocated at its size at once; a wrong count is caught (the
     * copy never runs past the allocation) and the body is counted here. */
    if (hint >= 0) {
        PyObject *out = to_lf_into_new(s, n, hint, &extra);
        if (out != NULL) {
            return Py_BuildValue("(Nn)", out, extra);
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    /* Counted first so that the result is allocated at its size: shrinking a
     * big one afterwards (realloc) cost more than this pass, in fresh pages
     * for every message. */
    Py_ssize_t drop;
    if (n > RELEASE_GIL_ABOVE) {
        Py_BEGIN_ALLOW_THREADS
        drop = count_crlf(s, n);
        Py_END_ALLOW_THREADS
    }
    else {
        drop = count_crlf(s, n);
    }
    PyObject *out = to_lf_into_new(s, n, drop, &extra);
    if (out == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_SystemError, "to_lf_counted: CRLF count and copy disagree");
        }
        return NULL;
    }
    return Py_BuildValue("(Nn)", out, extra);
}

static PyObject *
unstuff_to_lf(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "unstuff_to_lf(buf, start, dots, crlf) takes 4 arguments");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t crlf = PyLong_AsSsize_t(args[3]);
    if (crlf == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyList_Check(args[2])) {
        PyErr_Format(PyExc_TypeError, "unstuff_to_lf() needs a list of dots, not %.100s",
                     Py_TYPE(args[2])->tp_name);
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t *dots = NULL;
    const char *s = view.buf;
    Py_ssize_t n = view.len, ndots = PyList_GET_SIZE(args[2]);
    if (start < 0 || start > n) {
        PyErr_SetString(PyExc_ValueError, "unstuff_to_lf: start out of range");
        goto done;
    }
    dots = PyMem_New(Py_ssize_t, ndots > 0 ? ndots : 1);
    if (dots == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < ndots; i++) {
        Py_ssize_t at = PyLong_AsSsize_t(PyList_GET_ITEM(args[2], i));
        if (at == -1 && PyErr_Occurred()) {
            goto done;
        }
        Py_ssize_t floor = i > 0 ? dots[i - 1] + 1 : start;
        if (at < floor || at >= n || s[at] != '.' || (at > start && s[at - 1] != '\n')) {
            PyErr_Format(PyExc_ValueError, "unstuff_to_lf: no stuffing dot at %zd", at);
            goto done;
        }
        dots[i] = at;
    }
    /* crlf checked before it is subtracted: PY_SSIZE_T_MIN would overflow. */
    if (crlf < 0 || crlf > (n - start) - ndots) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t extra = 0;
    PyObject *out = convert_into_new(s, start, n, dots, ndots, (n - start) - ndots - crlf, &extra);
    if (out != NULL) {
        result = Py_BuildValue("(Nn)", out, extra);
    }
    else if (!PyErr_Occurred()) {
        result = Py_NewRef(Py_None);
    }
done:
    PyMem_Free(dots);
    PyBuffer_Release(&view);
    return result;
}

#ifdef __linux__
#include <errno.h>
#include <fcntl.h>

static PyObject *
writeback(PyObject *Py_UNUSED(module), PyObject *arg)
{
    /* A tuple (the same object for a tuple): an item's __index__ can neither
     * shrink it nor free the items still to convert, as it could a list's. */
    PyObject *fast = PySequence_Fast(arg, "writeback(fds): fds must be a sequence of ints");
    if (fast == NULL) {
        return NULL;
    }
    PyObject *seq = PyTuple_Check(fast) ? Py_NewRef(fast) : PySequence_Tuple(fast);
    Py_DECREF(fast);
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    int *fds = PyMem_New(int, n > 0 ? n : 1);
    if (fds == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int overflow = 0;
        long fd = PyLong_AsLongAndOverflow(PyTuple_GET_ITEM(seq, i), &overflow);
        if (fd == -1 && PyErr_Occurred()) {
            goto fail;
        }
        if (overflow || fd < INT_MIN || fd > INT_MAX) {
            PyErr_SetString(PyExc_OverflowError, "writeback(fds): fd out of range");
            goto fail;
        }
        fds[i] = (int)fd;
    }
    Py_DECREF(seq);
    Py_ssize_t failed = -1;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    const unsigned int wait_all = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE
                                  | SYNC_FILE_RANGE_WAIT_AFTER;
    for (int pass = 0; pass < 2 && failed < 0; pass++) {
        unsigned int flags = pass == 0 ? SYNC_FILE_RANGE_WRITE : wait_all;
        for (Py_ssize_t i = 0; i < n && failed < 0; i++) {
            int rc;
            do {  /* a signal is no failure: retried, as Python retries its own calls */
                rc = sync_file_range(fds[i], 0, 0, flags);
            } while (rc != 0 && errno == EINTR);
            if (rc != 0) {
                failed = i;
                err = errno;
            }
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(fds);
    if (failed < 0) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(ni)", failed, err);
fail:
    Py_DECREF(seq);
    PyMem_Free(fds);
    return NULL;
}
#endif

static PyMethodDef methods[] = {
    {"find_dot_or_bare_lf_counted", (PyCFunction)(void (*)(void))find_dot_or_bare_lf_counted,
     METH_FASTCALL,
     "(first LF at or after pos that starts a dot line or lacks its CR, or -1; LFs before it)."},
    {"judge_lines", (PyCFunction)(void (*)(void))judge_lines, METH_FASTCALL,
     "(start of the first line not proven <= width bytes, whether a window had no CRLF)."},
    {"unstuff_to_lf", (PyCFunction)(void (*)(void))unstuff_to_lf, METH_FASTCALL,
     "(raw body without its stuffing dots, CRLF turned into LF, W - S), or None for a wrong crlf."},
    {"to_lf_counted", (PyCFunction)(void (*)(void))to_lf_counted, METH_FASTCALL,
     "(body with CRLF turned into LF, its LF count minus its CRLF count); crlf: its CRLF count if known."},
#ifdef __linux__
    {"writeback", writeback, METH_O,
     "sync_file_range WRITE on every fd, then WAIT_BEFORE|WRITE|WAIT_AFTER on each, "
     "without the GIL: None, or (index, errno) of the first that failed."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "delivery_executor._speedups",
    "The DATA path's byte loops and the batch writeback in C (optional: pure-Python fallbacks exist).", 0, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
