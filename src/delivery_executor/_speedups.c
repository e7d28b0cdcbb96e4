/* The DATA path's two byte loops in C: each is one memchr-driven pass.
 *
 * find_dot_or_bare_lf(buf, pos) -> int
 *     The offset of the first LF at or after pos that starts a line with a
 *     dot or lacks its CR, or -1: exactly re.compile(rb"\n(?:\.|(?<!\r\n))")
 *     .search(buf, pos).start() (the look at the byte before the LF may fall
 *     before pos, as the regex's lookbehind does).
 *
 * to_lf_counted(body) -> (bytes, int)
 *     body with every CRLF turned into LF (a bare CR or bare LF stays), and
 *     the result's LF count minus its CRLF count: exactly
 *     lf = body.replace(b"\r\n", b"\n"); (lf, lf.count(b"\n") - lf.count(b"\r\n")).
 *     Releases the GIL past 64 KiB (body is immutable bytes).
 *
 * The scan reads the buffer once; the conversion twice (a memchr pass that
 * counts, so that the result is allocated at its size, then the copy). The
 * Python fallbacks (smtp/reader.py, smtp/handler.py) give the same results
 * and the tests compare the two.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define RELEASE_GIL_ABOVE (64 * 1024)

static PyObject *
find_dot_or_bare_lf(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "find_dot_or_bare_lf(buf, pos) takes 2 arguments");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const char *s = (const char *)view.buf;
    Py_ssize_t n = view.len, found = -1;
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
            found = j;
            break;
        }
        pos = j + 1;
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(found);
}

static Py_ssize_t
convert(const char *s, Py_ssize_t n, char *d, Py_ssize_t *extra)
{
    Py_ssize_t i = 0, k = 0, lf = 0, crlf = 0;
    while (i < n) {
        const char *p = memchr(s + i, '\n', (size_t)(n - i));
        if (p == NULL) {
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

static PyObject *
to_lf_counted(PyObject *module, PyObject *body)
{
    if (!PyBytes_Check(body)) {
        PyErr_Format(PyExc_TypeError, "to_lf_counted() needs bytes, not %.100s",
                     Py_TYPE(body)->tp_name);
        return NULL;
    }
    /* Counted first so that the result is allocated at its size: shrinking a
     * big one afterwards (realloc) cost more than this pass, in fresh pages
     * for every message. */
    Py_ssize_t n = PyBytes_GET_SIZE(body), drop, k, extra;
    const char *s = PyBytes_AS_STRING(body);
    int nogil = n > RELEASE_GIL_ABOVE;
    if (nogil) {
        Py_BEGIN_ALLOW_THREADS
        drop = count_crlf(s, n);
        Py_END_ALLOW_THREADS
    }
    else {
        drop = count_crlf(s, n);
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n - drop);
    if (out == NULL) {
        return NULL;
    }
    char *d = PyBytes_AS_STRING(out);
    if (nogil) {
        Py_BEGIN_ALLOW_THREADS
        k = convert(s, n, d, &extra);
        Py_END_ALLOW_THREADS
    }
    else {
        k = convert(s, n, d, &extra);
    }
    assert(k == n - drop);
    (void)k;
    return Py_BuildValue("(Nn)", out, extra);
}

static PyMethodDef methods[] = {
    {"find_dot_or_bare_lf", (PyCFunction)(void (*)(void))find_dot_or_bare_lf, METH_FASTCALL,
     "The first LF at or after pos that starts a dot line or lacks its CR, or -1."},
    {"to_lf_counted", to_lf_counted, METH_O,
     "(body with CRLF turned into LF, its LF count minus its CRLF count)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "delivery_executor._speedups",
    "The DATA path's byte loops in C (optional: pure-Python fallbacks exist).", 0, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
