/* Fast-scan kernel: 4-bit lookup tables over nibble codes, with a running top-k per query.
 *
 * Layout (tqindex/layout.py, the form an index holds its codes in). Each vector's mse codes are regrouped into M
 * "nibbles" of 4 bits (one 3- or 4-bit code, two 2-bit codes or four 1-bit codes each), and
 * vectors are stored in blocks of 32: block b holds, for every column c < M/2, 32 bytes whose byte
 * i is nibble 2c of vector 32b+i in its low half and nibble 2c+1 in its high half.
 *
 * Per query, nibble m has a 16-entry float table L[m][v] (the exact contribution of that nibble
 * value to the dot product) and its quantization Lq[m][v] to 0..LUT_MAX. The approximate dot product of
 * vector i is  delta * sum_m Lq[m][nibble_m(i)] + bias,  which differs from the exact one,
 * sum_m L[m][nibble_m(i)], by at most `tol` (computed by the caller from the rounding). Scores are
 * row_scale[i] * dot for "ip", and 2 * that - row_norm[i]^2 - query_norm2 for "l2".
 *
 * Per-row arrays (row_scale, row_norm, the removal flags `deleted`) are the segment's own, in row
 * order, so the scan derives nothing per row: the rows of the last block past the segment's end and
 * removed rows are masked out of every block's candidates (`live_rows`).
 * Scales are never negative (they are norms, or norms over a positive alignment).
 *
 * Each query keeps a min-heap of its k best *exact* scores. A vector is skipped when its
 * approximate score plus its error bound is below the heap's minimum; otherwise its exact score is
 * summed from the float tables and offered to the heap. The heap's minimum only rises, so a
 * skipped vector could never have entered the final top k: the result is the exact top k of the
 * float scores, and the uint8 pass only decides which vectors need the float sum.
 *
 * The AVX2 path looks 32 nibbles up at once with vpshufb (one table per 128-bit lane, the same
 * table broadcast to both) and sums in 16-bit lanes; AVX-512 looks up two columns (64 nibbles) per
 * shuffle. Each is chosen at run time when the CPU has it. The portable path computes the very
 * same integer sums, so all give identical results.
 *
 * Wide codes (5 bits). A group of 5-bit codes takes the first `wcols` columns (a multiple of 4;
 * its nibble count padded to a multiple of 8 with zero tables): each nibble holds a code's low 4
 * bits, and after the ncols nibble columns each block has wcols/4 "mask" columns whose byte i has
 * bit t set when the 5th bit of wide nibble 8u+t (mask column u) of vector i is set. A wide nibble
 * m has 32 table entries: the usual 16 for codes 0-15 and 16 more, for codes 16-31, at table index
 * 2*ncols + m; the kernel blends the two lookups by the mask.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_pool.h"
#include "_scan.h"

static int have_avx2(void) {
#ifdef TQ_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

static int have_avx512(void) {
#ifdef TQ_X86
    __builtin_cpu_init();  /* libgcc's test includes the OS's support for the 512-bit state (XCR0) */
    return have_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
    return 0;
#endif
}

static int have_avx512vbmi(void) {
#ifdef TQ_X86
    return have_avx512() && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

/* The scan's SIMD levels, lowest first. The level used is the highest the CPU has, up to a
 * process-wide limit (set_simd_limit: tests compare the levels, and TQINDEX_SIMD caps it). */
enum { LEVEL_PORTABLE, LEVEL_NEON, LEVEL_AVX2, LEVEL_AVX512, LEVEL_AVX512VBMI, LEVEL_TOP = LEVEL_AVX512VBMI };
static const char *const level_names[] = {"portable", "neon", "avx2", "avx512", "avx512vbmi"};
static int simd_limit = LEVEL_TOP;

static int scan_level(void) {
#if defined(TQ_X86)
    if (simd_limit >= LEVEL_AVX512VBMI && have_avx512vbmi()) return LEVEL_AVX512VBMI;
    if (simd_limit >= LEVEL_AVX512 && have_avx512()) return LEVEL_AVX512;
    if (simd_limit >= LEVEL_AVX2 && have_avx2()) return LEVEL_AVX2;
#elif defined(TQ_NEON)
    if (simd_limit >= LEVEL_NEON) return LEVEL_NEON;  /* every aarch64 CPU has NEON */
#endif
    return LEVEL_PORTABLE;
}

/* Buffer helpers: each checks the exact byte size the kernel will read or write. */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t nbytes, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    if (view->len != nbytes) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes, got %zd", name, nbytes, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The common exit of the entry points: release the buffers taken, return None on success (NULL
 * with the exception already set otherwise). */
static PyObject *release(Py_buffer *bufs, int held, int ok) {
    for (int i = 0; i < held; i++) PyBuffer_Release(&bufs[i]);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* The kernel this CPU runs (call without the GIL). */
static void run_scan(const scan_args *a, int portable) {
#if defined(TQ_X86)
    if (a->qint && a->avx512 == 2)
        scan_int8_vnni(a);
    else if (a->qint)
        scan_portable(a);  /* no other SIMD level has an int8 scan */
    else if (a->avx512 == 2)
        scan_vbmi_tables(a);
    else if (a->avx512)
        scan_avx512(a);
    else if (a->avx2)
        scan_avx2(a);
    else
#elif defined(TQ_NEON)
    if (!portable && !a->qint && scan_level() == LEVEL_NEON)  /* int8 queries: the portable loop */
        scan_neon(a);
    else
#endif
        scan_portable(a);
    (void)portable;
}

/* ---- the scan's entry point ---------------------------------------------------------------------
 * `scan_segments` binds the per-query inputs once and each segment's in turn; each buffer is checked
 * against the exact byte size the kernel reads or writes. */

#define MAX_BUFS 24
typedef struct {
    Py_buffer *v;              /* `local`, or a heap array for calls that bind many segments */
    int held, cap;
    Py_buffer local[MAX_BUFS];
} buffer_set;

/* An empty set with room for `cap` buffers (sized up front: buffers taken are never moved). */
static int buffers_init(buffer_set *b, Py_ssize_t cap) {
    b->held = 0;
    b->v = b->local;
    b->cap = MAX_BUFS;
    if (cap > MAX_BUFS) {
        if (cap > INT_MAX || !(b->v = PyMem_Malloc((size_t)cap * sizeof(Py_buffer)))) {
            b->v = b->local;
            PyErr_NoMemory();
            return -1;
        }
        b->cap = (int)cap;
    }
    return 0;
}

static void buffers_free(buffer_set *b) {
    while (b->held > 0) PyBuffer_Release(&b->v[--b->held]);
    if (b->v != b->local) PyMem_Free(b->v);
    b->v = b->local;
}

/* Take obj's buffer into the set (nbytes < 0: any size); *ptr gets its data. */
static int take(buffer_set *b, PyObject *obj, int writable, Py_ssize_t nbytes, const char *name, void **ptr) {
    if (b->held == b->cap) {
        PyErr_SetString(PyExc_RuntimeError, "scan: too many buffers");
        return -1;
    }
    Py_buffer *v = &b->v[b->held];
    if (nbytes < 0) {
        if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    } else if (get_buffer(obj, v, writable, nbytes, name) < 0) {
        return -1;
    }
    b->held++;
    *ptr = v->buf;
    return 0;
}

/* obj's buffer as float32 rows of `dim` (C-contiguous, any count): *ptr gets the data, the row count
 * is returned (or -1 with a ValueError naming `name`). */
static Py_ssize_t take_float_rows(buffer_set *b, PyObject *obj, Py_ssize_t dim, const char *name, void **ptr) {
    if (b->held == b->cap) {
        PyErr_SetString(PyExc_RuntimeError, "scan: too many buffers");
        return -1;
    }
    Py_buffer *v = &b->v[b->held];
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    b->held++;
    const Py_ssize_t rows = v->len / (dim * (Py_ssize_t)sizeof(float));
    if (!v->format || strcmp(v->format, "f") != 0 || v->len != rows * dim * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "%s must be float32 [n][%zd]", name, dim);
        return -1;
    }
    *ptr = v->buf;
    return rows;
}

/* A plan field as a buffer of nbytes (None allowed where `optional`: *ptr = NULL). */
static int take_field(buffer_set *b, PyObject *plan, const char *name, int optional, Py_ssize_t nbytes, void **ptr) {
    PyObject *obj = PyObject_GetAttrString(plan, name);
    if (!obj) return -1;
    int rc = 0;
    *ptr = NULL;
    if (obj == Py_None) {
        if (!optional) {
            PyErr_Format(PyExc_ValueError, "scan: %s is required", name);
            rc = -1;
        }
    } else {
        rc = take(b, obj, 0, nbytes, name, ptr);
    }
    Py_DECREF(obj);
    return rc;
}

static int int_field(PyObject *plan, const char *name, long long *out) {
    PyObject *obj = PyObject_GetAttrString(plan, name);
    if (!obj) return -1;
    *out = PyLong_AsLongLong(obj);
    Py_DECREF(obj);
    return PyErr_Occurred() ? -1 : 0;
}

#define TAKE(expr, field)         \
    do {                          \
        void *p_;                 \
        if ((expr) < 0) return -1; \
        (field) = p_;             \
    } while (0)

/* The kernels a scan runs: this CPU's level (up to the limit), or the portable loop. */
static void set_level(scan_args *a, int portable) {
    const int level = portable ? LEVEL_PORTABLE : scan_level();
    a->avx2 = level >= LEVEL_AVX2;  /* the AVX-512 scan rescores with the AVX2 dot products */
    a->avx512 = level == LEVEL_AVX512VBMI ? 2 : level == LEVEL_AVX512;
}

/* The rows of a plan array of `row_bytes` a query that qrow picks (scan_args.qrow): the array's row count,
 * each picked row checked to be one of them; -1 with an error set otherwise. */
static Py_ssize_t picked_rows(const Py_buffer *v, Py_ssize_t row_bytes, const scan_args *a, const char *name) {
    const Py_ssize_t rows = row_bytes > 0 ? v->len / row_bytes : 0;
    int ok = row_bytes > 0 && v->len == rows * row_bytes;
    for (Py_ssize_t q = 0; ok && q < a->nq; q++) ok = a->qrow[q] >= 0 && a->qrow[q] < rows;
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "scan: %s must hold whole rows of %zd bytes, and qrows rows of it", name,
                     row_bytes);
        return -1;
    }
    return rows;
}

/* The plan's per-query inputs (luts, fluts, delta, which fixes nq, bias, tol, query_norm2, and for
 * rescoring from codes rotated, centroids, row_bits), its layout (ncols, wcols), and the heaps; with
 * qrows, the rows of the plan's tables and queries that queries 0 .. nq - 1 read (scan_args.qrow). */
static int bind_queries(scan_args *a, buffer_set *b, PyObject *plan, PyObject *out_s, PyObject *out_i,
                        PyObject *exact_count, int portable, PyObject *qrows) {
    long long ncols, wcols, row_bits;
    if (int_field(plan, "ncols", &ncols) < 0 || int_field(plan, "wcols", &wcols) < 0 ||
        int_field(plan, "row_bits", &row_bits) < 0)
        return -1;
    if (ncols < 1 || wcols < 0 || wcols % 4 || wcols > ncols) {
        PyErr_SetString(PyExc_ValueError, "scan: inconsistent ncols / wcols");
        return -1;
    }
    a->ncols = (Py_ssize_t)ncols;
    a->wcols = (Py_ssize_t)wcols;
    TAKE(take_field(b, plan, "delta", 0, -1, &p_), a->delta);
    a->nq = b->v[b->held - 1].len / (Py_ssize_t)sizeof(float);
    const Py_ssize_t per_query = a->nq * (Py_ssize_t)sizeof(float), entries = a->nq * (a->ncols + a->wcols) * 32;
    TAKE(take(b, out_s, 1, -1, "out_scores", &p_), a->out_s);
    a->kp = a->nq ? b->v[b->held - 1].len / per_query : 0;
    if (a->nq && (a->kp < 1 || b->v[b->held - 1].len != a->kp * per_query)) {
        PyErr_SetString(PyExc_ValueError, "scan: out_scores must be float32 [nq][k] with k >= 1");
        return -1;
    }
    TAKE(take(b, out_i, 1, a->nq * a->kp * (Py_ssize_t)sizeof(int64_t), "out_ids", &p_), a->out_i);
    TAKE(take(b, exact_count, 1, a->nq * (Py_ssize_t)sizeof(int64_t), "exact_count", &p_), a->exact_count);
    /* With qrows, the tables, int8 queries and rotated queries are the whole plan's, read at rows qrows. */
    a->qrow = NULL;
    if (qrows != Py_None) TAKE(take(b, qrows, 0, a->nq * (Py_ssize_t)sizeof(int64_t), "qrows", &p_), a->qrow);
    const int picked = a->qrow != NULL;
    Py_ssize_t plan_rows = a->nq;  /* the rows of the tables (or int8 queries) */
    /* int8 queries (int8_tables) replace the tables: one scalar group rescored from its codes. */
    TAKE(take_field(b, plan, "qint", 1, picked ? -1 : a->nq * int8_query_bytes(a->ncols), &p_), a->qint);
    if (picked && a->qint &&
        (plan_rows = picked_rows(&b->v[b->held - 1], int8_query_bytes(a->ncols), a, "qint")) < 0)
        return -1;
    const int int8 = a->qint != NULL;
    if (int8 && (row_bits != 4 || wcols)) {
        PyErr_SetString(PyExc_ValueError,
                        "scan: int8 queries need codes of 4 bits a nibble (row_bits 4), no wide columns");
        return -1;
    }
    TAKE(take_field(b, plan, "levels", !int8, 64, &p_), a->levels);
    TAKE(take_field(b, plan, "luts", int8, picked ? -1 : entries, &p_), a->luts);
    if (picked && a->luts && (plan_rows = picked_rows(&b->v[b->held - 1], table_entries(a), a, "luts")) < 0)
        return -1;
    TAKE(take_field(b, plan, "fluts", int8, picked ? -1 : entries * (Py_ssize_t)sizeof(float), &p_), a->fluts);
    if (picked && a->fluts &&
        picked_rows(&b->v[b->held - 1], table_entries(a) * (Py_ssize_t)sizeof(float), a, "fluts") != plan_rows) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "scan: fluts must have the rows of luts");
        return -1;
    }
    TAKE(take_field(b, plan, "bias", 0, per_query, &p_), a->bias);
    TAKE(take_field(b, plan, "tol", 0, per_query, &p_), a->tol);
    TAKE(take_field(b, plan, "query_norm2", 1, per_query, &p_), a->query_norm2);
    if (row_bits) {
        /* The rotated queries fix dim; a row's ncols column bytes hold its dim codes of row_bits. */
        if ((row_bits != 1 && row_bits != 2 && row_bits != 4) || wcols) {
            PyErr_SetString(PyExc_ValueError, "scan: row_bits must be 0, 1, 2 or 4, and 0 with wide columns");
            return -1;
        }
        a->row_bits = (int)row_bits;
        TAKE(take_field(b, plan, "rotated", 0, -1, &p_), a->rotated);
        const Py_ssize_t rotated_row = plan_rows * (Py_ssize_t)sizeof(float);  /* a float per query and dim */
        a->dim = plan_rows ? b->v[b->held - 1].len / rotated_row : 0;
        if (a->nq && (a->dim < 1 || a->dim * rotated_row != b->v[b->held - 1].len ||
                      (a->dim * row_bits + 7) / 8 > ncols)) {
            PyErr_SetString(PyExc_ValueError, "scan: rotated must be float32 [nq][dim] with dim codes in ncols columns");
            return -1;
        }
        TAKE(take_field(b, plan, "centroids", 0, 16 * (Py_ssize_t)sizeof(float), &p_), a->centroids);
    }
    set_level(a, portable);
    return 0;
}

/* The optional shared floor (float32 [nq], writable; scan_args.floor), or None. */
static int bind_floor(scan_args *a, buffer_set *b, PyObject *floor) {
    a->floor = NULL;
    if (floor == Py_None) return 0;
    TAKE(take(b, floor, 1, a->nq * (Py_ssize_t)sizeof(float), "floor", &p_), a->floor);
    return 0;
}

/* One segment's inputs: codes (whole blocks holding `rows` rows), its per-row arrays in row order
 * (row_scale float32 or float16; row_norm float32 for "l2", given exactly when the queries have
 * query_norm2; deleted, 1 byte a row, or None), block_live (a byte a block, or None), offset
 * (float [nq], or NULL) and id_base. Sets *nblocks. */
static int bind_segment(scan_args *a, buffer_set *b, PyObject *codes, Py_ssize_t rows, PyObject *row_scale,
                        PyObject *row_norm, PyObject *deleted, PyObject *block_live, const float *offset,
                        long long id_base, Py_ssize_t *nblocks) {
    const Py_ssize_t block = (a->ncols + a->wcols / 4) * BLOCK, floats = rows * (Py_ssize_t)sizeof(float);
    TAKE(take(b, codes, 0, -1, "codes", &p_), a->codes);
    *nblocks = b->v[b->held - 1].len / block;
    if (rows < 0 || *nblocks * block != b->v[b->held - 1].len || *nblocks != (rows + BLOCK - 1) / BLOCK) {
        PyErr_Format(PyExc_ValueError, "scan: codes must be the whole blocks of %zd rows in this layout", rows);
        return -1;
    }
    if (id_base < 0) {
        PyErr_SetString(PyExc_ValueError, "scan: id_base must be non-negative");
        return -1;
    }
    if ((row_norm != Py_None) != (a->query_norm2 != NULL)) {
        PyErr_SetString(PyExc_ValueError, "scan: row_norm and query_norm2 come together (\"l2\") or not at all");
        return -1;
    }
    a->rows = rows;
    a->id_base = id_base;
    a->row_norm = NULL;
    a->deleted = a->block_live = NULL;
    a->offset = offset;
    /* Scales are float32 or float16 (an index's scale_dtype), read as they are held. */
    Py_buffer *sv = &b->v[b->held];
    if (b->held == b->cap || PyObject_GetBuffer(row_scale, sv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "scan: too many buffers");
        return -1;
    }
    b->held++;
    a->scale_half = sv->format && strcmp(sv->format, "e") == 0;
    if (!(a->scale_half || (sv->format && strcmp(sv->format, "f") == 0)) || sv->len != rows * sv->itemsize) {
        PyErr_Format(PyExc_ValueError, "scan: row_scale must be float32 or float16 [%zd]", rows);
        return -1;
    }
    a->row_scale = sv->buf;
    if (row_norm != Py_None) TAKE(take(b, row_norm, 0, floats, "row_norm", &p_), a->row_norm);
    if (deleted != Py_None) TAKE(take(b, deleted, 0, rows, "deleted", &p_), a->deleted);
    if (block_live != Py_None) TAKE(take(b, block_live, 0, *nblocks, "block_live", &p_), a->block_live);
    return 0;
}
#undef TAKE

/* The queries [q0, q1) of a's: every per-query pointer moved to q0. */
static void narrow_queries(scan_args *g, Py_ssize_t q0, Py_ssize_t q1) {
    const Py_ssize_t entries = table_entries(g);
    if (g->qrow) {
        g->qrow += q0;  /* the tables stay the plan's: the rows move */
    } else {
        if (g->luts) g->luts += q0 * entries;
        if (g->fluts) g->fluts += q0 * entries;
        if (g->qint) g->qint += q0 * int8_query_bytes(g->ncols);
        if (g->rotated) g->rotated += q0 * g->dim;
    }
    g->delta += q0;
    g->bias += q0;
    g->tol += q0;
    if (g->query_norm2) g->query_norm2 += q0;
    if (g->offset) g->offset += q0;
    if (g->floor) g->floor += q0;
    g->out_s += q0 * g->kp;
    g->out_i += q0 * g->kp;
    g->exact_count += q0;
    g->nq = q1 - q0;
}

/* A search's queries made in C (`search`, and the table makers): rotation, ||q||^2 and the tables or
 * int8 queries, for a range of the queries at a time (query_maker is defined with the table makers,
 * make_queries with `search`, below). */
typedef struct query_maker query_maker;
static void make_queries(const query_maker *m, Py_ssize_t q0, Py_ssize_t q1);

/* What a scan's shares have in common: the bound segments and their limits. */
typedef struct {
    const scan_args *seg;  /* [nseg], bound */
    Py_ssize_t nseg;
    const double *limits;  /* [nseg][2]: max_scale, max_norm2 */
    const float *mag;      /* [nq] */
    int portable;
    const query_maker *maker; /* or NULL: the queries' inputs are given (scan_segments) */
} scan_job;

/* Query q's room for float32 rounding in a score of bound segment s (g: its arguments, narrowed to the
 * queries scanned; mag: the query's magnitude): what evaluation_threshold takes off the heap's least. */
static inline float rounding_room(const scan_job *job, Py_ssize_t s, const scan_args *g, Py_ssize_t q, float mag) {
    const float factor = g->row_norm ? 2.0f : 1.0f;
    return 1e-5f * (factor * (float)job->limits[2 * s] * mag + (g->offset ? fabsf(g->offset[q]) : 0.0f) +
                    (g->row_norm ? (float)job->limits[2 * s + 1] + g->query_norm2[q] : 0.0f));
}

/* Queries [q0, q1) over the blocks [g0, g1) of the concatenation of every segment's block range, with
 * each segment's eps (the room for float32 rounding in a score, per query) written to `eps` before its
 * scan, into the heaps, counts and floor given for those queries (out_s NULL: the caller's). */
static void scan_range(const scan_job *job, Py_ssize_t q0, Py_ssize_t q1, Py_ssize_t g0, Py_ssize_t g1, float *eps,
                       float *out_s, int64_t *out_i, int64_t *count, uint32_t *floor) {
    Py_ssize_t first = 0;  /* this segment's first block in the concatenation */
    for (Py_ssize_t s = 0; s < job->nseg && first < g1; s++) {
        scan_args g = job->seg[s];
        const Py_ssize_t n = g.b1 - g.b0;
        if (first + n > g0) {
            g.b0 += g0 > first ? g0 - first : 0;
            g.b1 -= first + n > g1 ? first + n - g1 : 0;
            narrow_queries(&g, q0, q1);
            if (out_s) {  /* heaps of its own, for queries [q0, q1) */
                g.out_s = out_s;
                g.out_i = out_i;
                g.exact_count = count;
                g.floor = floor;
            }
            g.eps = eps;
            for (Py_ssize_t q = 0; q < g.nq; q++) eps[q] = rounding_room(job, s, &g, q, job->mag[q0 + q]);
            run_scan(&g, job->portable);
        }
        first += n;
    }
}

/* A scan split into shares (pool_run's tasks) that claim chunks of the work in turn, so a share whose
 * thread starts late (a sleeping worker takes tens of microseconds to wake) or runs on a busy core
 * takes fewer. With at least as many queries as shares, a chunk is a run of the queries over every
 * block. With fewer, it is a run of the blocks for every query: share 0 scans into the caller's heaps,
 * the others into their own, all pruning against one shared floor; the heaps are merged after. */
typedef struct {
    const scan_job *job;
    Py_ssize_t total, nq, kp;
    int shares, by_query;
    Py_ssize_t chunk, units; /* queries or blocks: `units` in chunks of `chunk` */
    Py_ssize_t next;         /* the next chunk to claim (atomic) */
    float *eps;              /* [shares][nq] */
    float *hs;               /* [shares - 1][nq][kp], the other shares' heaps (block shares) */
    int64_t *hi;
    int64_t *count;          /* [shares - 1][nq] */
    uint32_t *floor;
} scan_split;

static void scan_share(void *ctx, int t) {
    scan_split *p = ctx;
    float *eps = p->eps + t * p->nq;
    const Py_ssize_t heap = p->nq * p->kp;
    for (;;) {
        const Py_ssize_t u0 = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED) * p->chunk;
        if (u0 >= p->units) return;
        const Py_ssize_t u1 = u0 + p->chunk < p->units ? u0 + p->chunk : p->units;
        if (p->by_query && p->job->maker) make_queries(p->job->maker, u0, u1);  /* this chunk's own */
        if (p->by_query)
            scan_range(p->job, u0, u1, 0, p->total, eps, NULL, NULL, NULL, NULL);
        else if (t == 0)
            scan_range(p->job, 0, p->nq, u0, u1, eps, NULL, NULL, NULL, NULL);
        else
            scan_range(p->job, 0, p->nq, u0, u1, eps, p->hs + (t - 1) * heap, p->hi + (t - 1) * heap,
                       p->count + (t - 1) * p->nq, p->floor);
    }
}

/* Every segment of the list `segments` (see scan_segments), bound after a's query fields: seg[s] and
 * limits[s] (max_scale, max_norm2) for each, and *total, their blocks to scan. */
static int bind_segments(scan_args *a, buffer_set *b, PyObject *segments, const float *offset, scan_args *seg,
                         double *limits, Py_ssize_t *total) {
    *total = 0;
    for (Py_ssize_t s = 0; s < PyList_GET_SIZE(segments); s++) {
        PyObject *codes, *row_scale, *row_norm, *deleted, *block_live;
        Py_ssize_t rows, nblocks, b0 = 0, b1 = 0;
        long long id_base;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(segments, s), "OnOOOOLdd|nn;scan_segments: a segment is (codes, rows, "
                              "row_scale, row_norm, deleted, block_live, id_base, max_scale, max_norm2[, b0, b1])",
                              &codes, &rows, &row_scale, &row_norm, &deleted, &block_live, &id_base,
                              &limits[2 * s], &limits[2 * s + 1], &b0, &b1))
            return -1;
        if (bind_segment(a, b, codes, rows, row_scale, row_norm, deleted, block_live,
                         offset ? offset + s * a->nq : NULL, id_base, &nblocks) < 0)
            return -1;
        if (PyTuple_GET_SIZE(PyList_GET_ITEM(segments, s)) < 11) b1 = nblocks;  /* no range given: every block */
        if (b0 < 0 || b1 < b0 || b1 > nblocks) {
            PyErr_Format(PyExc_ValueError, "scan_segments: block range [%zd, %zd) outside [0, %zd)", b0, b1, nblocks);
            return -1;
        }
        a->b0 = b0;
        a->b1 = b1;
        seg[s] = *a;
        *total += b1 - b0;
    }
    return 0;
}

/* A bound scan and what its shares need (allocated with the GIL held, run without it). */
typedef struct {
    scan_args *seg;   /* [nseg], each segment's arguments, bound */
    double *limits;   /* [nseg][2], its max_scale and max_norm2 */
    Py_ssize_t nseg, total;
    int shares, by_query;
    float *eps, *hs;  /* eps [shares][nq]; the block shares' heaps, as scan_split */
    int64_t *hi, *counts;
    uint32_t *shared_floor;
} bound_scan;

/* Room for nseg segments (before bind_segments). */
static int bound_init(bound_scan *bs, Py_ssize_t nseg) {
    memset(bs, 0, sizeof(*bs));
    bs->nseg = nseg;
    bs->seg = PyMem_Malloc((nseg ? nseg : 1) * sizeof(scan_args));
    bs->limits = PyMem_Malloc((nseg ? nseg : 1) * 2 * sizeof(double));
    if (!bs->seg || !bs->limits) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* The split into `threads` shares (after bind_segments): runs of the queries where there are at least
 * as many as threads, else runs of the blocks, each with heaps of its own. */
static int bound_split(bound_scan *bs, const scan_args *a, int threads) {
    bs->by_query = a->nq >= threads;
    const Py_ssize_t units = bs->by_query ? a->nq : bs->total, nq = a->nq;
    bs->shares = units > 1 && nq ? (int)(units < threads ? units : threads) : 1;
    const Py_ssize_t heap = bs->by_query ? 0 : (bs->shares - 1) * nq * a->kp;
    bs->eps = PyMem_Malloc((size_t)bs->shares * (nq ? nq : 1) * sizeof(float));
    if (bs->shares > 1 && !bs->by_query) {
        bs->hs = PyMem_Malloc((size_t)heap * sizeof(float));
        bs->hi = PyMem_Malloc((size_t)heap * sizeof(int64_t));
        bs->counts = PyMem_Calloc((size_t)(bs->shares - 1) * nq, sizeof(int64_t));
        if (!a->floor) bs->shared_floor = PyMem_Malloc((size_t)nq * sizeof(uint32_t));
        if (!bs->hs || !bs->hi || !bs->counts || (!a->floor && !bs->shared_floor)) {
            PyErr_NoMemory();
            return -1;
        }
    }
    if (!bs->eps) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void bound_free(bound_scan *bs) {
    PyMem_Free(bs->eps);
    PyMem_Free(bs->hs);
    PyMem_Free(bs->hi);
    PyMem_Free(bs->counts);
    PyMem_Free(bs->shared_floor);
    PyMem_Free(bs->seg);
    PyMem_Free(bs->limits);
    memset(bs, 0, sizeof(*bs));
}

/* Run a bound scan (without the GIL) into a's heaps. With a query maker, the queries are made first (by
 * each query share for its own chunk, else all of them here). */
static void bound_run(bound_scan *bs, const scan_args *a, const float *mag, int portable, const query_maker *maker) {
    scan_job job = {bs->seg, bs->nseg, bs->limits, mag, portable, maker};
    const Py_ssize_t nq = a->nq, kp = a->kp, total = bs->total;
    const int shares = bs->shares;
    if (maker && (shares == 1 || !bs->by_query)) make_queries(maker, 0, nq);
    if (shares == 1) {
        scan_range(&job, 0, nq, 0, total, bs->eps, NULL, NULL, NULL, NULL);
    } else if (bs->by_query) {
        /* Chunks of whole query tiles, a few per share, but never fewer queries than fill 64 (or a
         * share's all): each chunk streams every block from memory once more, and a pass's blocks are
         * reused from cache by every query of its chunk. */
        const Py_ssize_t few = (nq + 4 * shares - 1) / (4 * shares), even = (nq + shares - 1) / shares;
        const Py_ssize_t least = even < 64 ? even : 64;
        const Py_ssize_t chunk = ((few > least ? few : least) + MAX_TILE - 1) / MAX_TILE * MAX_TILE;
        scan_split split = {&job, total, nq, kp, shares, 1, chunk, nq, 0, bs->eps, NULL, NULL, NULL, NULL};
        pool_run(scan_share, &split, shares);
    } else {
        heap_clear(bs->hs, bs->hi, (shares - 1) * nq * kp);
        uint32_t *fl = a->floor;
        if (!fl) {
            /* The caller's heaps hold rows disjoint from the other shares': their least score is a floor. */
            fl = bs->shared_floor;
            for (Py_ssize_t q = 0; q < nq; q++) memcpy(&fl[q], &a->out_s[q * kp], sizeof(float));
            for (Py_ssize_t s = 0; s < bs->nseg; s++) bs->seg[s].floor = fl;
        }
        Py_ssize_t chunk = (total + 8 * shares - 1) / (8 * shares);
        chunk = chunk < 16 ? 16 : chunk;
        scan_split split = {&job, total, nq, kp, shares, 0, chunk, total, 0, bs->eps, bs->hs, bs->hi, bs->counts, fl};
        pool_run(scan_share, &split, shares);
        for (int t = 1; t < shares; t++)
            for (Py_ssize_t q = 0; q < nq; q++) {
                const float *s2 = bs->hs + ((t - 1) * nq + q) * kp;
                const int64_t *i2 = bs->hi + ((t - 1) * nq + q) * kp;
                float *s1 = a->out_s + q * kp;
                int64_t *i1 = a->out_i + q * kp;
                for (Py_ssize_t j = 0; j < kp; j++)
                    if (i2[j] >= 0 && ranks_below(s1[0], i1[0], s2[j], i2[j]))
                        heap_replace_top(s1, i1, kp, s2[j], i2[j]);
                a->exact_count[q] += bs->counts[(t - 1) * nq + q];
            }
    }
}

/* threads as a share count: at least 1 (else a ValueError naming the entry point), at most the pool's. */
static int check_threads(int *threads, const char *name) {
    if (*threads < 1) {
        PyErr_Format(PyExc_ValueError, "%s: threads must be at least 1, got %d", name, *threads);
        return -1;
    }
    if (*threads > POOL_MAX_WORKERS + 1) *threads = POOL_MAX_WORKERS + 1;
    return 0;
}

/* A partitioned batch (search's probes): each query's probed lists, and where each list's entries lie
 * among the bound segments. Chunks of the queries, in order of their first list (so that a chunk's
 * queries share lists), are claimed in turn by the shares; a chunk's (list, query) pairs are grouped by
 * list, and each list's entries are scanned once for all of the chunk's queries that probe it, as tiles
 * of picked queries (scan_args.qrow) with copies of their per-query floats and heaps. A query's heap is
 * only ever touched by the share that holds its chunk. */
typedef struct {
    const scan_job *job;
    const scan_args *plan;  /* the plan's query fields, heaps and counts, for every query */
    const int64_t *probes;  /* [nq][nprobe], each row's lists distinct and in [0, nlist) */
    const int64_t *first;   /* [nlist + 1]: list L's entries are seg[first[L] .. first[L + 1]) */
    const float *offsets;   /* [nq][nlist]: list L's term in query q's scores */
    int64_t *order;         /* [nq]: the queries by first list (then row) */
    Py_ssize_t nq, nprobe, nlist, chunk, next; /* next: the next chunk to claim (atomic) */
    char *work;             /* [shares][list_work_bytes] */
} list_batch;

static size_t list_work_bytes(const list_batch *lb) {
    const size_t c = (size_t)lb->chunk, kp = (size_t)lb->plan->kp;
    return (size_t)(lb->nlist + 1 + c * lb->nprobe + c + c * kp + c) * sizeof(int64_t) +
           (6 * c + c * kp) * sizeof(float);
}

/* The queries in order of their first list (a counting sort, stable: by row within a list). */
static int list_order(list_batch *lb) {
    int64_t *start = PyMem_Calloc((size_t)lb->nlist + 1, sizeof(int64_t));
    if (!start) return -1;
    for (Py_ssize_t q = 0; q < lb->nq; q++) start[lb->probes[q * lb->nprobe] + 1]++;
    for (Py_ssize_t l = 0; l < lb->nlist; l++) start[l + 1] += start[l];
    for (Py_ssize_t q = 0; q < lb->nq; q++) lb->order[start[lb->probes[q * lb->nprobe]]++] = q;
    PyMem_Free(start);
    return 0;
}

static void list_share(void *ctx, int t) {
    list_batch *lb = ctx;
    const scan_job *job = lb->job;
    const scan_args *a = lb->plan;
    const Py_ssize_t c = lb->chunk, kp = a->kp, nlist = lb->nlist, nprobe = lb->nprobe;
    int64_t *end = (int64_t *)(lb->work + (size_t)t * list_work_bytes(lb)); /* [nlist + 1] */
    int64_t *pairs = end + nlist + 1, *qrow = pairs + c * nprobe, *hi = qrow + c, *cnt = hi + c * kp;
    float *delta = (float *)(cnt + c), *bias = delta + c, *tol = bias + c, *qn2 = tol + c, *off = qn2 + c,
          *eps = off + c, *hs = eps + c;
    for (;;) {
        const Py_ssize_t u0 = __atomic_fetch_add(&lb->next, 1, __ATOMIC_RELAXED) * c;
        if (u0 >= lb->nq) return;
        const Py_ssize_t u1 = u0 + c < lb->nq ? u0 + c : lb->nq;
        /* The chunk's queries grouped by list: list L's are pairs[end[L - 1] .. end[L]) (end[-1] = 0). */
        memset(end, 0, (size_t)(nlist + 1) * sizeof(int64_t));
        for (Py_ssize_t i = u0; i < u1; i++)
            for (Py_ssize_t p = 0; p < nprobe; p++) end[lb->probes[lb->order[i] * nprobe + p] + 1]++;
        for (Py_ssize_t l = 0; l < nlist; l++) end[l + 1] += end[l];
        for (Py_ssize_t i = u0; i < u1; i++)
            for (Py_ssize_t p = 0; p < nprobe; p++)
                pairs[end[lb->probes[lb->order[i] * nprobe + p]]++] = lb->order[i];
        for (Py_ssize_t l = 0; l < nlist; l++) {
            const Py_ssize_t s0 = l ? end[l - 1] : 0, m = end[l] - s0;
            if (!m || lb->first[l] == lb->first[l + 1]) continue;
            for (Py_ssize_t i = 0; i < m; i++) {
                const int64_t q = pairs[s0 + i];
                qrow[i] = q;
                delta[i] = a->delta[q];
                bias[i] = a->bias[q];
                tol[i] = a->tol[q];
                qn2[i] = a->query_norm2 ? a->query_norm2[q] : 0.0f;
                off[i] = lb->offsets[q * nlist + l];
                memcpy(hs + i * kp, a->out_s + q * kp, (size_t)kp * sizeof(float));
                memcpy(hi + i * kp, a->out_i + q * kp, (size_t)kp * sizeof(int64_t));
                cnt[i] = 0;
            }
            for (int64_t e = lb->first[l]; e < lb->first[l + 1]; e++) {
                scan_args g = job->seg[e];
                g.qrow = qrow;
                g.nq = m;
                g.delta = delta;
                g.bias = bias;
                g.tol = tol;
                g.query_norm2 = a->query_norm2 ? qn2 : NULL;
                g.offset = off;
                g.floor = NULL;
                g.out_s = hs;
                g.out_i = hi;
                g.exact_count = cnt;
                g.eps = eps;
                for (Py_ssize_t i = 0; i < m; i++) eps[i] = rounding_room(job, e, &g, i, job->mag[qrow[i]]);
                run_scan(&g, job->portable);
            }
            for (Py_ssize_t i = 0; i < m; i++) {
                const int64_t q = qrow[i];
                memcpy(a->out_s + q * kp, hs + i * kp, (size_t)kp * sizeof(float));
                memcpy(a->out_i + q * kp, hi + i * kp, (size_t)kp * sizeof(int64_t));
                a->exact_count[q] += cnt[i];
            }
        }
    }
}

/* Queries [q0, q1) of a maker, for the shares of make_share. */
typedef struct {
    const query_maker *maker;
    Py_ssize_t nq, chunk, next;
} make_split;

static void make_share(void *ctx, int t) {
    make_split *p = ctx;
    (void)t;
    for (;;) {
        const Py_ssize_t q0 = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED) * p->chunk;
        if (q0 >= p->nq) return;
        make_queries(p->maker, q0, q0 + p->chunk < p->nq ? q0 + p->chunk : p->nq);
    }
}

/* Positions to ids (row_ids: each bound segment's ids, the rows from its id_base on): through the
 * segments sorted by id_base, a binary search per position (a partitioned index binds one entry per
 * list, several of them ranges of one segment). */
typedef struct {
    int64_t id_base, rows;
    Py_ssize_t s;
} id_range;

static int by_id_base(const void *x, const void *y) {
    const id_range *a = x, *b = y;
    return a->id_base < b->id_base ? -1 : a->id_base > b->id_base ? 1 : (a->s > b->s) - (a->s < b->s);
}

static void map_ids(int64_t *pos, Py_ssize_t n, id_range *r, Py_ssize_t nseg, const int64_t *const *ids) {
    qsort(r, (size_t)nseg, sizeof(*r), by_id_base);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (pos[i] < 0) continue;
        Py_ssize_t lo = 0, hi = nseg;  /* the last range with id_base <= pos */
        while (hi - lo > 1) {
            const Py_ssize_t mid = (lo + hi) / 2;
            if (r[mid].id_base <= pos[i]) lo = mid; else hi = mid;
        }
        if (nseg && r[lo].id_base <= pos[i] && pos[i] - r[lo].id_base < r[lo].rows)
            pos[i] = ids[r[lo].s][pos[i] - r[lo].id_base];
    }
}

/* scan_segments(plan, segments, magnitude, out_scores, out_ids, exact_count, portable=False, floor=None,
 * offsets=None, threads=1): the plan's queries (its per-query fields) over many segments, into the same
 * heaps. Each segment is a tuple (codes, rows, row_scale, row_norm or None, deleted or None, block_live or
 * None, id_base, max_scale, max_norm2[, b0, b1]): its blocks [b0, b1) (default all) are scanned, every score
 * plus its offset (offsets: float32 [nsegments][nq], a partitioned index's list terms, or None), with
 * eps = 1e-5 * (factor * max_scale * magnitude + |offset| [+ max_norm2 + qn2]), the room for float32 rounding
 * in a score. floor: float32 [nq] shared by calls that scan disjoint rows of these queries into their own
 * heaps (-inf to start; scan_args.floor), or None. threads > 1: the work is split into that many shares run
 * at once by the module's worker threads (tqindex/_pool.h): runs of the queries where there are at least
 * `threads` of them, else runs of the blocks (of all segments in turn), merged into the heaps at the end.
 * The results are the same however it is split.
 * A flat index's segments and a partitioned index's probed lists both come through here. */
static PyObject *scan_segments(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"plan", "segments", "magnitude", "out_scores", "out_ids", "exact_count", "portable",
                             "floor", "offsets", "threads", "qrows", NULL};
    PyObject *plan, *segments, *magnitude, *out_s, *out_i, *exact_count, *floor = Py_None, *offsets = Py_None,
             *qrows = Py_None;
    int portable = 0, threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!OOOO|pOOiO", kwlist, &plan, &PyList_Type, &segments,
                                     &magnitude, &out_s, &out_i, &exact_count, &portable, &floor, &offsets, &threads,
                                     &qrows))
        return NULL;
    if (check_threads(&threads, "scan_segments") < 0) return NULL;
    /* Every segment is bound first (up to 5 buffers each), then the GIL is released once for the
     * whole scan: a partitioned single query probes many small lists, and a release, a reacquire
     * and a rebinding per list cost microseconds each. */
    const Py_ssize_t nseg = PyList_GET_SIZE(segments);
    buffer_set b;
    bound_scan bs;
    int ok = 0;
    void *mag_p;
    scan_args a;
    memset(&a, 0, sizeof(a));
    if (buffers_init(&b, MAX_BUFS + 5 * nseg) < 0) return NULL;
    if (bound_init(&bs, nseg) < 0) goto done;
    if (bind_queries(&a, &b, plan, out_s, out_i, exact_count, portable, qrows) < 0) goto done;
    if (bind_floor(&a, &b, floor) < 0) goto done;
    if (take(&b, magnitude, 0, a.nq * (Py_ssize_t)sizeof(float), "magnitude", &mag_p) < 0) goto done;
    const float *offset = NULL;  /* [nseg][nq] */
    if (offsets != Py_None) {
        void *o;
        if (take(&b, offsets, 0, nseg * a.nq * (Py_ssize_t)sizeof(float), "offsets", &o) < 0) goto done;
        offset = o;
    }
    if (bind_segments(&a, &b, segments, offset, bs.seg, bs.limits, &bs.total) < 0) goto done;
    if (bound_split(&bs, &a, threads) < 0) goto done;
    Py_BEGIN_ALLOW_THREADS
    bound_run(&bs, &a, mag_p, portable, NULL);
    Py_END_ALLOW_THREADS
    ok = 1;
done:
    bound_free(&bs);
    buffers_free(&b);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* ---- encoding ----------------------------------------------------------------------------------
 * encode(y, dim, rows, groups, codes, alignment): for rows of y (float32 [rows][dim], rotated unit
 * vectors), each group (start, stop, bits, byte_offset, boundaries float32[2^bits - 1], centroids
 * float32[2^bits]) writes code j = #{boundaries < y_j} (torch.bucketize's rule: the first boundary
 * >= y) into the row's little-endian bitstream at byte_offset (tqindex/packing.py layout), and
 * alignment[row] = sum_j y_j * centroid(code_j) (float32, summed in float64). A group tuple may add
 * (block, codewords float32[2^(bits*block)][block]): with block > 1, each run of `block` coordinates
 * takes the codeword v nearest in squared distance (summed in coordinate order in float32; the lowest
 * v wins ties, as quantizer._nearest_codes), written as `block` codes of `bits` bits (v's low bits
 * first), and adds its dot product with the codeword to the alignment. */
typedef struct {
    Py_ssize_t start, stop, bits, offset, block;
    const float *boundaries, *centroids, *codewords;
    float wt[4][16]; /* block codebooks: codewords transposed, wt[t][v] = codewords[v][t] */
} code_group;

/* The codeword of a block codebook nearest to y[0 .. BLK): all 16 distances (a loop the compiler
 * vectorizes over v), then a branch-free first-minimum scan. */
#define NEAREST_WORD(BLK)                                                         \
    static inline int nearest_word##BLK(const float (*wt)[16], const float *y) {  \
        float d[16];                                                              \
        for (int v = 0; v < 16; v++) {                                            \
            float acc = (y[0] - wt[0][v]) * (y[0] - wt[0][v]);                    \
            for (int t = 1; t < BLK; t++) acc += (y[t] - wt[t][v]) * (y[t] - wt[t][v]); \
            d[v] = acc;                                                           \
        }                                                                         \
        int best = 0;                                                             \
        float best_d = d[0];                                                      \
        for (int v = 1; v < 16; v++) {                                            \
            const int closer = d[v] < best_d;                                     \
            best_d = closer ? d[v] : best_d;                                      \
            best = closer ? v : best;                                             \
        }                                                                         \
        return best;                                                              \
    }
NEAREST_WORD(2)
NEAREST_WORD(4)

#ifdef TQ_X86
/* SSE2 (every x86-64): the same 16 distances, four codewords per vector with the same float
 * operations in the same order, then the minimum and the first codeword that attains it (what the
 * scalar scan returns), from a compare mask. About 3x faster than the portable loop. */
static inline int nearest_word_sse(const float (*wt)[16], const float *y, int block) {
    __m128 d[4];
    for (int k = 0; k < 4; k++) {
        __m128 diff = _mm_sub_ps(_mm_set1_ps(y[0]), _mm_loadu_ps(wt[0] + 4 * k));
        __m128 acc = _mm_mul_ps(diff, diff);
        for (int t = 1; t < block; t++) {
            diff = _mm_sub_ps(_mm_set1_ps(y[t]), _mm_loadu_ps(wt[t] + 4 * k));
            acc = _mm_add_ps(acc, _mm_mul_ps(diff, diff));
        }
        d[k] = acc;
    }
    __m128 m = _mm_min_ps(_mm_min_ps(d[0], d[1]), _mm_min_ps(d[2], d[3]));
    m = _mm_min_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm_min_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
    unsigned mask = 0;
    for (int k = 0; k < 4; k++) mask |= (unsigned)_mm_movemask_ps(_mm_cmpeq_ps(d[k], m)) << (4 * k);
    return __builtin_ctz(mask);
}
#define NEAREST(g, y) nearest_word_sse((g)->wt, (y), (int)(g)->block)
#else
#define NEAREST(g, y) ((g)->block == 2 ? nearest_word2((g)->wt, (y)) : nearest_word4((g)->wt, (y)))
#endif

static void encode_rows(const float *y, Py_ssize_t dim, Py_ssize_t rows, const code_group *groups, int ngroups,
                        uint8_t *codes, Py_ssize_t row_bytes, float *alignment) {
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *yr = y + r * dim;
        uint8_t *out = codes + r * row_bytes;
        double dot = 0.0;
        for (int gi = 0; gi < ngroups; gi++) {
            const code_group *g = &groups[gi];
            uint8_t *dst = out + g->offset;
            uint64_t acc = 0;
            int filled = 0;
            if (g->block > 1) {
                const int width = (int)(g->bits * g->block);  /* 4: whole nibbles, never split */
                for (Py_ssize_t j = g->start; j < g->stop; j += g->block) {
                    const int v = NEAREST(g, yr + j);
                    const float *w = g->codewords + v * g->block;
                    for (Py_ssize_t t = 0; t < g->block; t++) dot += (double)yr[j + t] * w[t];
                    acc |= (uint64_t)v << filled;
                    filled += width;
                    while (filled >= 8) {
                        *dst++ = (uint8_t)acc;
                        acc >>= 8;
                        filled -= 8;
                    }
                }
                if (filled) *dst = (uint8_t)acc;
                continue;
            }
            for (Py_ssize_t j = g->start; j < g->stop; j++) {
                const float v = yr[j];
                /* Branch-free search over the 2^bits - 1 sorted boundaries (a complete binary tree):
                 * ends with lo = #{boundaries < v}. Data-dependent branches here mispredict often. */
                int lo = 0;
                for (int step = 1 << (g->bits - 1); step; step >>= 1)
                    lo += (g->boundaries[lo + step - 1] < v) ? step : 0;
                dot += (double)v * g->centroids[lo];
                acc |= (uint64_t)lo << filled;
                filled += (int)g->bits;
                while (filled >= 8) {
                    *dst++ = (uint8_t)acc;
                    acc >>= 8;
                    filled -= 8;
                }
            }
            if (filled) *dst = (uint8_t)acc;
        }
        alignment[r] = (float)dot;
    }
}

static PyObject *encode(PyObject *self, PyObject *args) {
    PyObject *y, *groups, *codes, *alignment;
    Py_ssize_t dim, rows;
    if (!PyArg_ParseTuple(args, "OnnO!OO", &y, &dim, &rows, &PyList_Type, &groups, &codes, &alignment)) return NULL;
    int ngroups = (int)PyList_GET_SIZE(groups);
    if (ngroups < 1 || ngroups > 8 || dim < 1 || rows < 0) {
        PyErr_SetString(PyExc_ValueError, "encode: need 1..8 groups, dim >= 1, rows >= 0");
        return NULL;
    }
    code_group g[8];
    Py_buffer bufs[4 + 24];
    int held = 0, ok = 0;
    Py_ssize_t row_bytes = 0;
    for (int i = 0; i < ngroups; i++) {
        PyObject *bnd, *cen, *words = NULL;
        g[i].block = 1;
        g[i].codewords = NULL;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(groups, i), "nnnnOO|nO", &g[i].start, &g[i].stop, &g[i].bits,
                              &g[i].offset, &bnd, &cen, &g[i].block, &words))
            goto done;
        if (g[i].bits < 1 || g[i].bits > 8 || g[i].start < 0 || g[i].stop > dim || g[i].stop < g[i].start ||
            g[i].block < 1 || (g[i].block > 1 && (g[i].bits * g[i].block != 4 || !words ||
                                                  (g[i].stop - g[i].start) % g[i].block))) {
            PyErr_SetString(PyExc_ValueError, "encode: bad group");
            goto done;
        }
        Py_ssize_t levels = (Py_ssize_t)1 << g[i].bits;
        if (get_buffer(bnd, &bufs[held], 0, (levels - 1) * (Py_ssize_t)sizeof(float), "boundaries") < 0) goto done;
        g[i].boundaries = bufs[held++].buf;
        if (get_buffer(cen, &bufs[held], 0, levels * (Py_ssize_t)sizeof(float), "centroids") < 0) goto done;
        g[i].centroids = bufs[held++].buf;
        if (g[i].block > 1) {
            if (get_buffer(words, &bufs[held], 0, 16 * g[i].block * (Py_ssize_t)sizeof(float), "codewords") < 0)
                goto done;
            g[i].codewords = bufs[held++].buf;
            for (int v = 0; v < 16; v++)
                for (Py_ssize_t t = 0; t < g[i].block; t++) g[i].wt[t][v] = g[i].codewords[v * g[i].block + t];
        }
        Py_ssize_t end = g[i].offset + ((g[i].stop - g[i].start) * g[i].bits + 7) / 8;
        if (end > row_bytes) row_bytes = end;
    }
    if (get_buffer(y, &bufs[held], 0, rows * dim * (Py_ssize_t)sizeof(float), "y") < 0) goto done;
    const float *yp = bufs[held++].buf;
    if (PyObject_GetBuffer(codes, &bufs[held], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    uint8_t *cp = bufs[held].buf;
    Py_ssize_t code_len = bufs[held++].len;
    if (rows && (code_len % rows || code_len / rows < row_bytes)) {
        PyErr_SetString(PyExc_ValueError, "encode: codes buffer is too small for the groups");
        goto done;
    }
    if (get_buffer(alignment, &bufs[held], 1, rows * (Py_ssize_t)sizeof(float), "alignment") < 0) goto done;
    float *ap = bufs[held++].buf;
    Py_BEGIN_ALLOW_THREADS
    encode_rows(yp, dim, rows, g, ngroups, cp, rows ? code_len / rows : 0, ap);
    Py_END_ALLOW_THREADS
    ok = 1;
done:
    return release(bufs, held, ok);
}

/* ---- query tables -------------------------------------------------------------------------------
 * tables(rotated, dim, nq, groups, ncols, luts, fluts, delta, bias, tol, magnitude, wcols=0, portable=0): for each
 * query (float32 [nq][dim]) and nibble m, fluts[m][v] = sum_t q[j_t] * centroid(code_t(v)) with the
 * group's `per` codes of `bits` bits packed in v (coordinates past the group's end count 0; nibbles
 * past the last group, padding, are all 0). A 5-bit group (first, one code per nibble, its nibbles
 * padded to 2*wcols) also has fluts[2*ncols + m][v] = q[j] * centroid(16 + v). Every nibble's
 * entries (16, or 32 for a wide one) are shifted by their minimum and quantized with one step:
 * luts = round((fluts - min) / delta), delta = max_m span_m / LUT_MAX; bias = sum_m min_m; tol =
 * sum_m max_v |delta * luts - (fluts - min_m)|, the most rounding can move a dot product;
 * magnitude = sum_m max_v |fluts|. A group tuple may add codewords (float32 [16][per], a block
 * codebook whose blocks are the group's nibbles): then fluts[m][v] = sum_t q[j_t] * codewords[v][t]. */
typedef struct {
    Py_ssize_t start, stop, bits, per;
    const float *centroids, *codewords;
} nibble_group;

/* The least and greatest of a nibble's 16 entries `a` (and 16 more, `b`, for a wide nibble). */
static inline void entry_range(const float *a, const float *b, float *lo_out, float *hi_out) {
    float lo[4], hi[4];
    for (int i = 0; i < 4; i++) lo[i] = hi[i] = a[i];
    for (int v = 4; v < 16; v += 4)
        for (int i = 0; i < 4; i++) {
            lo[i] = a[v + i] < lo[i] ? a[v + i] : lo[i];
            hi[i] = a[v + i] > hi[i] ? a[v + i] : hi[i];
        }
    if (b)
        for (int v = 0; v < 16; v += 4)
            for (int i = 0; i < 4; i++) {
                lo[i] = b[v + i] < lo[i] ? b[v + i] : lo[i];
                hi[i] = b[v + i] > hi[i] ? b[v + i] : hi[i];
            }
    const float l01 = lo[0] < lo[1] ? lo[0] : lo[1], l23 = lo[2] < lo[3] ? lo[2] : lo[3];
    const float h01 = hi[0] > hi[1] ? hi[0] : hi[1], h23 = hi[2] > hi[3] ? hi[2] : hi[3];
    *lo_out = l01 < l23 ? l01 : l23;
    *hi_out = h01 > h23 ? h01 : h23;
}

/* A nibble's 16 entries f as levels out[v] = min(trunc((f[v] - lo) * inv + 0.5), LUT_MAX), the nearest
 * level to (f[v] - lo) / step within one (f[v] >= lo); returns max_v |level * step - (f[v] - lo)|, the
 * rounding error. The portable loop (what ARM runs) and SSE2 (every x86-64 CPU) perform the same float
 * operations and agree bit for bit; tables(portable=True) runs the loop on x86 so tests compare them. */
static inline float quantize16_portable(const float *f, float lo, float inv, float step, uint8_t *out) {
    float worst = 0.0f;
    for (int v = 0; v < 16; v++) {
        const float d = f[v] - lo;
        float level = (float)(int)(d * inv + 0.5f);
        level = level < (float)LUT_MAX ? level : (float)LUT_MAX;
        out[v] = (uint8_t)level;
        const float err = fabsf(level * step - d);
        worst = err > worst ? err : worst;
    }
    return worst;
}

#ifdef TQ_X86
static inline float quantize16_sse2(const float *f, float lo, float inv, float step, uint8_t *out) {
    const __m128 vlo = _mm_set1_ps(lo), vinv = _mm_set1_ps(inv), vstep = _mm_set1_ps(step),
                 half = _mm_set1_ps(0.5f), top = _mm_set1_ps((float)LUT_MAX),
                 sign = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    __m128 worst = _mm_setzero_ps();
    __m128i ints[4];
    for (int i = 0; i < 4; i++) {
        const __m128 d = _mm_sub_ps(_mm_loadu_ps(f + 4 * i), vlo);
        const __m128 level = _mm_min_ps(_mm_cvtepi32_ps(_mm_cvttps_epi32(_mm_add_ps(_mm_mul_ps(d, vinv), half))), top);
        worst = _mm_max_ps(worst, _mm_and_ps(_mm_sub_ps(_mm_mul_ps(level, vstep), d), sign));
        ints[i] = _mm_cvttps_epi32(level);
    }
    _mm_storeu_si128((__m128i *)out, _mm_packus_epi16(_mm_packs_epi32(ints[0], ints[1]),
                                                      _mm_packs_epi32(ints[2], ints[3])));
    float w[4];
    _mm_storeu_ps(w, worst);
    const float w01 = w[0] > w[1] ? w[0] : w[1], w23 = w[2] > w[3] ? w[2] : w[3];
    return w01 > w23 ? w01 : w23;
}
#endif

#ifdef TQ_X86
/* entry_range and quantize16 for a nibble without a wide part, its 16 entries in one 512-bit register: the
 * same elementwise operations (and exact minima and maxima), so the same levels and errors bit for bit. */
__attribute__((target(TQ_AVX512))) static void entry_range_avx512(const float *a, float *lo, float *hi) {
    const __m512 v = _mm512_loadu_ps(a);
    *lo = _mm512_reduce_min_ps(v);
    *hi = _mm512_reduce_max_ps(v);
}

__attribute__((target(TQ_AVX512))) static float quantize16_avx512(const float *f, float lo, float inv, float step,
                                                                uint8_t *out) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(f), _mm512_set1_ps(lo));
    const __m512 level = _mm512_min_ps(
        _mm512_cvtepi32_ps(_mm512_cvttps_epi32(_mm512_add_ps(_mm512_mul_ps(d, _mm512_set1_ps(inv)),
                                                             _mm512_set1_ps(0.5f)))),
        _mm512_set1_ps((float)LUT_MAX));
    _mm_storeu_si128((__m128i *)out, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(level)));
    return _mm512_reduce_max_ps(_mm512_abs_ps(_mm512_sub_ps(_mm512_mul_ps(level, _mm512_set1_ps(step)), d)));
}
#endif

static inline float quantize16(const float *f, float lo, float inv, float step, uint8_t *out, int portable) {
#ifdef TQ_X86
    if (!portable) return quantize16_sse2(f, lo, inv, step, out);
#endif
    (void)portable;
    return quantize16_portable(f, lo, inv, step, out);
}

static void query_tables(const float *q, const nibble_group *groups, int ngroups, Py_ssize_t nibbles,
                         Py_ssize_t wide, uint8_t *lut, float *flut, float *delta, float *bias, float *tol,
                         float *magnitude, int portable) {
    /* Nibble m's entries: flut[m*16 ..] (16), and for m < wide also flut[(nibbles + m)*16 ..] (16 more).
     * Each entry is summed over t in increasing order from 0.0f, whatever the branch below. */
    memset(flut, 0, (size_t)(nibbles + wide) * 16 * sizeof(float));
    Py_ssize_t m = 0;
    for (int gi = 0; gi < ngroups; gi++) {
        const nibble_group *g = &groups[gi];
        const int mask = (1 << g->bits) - 1;
        Py_ssize_t first = m;
        if (g->per == 1 && !g->codewords) {
            /* One code per nibble (3-5 bits, or 1-2 bits in a group of one coordinate per nibble):
             * row[v] = q[j] * c[v], a loop the compiler vectorizes. */
            const int levels = 1 << (g->bits < 4 ? g->bits : 4);
            float c[16];
            for (int v = 0; v < 16; v++) c[v] = g->centroids[v & (levels - 1)];
            for (Py_ssize_t j = g->start; j < g->stop; j++, m++) {
                float *row = flut + m * 16;
                const float x = q[j];
                for (int v = 0; v < 16; v++) row[v] = 0.0f + x * c[v];
                if (g->bits == 5)
                    for (int v = 0; v < 16; v++) flut[(nibbles + m) * 16 + v] = x * g->centroids[16 + v];
            }
        } else {
            /* Several coordinates a nibble (per <= 4): entry v is sum_t q[j + t] * w[t][v], coordinate
             * t's value in codeword v (or of its t-th code), added in increasing t from 0.0f (flut is
             * zeroed). With w laid out by t, each t is one vector loop over the 16 entries, and every
             * entry still sees the same additions in the same order. */
            float w[4][16];
            for (int t = 0; t < g->per; t++)
                for (int v = 0; v < 16; v++)
                    w[t][v] = g->codewords ? g->codewords[v * g->per + t] : g->centroids[(v >> (t * g->bits)) & mask];
            for (Py_ssize_t j = g->start; j < g->stop; j += g->per, m++) {
                float *row = flut + m * 16;
                const int per = j + g->per <= g->stop ? (int)g->per : (int)(g->stop - j);
#ifdef TQ_X86
                /* SSE2 (every x86-64 CPU): GCC leaves the loop below scalar (row might alias q). */
                __m128 e[4] = {_mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps()};
                for (int t = 0; t < per; t++) {
                    const __m128 x = _mm_set1_ps(q[j + t]);
                    for (int i = 0; i < 4; i++) e[i] = _mm_add_ps(e[i], _mm_mul_ps(x, _mm_loadu_ps(w[t] + 4 * i)));
                }
                for (int i = 0; i < 4; i++) _mm_storeu_ps(row + 4 * i, e[i]);
#else
                for (int t = 0; t < per; t++) {
                    const float x = q[j + t];
                    for (int v = 0; v < 16; v++) row[v] += x * w[t][v];
                }
#endif
            }
        }
        if (g->bits == 5) m = first + wide;  /* the wide group's zero padding */
    }
    /* One pass for every nibble's minimum (its shift), span and largest magnitude. Minima and maxima
     * are kept in four lanes (independent, so the compiler can use SIMD without reordering a sum). */
    float span = 0.0f, shift_sum = 0.0f, mag = 0.0f;
#ifdef TQ_X86
    const int wide512 = !portable && have_avx512() && simd_limit >= LEVEL_AVX512;
#endif
    for (m = 0; m < nibbles; m++) {
        float lo, hi;
#ifdef TQ_X86
        if (wide512 && m >= wide)
            entry_range_avx512(flut + m * 16, &lo, &hi);
        else
#endif
            entry_range(flut + m * 16, m < wide ? flut + (nibbles + m) * 16 : NULL, &lo, &hi);
        span = hi - lo > span ? hi - lo : span;
        shift_sum += lo;
        mag += fabsf(lo) > fabsf(hi) ? fabsf(lo) : fabsf(hi);  /* max |x| is at an end of [lo, hi] */
    }
    const float step = span > 0.0f ? span / (float)LUT_MAX : 1.0f;
    const float inv = 1.0f / step;
    float err_sum = 0.0f;
    for (m = 0; m < nibbles; m++) {
        const Py_ssize_t at[2] = {m * 16, (nibbles + m) * 16};
        const int nparts = m < wide ? 2 : 1;
        float lo, hi;
#ifdef TQ_X86
        if (wide512 && nparts == 1) {
            entry_range_avx512(flut + at[0], &lo, &hi);
            const float err = quantize16_avx512(flut + at[0], lo, inv, step, lut + at[0]);
            err_sum += err > 0.0f ? err : 0.0f;
            continue;
        }
#endif
        entry_range(flut + at[0], nparts == 2 ? flut + at[1] : NULL, &lo, &hi);
        float worst = 0.0f;
        for (int p = 0; p < nparts; p++) {
            const float err = quantize16(flut + at[p], lo, inv, step, lut + at[p], portable);
            worst = err > worst ? err : worst;
        }
        err_sum += worst;
    }
    *delta = step;
    *bias = shift_sum;
    *tol = err_sum;
    *magnitude = mag;
}

/* The tables' group tuples (start, stop, bits, per, centroids[, codewords]; see query_tables) into g (up
 * to 8), their buffers taken into b; the caller names itself in errors. Returns the group count, or -1. */
static int parse_groups(PyObject *groups, Py_ssize_t dim, Py_ssize_t ncols, Py_ssize_t wcols, buffer_set *b,
                        nibble_group *g, const char *name) {
    const int ngroups = (int)PyList_GET_SIZE(groups);
    if (ngroups < 1 || ngroups > 8 || dim < 1 || ncols < 1 || wcols < 0 || wcols % 4 || wcols > ncols) {
        PyErr_Format(PyExc_ValueError, "%s: need 1..8 groups, dim >= 1, ncols >= 1, wcols a multiple of 4 in "
                     "[0, ncols]", name);
        return -1;
    }
    Py_ssize_t nibbles = 0;
    for (int i = 0; i < ngroups; i++) {
        PyObject *cen, *words = NULL;
        void *p;
        g[i].codewords = NULL;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(groups, i), "nnnnO|O", &g[i].start, &g[i].stop, &g[i].bits, &g[i].per,
                              &cen, &words))
            return -1;
        /* A 5-bit group: first, one code per nibble, fitting the 2*wcols wide nibbles. */
        int wide_ok = g[i].bits != 5 || (i == 0 && g[i].per == 1 && g[i].stop - g[i].start <= 2 * wcols);
        if (g[i].bits < 1 || g[i].bits > 5 || g[i].per < 1 || (g[i].bits < 5 && g[i].per * g[i].bits > 4) ||
            !wide_ok || g[i].start < 0 || g[i].stop > dim || g[i].stop < g[i].start ||
            (words && (g[i].bits * g[i].per != 4 || (g[i].stop - g[i].start) % g[i].per))) {
            PyErr_Format(PyExc_ValueError, "%s: bad group", name);
            return -1;
        }
        if (take(b, cen, 0, ((Py_ssize_t)1 << g[i].bits) * (Py_ssize_t)sizeof(float), "centroids", &p) < 0) return -1;
        g[i].centroids = p;
        if (words) {
            if (take(b, words, 0, 16 * g[i].per * (Py_ssize_t)sizeof(float), "codewords", &p) < 0) return -1;
            g[i].codewords = p;
        }
        nibbles += g[i].bits == 5 ? 2 * wcols : (g[i].stop - g[i].start + g[i].per - 1) / g[i].per;
    }
    if (wcols && g[0].bits != 5) {
        PyErr_Format(PyExc_ValueError, "%s: wcols > 0 needs a first group of 5 bits", name);
        return -1;
    }
    if (nibbles > 2 * ncols) {
        PyErr_Format(PyExc_ValueError, "%s: the groups need more nibbles than 2 * ncols", name);
        return -1;
    }
    return ngroups;
}

/* ---- int8 queries ---------------------------------------------------------------------------------
 * For one scalar group of 4-bit (or 3-bit, in a nibble) codes, rows can be scored against an int8 copy
 * of the query instead of per-query tables: every coordinate shares the group's levels c[0..15], so a
 * nibble decodes to a level byte once for a whole tile of queries, and vpdpbusd sums four coordinates'
 * products at once (scan_int8 in _scan.h). With
 *   L[k] = round((c[k] - cmin) / alpha) in 0..255, alpha = (cmax - cmin) / 255, e[k] = c[k] - cmin - alpha L[k],
 *   qi[j] = round(q[j] / Delta) in -127..127, Delta = max |q| / 127, f[j] = q[j] - Delta qi[j],
 * the exact dot sum_j q[j] c[k_j] = alpha Delta S + cmin sum_j q[j] + sum_j (alpha f[j] L[k_j] + q[j] e[k_j])
 * with S = sum_j qi[j] L[k_j], the kernel's integer sum. So delta = alpha Delta, bias = cmin sum_j q[j],
 * and tol = sum_j max_k |alpha f[j] L[k] + q[j] e[k]| bounds the error for every row (computed in double,
 * rounded up). Layout of qint, int32 [nq][groups][2] (groups = ceil(ncols / 4)): byte t of word
 * [g][0] is qi of the low nibble of column 4g + t (coordinate 8g + 2t), of word [g][1] the high nibble's
 * (8g + 2t + 1); zero past dim. levels: L[i & 15] for i in 0..63 (a vpermb table that ignores a
 * byte's bits 4-5). */
typedef struct {
    int nlevels;
    uint8_t L[16];  /* the level bytes, zero past nlevels */
    double e[16];   /* e[k] = c[k] - cmin - alpha L[k] */
    double alpha, cmin, cmax;
} int8_levels;

/* The level bytes of a group's nlevels levels c (2..16). */
static void int8_levels_of(const float *c, int nlevels, int8_levels *lv) {
    memset(lv, 0, sizeof(*lv));
    lv->nlevels = nlevels;
    lv->cmin = lv->cmax = c[0];
    for (int k = 1; k < nlevels; k++) {
        lv->cmin = c[k] < lv->cmin ? c[k] : lv->cmin;
        lv->cmax = c[k] > lv->cmax ? c[k] : lv->cmax;
    }
    lv->alpha = lv->cmax > lv->cmin ? (lv->cmax - lv->cmin) / 255.0 : 1.0;
    for (int k = 0; k < nlevels; k++) {
        double r = nearbyint((c[k] - lv->cmin) / lv->alpha);
        r = r > 255.0 ? 255.0 : r < 0.0 ? 0.0 : r;
        lv->L[k] = (uint8_t)r;
        lv->e[k] = c[k] - lv->cmin - lv->alpha * r;
    }
}

static void query_int8(const float *q, Py_ssize_t dim, Py_ssize_t bytes, const int8_levels *lv, int8_t *qint,
                       float *delta, float *bias, float *tol, float *magnitude) {
    const int nlevels = lv->nlevels;
    const uint8_t *L = lv->L;
    const double *e = lv->e, alpha = lv->alpha, cmin = lv->cmin, cmax = lv->cmax;
    double big = 0.0, sum = 0.0, abs_sum = 0.0;
    for (Py_ssize_t j = 0; j < dim; j++) {
        const double v = q[j];
        big = fabs(v) > big ? fabs(v) : big;
        sum += v;
        abs_sum += fabs(v);
    }
    const double step = big > 0.0 ? big / 127.0 : 1.0;
    memset(qint, 0, (size_t)bytes);  /* int8_query_bytes(ncols): zero past dim */
    double err = 0.0;
    for (Py_ssize_t j = 0; j < dim; j++) {
        double r = nearbyint(q[j] / step);
        r = r > 127.0 ? 127.0 : r < -127.0 ? -127.0 : r;
        const double f = q[j] - step * r;
        double worst = 0.0;
        for (int k = 0; k < nlevels; k++) {
            const double d = fabs(alpha * f * L[k] + (double)q[j] * e[k]);
            worst = d > worst ? d : worst;
        }
        err += worst;
        const Py_ssize_t col = j >> 1, g = col >> 2;
        qint[g * 8 + (j & 1) * 4 + (col & 3)] = (int8_t)r;
    }
    *delta = (float)(alpha * step);
    *bias = (float)(cmin * sum);
    /* Rounded up, plus a relative 2^-20 for the double sums' own rounding. */
    *tol = nextafterf((float)(err * (1.0 + 0x1p-20)), INFINITY);
    *magnitude = (float)(abs_sum * (fabs(cmin) > fabs(cmax) ? fabs(cmin) : fabs(cmax)));
}

/* A search's queries made in C: rotation, ||q||^2 and the tables or int8 queries (make_queries, for a
 * range of the queries at a time), for `search` and the table makers alike. */
struct query_maker {
    const float *queries;   /* [nq][dim], as scored (centred or normalised by the caller) */
    const float *mt;        /* [dim][dim], the rotation's transpose; NULL: the queries are rotated already */
    Py_ssize_t dim;
    int l2, portable;
    int split;              /* threads a lone query's rotation is split over (split_threads); 0, 1: none */
    nibble_group groups[8]; /* the tables' (no int8 queries) */
    int ngroups;
    Py_ssize_t nibbles, wide, entries;
    int8_levels lv;         /* the int8 queries' (with qint) */
    Py_ssize_t qbytes;
    /* The made inputs, [nq] rows each: what the scan's arguments point at. */
    float *rotated, *qn2, *delta, *bias, *tol, *mag, *fluts;
    uint8_t *luts;
    int8_t *qint;
};

/* The per-query float32 outputs of the table makers (delta, bias, tol, magnitude, each [nq]), taken
 * as writable buffers into b, as the maker's outputs. */
static int take_query_floats(PyObject *delta, PyObject *bias, PyObject *tol, PyObject *magnitude, Py_ssize_t nq,
                             buffer_set *b, query_maker *m) {
    PyObject *objs[4] = {delta, bias, tol, magnitude};
    const char *names[4] = {"delta", "bias", "tol", "magnitude"};
    float **outs[4] = {&m->delta, &m->bias, &m->tol, &m->mag};
    for (int i = 0; i < 4; i++) {
        void *p;
        if (take(b, objs[i], 1, nq * (Py_ssize_t)sizeof(float), names[i], &p) < 0) return -1;
        *outs[i] = p;
    }
    return 0;
}

/* The int8 scan's 64-byte level table: L[i & 15] at byte i (vpermb ignores a byte's bits 4-5). */
static void int8_level_table(const int8_levels *lv, uint8_t *out) {
    for (int i = 0; i < 64; i++) out[i] = lv->L[i & 15];
}

/* The table makers' end: the queries [0, nq) made without the GIL, the buffers released; None. */
static PyObject *make_all(const query_maker *m, buffer_set *b, Py_ssize_t nq) {
    Py_BEGIN_ALLOW_THREADS
    make_queries(m, 0, nq);
    Py_END_ALLOW_THREADS
    buffers_free(b);
    Py_RETURN_NONE;
}

static PyObject *tables(PyObject *self, PyObject *args) {
    PyObject *rotated, *groups, *luts, *fluts, *delta, *bias, *tol, *magnitude;
    Py_ssize_t dim, nq, ncols, wcols = 0;
    int portable = 0;
    if (!PyArg_ParseTuple(args, "OnnO!nOOOOOO|np", &rotated, &dim, &nq, &PyList_Type, &groups, &ncols, &luts, &fluts,
                          &delta, &bias, &tol, &magnitude, &wcols, &portable))
        return NULL;
    if (nq < 0) {
        PyErr_SetString(PyExc_ValueError, "tables: nq must be >= 0");
        return NULL;
    }
    query_maker m;
    buffer_set b;
    void *qp, *lp, *fp;
    memset(&m, 0, sizeof(m));
    if (buffers_init(&b, MAX_BUFS) < 0) return NULL;
    m.ngroups = parse_groups(groups, dim, ncols, wcols, &b, m.groups, "tables");
    if (m.ngroups < 0) goto done;
    m.dim = dim;
    m.portable = portable;
    m.nibbles = 2 * ncols;
    m.wide = 2 * wcols;
    m.entries = (m.nibbles + m.wide) * 16;
    if (take(&b, rotated, 0, nq * dim * (Py_ssize_t)sizeof(float), "rotated", &qp) < 0 ||
        take(&b, luts, 1, nq * m.entries, "luts", &lp) < 0 ||
        take(&b, fluts, 1, nq * m.entries * (Py_ssize_t)sizeof(float), "fluts", &fp) < 0 ||
        take_query_floats(delta, bias, tol, magnitude, nq, &b, &m) < 0)
        goto done;
    m.queries = m.rotated = qp;  /* rotated already: never written */
    m.luts = lp;
    m.fluts = fp;
    return make_all(&m, &b, nq);
done:
    buffers_free(&b);
    return NULL;
}

/* int8_tables(rotated, dim, nq, ncols, centroids, nlevels, qint, levels, delta, bias, tol, magnitude) */
static PyObject *int8_tables(PyObject *self, PyObject *args) {
    PyObject *rotated, *centroids, *qint, *levels, *delta, *bias, *tol, *magnitude;
    Py_ssize_t dim, nq, ncols;
    int nlevels;
    if (!PyArg_ParseTuple(args, "OnnnOiOOOOOO", &rotated, &dim, &nq, &ncols, &centroids, &nlevels, &qint, &levels,
                          &delta, &bias, &tol, &magnitude))
        return NULL;
    if (dim < 1 || nq < 0 || nlevels < 2 || nlevels > 16 || (dim + 1) / 2 > ncols || dim > INT8_SCAN_MAX_DIM) {
        PyErr_Format(PyExc_ValueError, "int8_tables: need 1 <= dim <= %d in ncols nibble pairs and 2-16 levels",
                     INT8_SCAN_MAX_DIM);
        return NULL;
    }
    query_maker m;
    buffer_set b;
    void *c, *qp, *qi, *lp;
    memset(&m, 0, sizeof(m));
    m.dim = dim;
    m.qbytes = int8_query_bytes(ncols);
    if (buffers_init(&b, MAX_BUFS) < 0) return NULL;
    if (take(&b, centroids, 0, 16 * (Py_ssize_t)sizeof(float), "centroids", &c) < 0 ||
        take(&b, rotated, 0, nq * dim * (Py_ssize_t)sizeof(float), "rotated", &qp) < 0 ||
        take(&b, qint, 1, nq * m.qbytes, "qint", &qi) < 0 || take(&b, levels, 1, 64, "levels", &lp) < 0 ||
        take_query_floats(delta, bias, tol, magnitude, nq, &b, &m) < 0)
        goto done;
    m.queries = m.rotated = qp;  /* rotated already: never written */
    m.qint = qi;
    int8_levels_of(c, nlevels, &m.lv);
    int8_level_table(&m.lv, lp);
    return make_all(&m, &b, nq);
done:
    buffers_free(&b);
    return NULL;
}

/* int8_block_sums(qint, levels, codes, ncols, nq, nblocks, out, portable): the int8 scan's integer
 * sums, int32 [nq][nblocks][32] in row order, from the SIMD kernel (where the CPU has it) or the
 * portable loop: for tests, which compare the two exactly. */
static PyObject *int8_block_sums(PyObject *self, PyObject *args) {
    PyObject *qint, *levels, *codes, *out;
    Py_ssize_t ncols, nq, nblocks;
    int portable;
    if (!PyArg_ParseTuple(args, "OOOnnnOp", &qint, &levels, &codes, &ncols, &nq, &nblocks, &out, &portable))
        return NULL;
    if (ncols < 1 || nq < 0 || nblocks < 0) {
        PyErr_SetString(PyExc_ValueError, "int8_block_sums: need ncols >= 1, nq >= 0, nblocks >= 0");
        return NULL;
    }
    scan_args a;
    memset(&a, 0, sizeof(a));
    a.ncols = ncols;
    a.nq = nq;
    Py_buffer bufs[4];
    int held = 0, ok = 0;
    if (get_buffer(qint, &bufs[held], 0, nq * int8_query_bytes(ncols), "qint") < 0) goto done;
    a.qint = bufs[held++].buf;
    if (get_buffer(levels, &bufs[held], 0, 64, "levels") < 0) goto done;
    a.levels = bufs[held++].buf;
    if (get_buffer(codes, &bufs[held], 0, nblocks * ncols * BLOCK, "codes") < 0) goto done;
    a.codes = bufs[held++].buf;
    if (get_buffer(out, &bufs[held], 1, nq * nblocks * BLOCK * (Py_ssize_t)sizeof(int32_t), "out") < 0) goto done;
    uint32_t *o = bufs[held++].buf;
    const int simd = !portable && scan_level() == LEVEL_AVX512VBMI;
    if (!portable && !simd) {
        PyErr_SetString(PyExc_RuntimeError, "int8_block_sums: this CPU's scan level has no int8 kernel");
        goto done;
    }
    for (Py_ssize_t q = 0; q < nq; q++)
        for (Py_ssize_t b = 0; b < nblocks; b++) {
            uint32_t *at = o + (q * nblocks + b) * BLOCK;
#ifdef TQ_X86
            if (simd) {
                block_sums_int8_rows(&a, q, b, at);
                continue;
            }
#endif
            block_sums_int8_portable(&a, q, b, at);
        }
    ok = 1;
done:
    return release(bufs, held, ok);
}

/* PANEL_BYTES: a matrix this large or larger is read in column panels of ROTATE_PANEL floats by batches of
 * eight rows and more (rotate_rows_avx512), and split by columns over threads for a lone row
 * (matmul_row_split): about half a core's L2 here, the most one pass may hold with what else it reads. */
#define PANEL_BYTES ((Py_ssize_t)1 << 20)
#define ROTATE_PANEL 64

/* ---- rotation -----------------------------------------------------------------------------------
 * rotate(x, mt, out, rows, dim): out = x @ mt for float32 x [rows][dim] and mt [dim][dim] (the
 * rotation's transpose), in this thread. Row i's k-th value is sum_j x[i][j] * mt[j][k] in increasing
 * j; four rows share each row of mt. It exists so that a search never starts torch's intra-op
 * (OpenMP) pool, whose threads spin after a matmul and take the cores from the scan threads. */
__attribute__((always_inline)) static inline void rotate_rows(const float *restrict x, const float *restrict mt,
                                                             Py_ssize_t ld, float *restrict out, Py_ssize_t rows,
                                                             Py_ssize_t dim, Py_ssize_t cols) {
    /* out [rows][cols] = x [rows][dim] @ mt [dim][cols], mt's rows ld floats apart (cols = ld = dim for a
     * rotation; a part of its columns: mt from the part's first, ld = dim) */
    Py_ssize_t i = 0;
    for (; i + 4 <= rows; i += 4) {
        float *restrict o0 = out + i * cols, *restrict o1 = o0 + cols, *restrict o2 = o1 + cols,
                       *restrict o3 = o2 + cols;
        memset(o0, 0, 4 * cols * sizeof(float));
        for (Py_ssize_t j = 0; j < dim; j++) {
            const float a0 = x[i * dim + j], a1 = x[(i + 1) * dim + j], a2 = x[(i + 2) * dim + j],
                        a3 = x[(i + 3) * dim + j];
            const float *restrict m = mt + j * ld;
            for (Py_ssize_t k = 0; k < cols; k++) {
                o0[k] += a0 * m[k];
                o1[k] += a1 * m[k];
                o2[k] += a2 * m[k];
                o3[k] += a3 * m[k];
            }
        }
    }
    for (; i < rows; i++) {
        float *restrict o = out + i * cols;
        memset(o, 0, cols * sizeof(float));
        for (Py_ssize_t j = 0; j < dim; j++) {
            const float a = x[i * dim + j];
            const float *restrict m = mt + j * ld;
            for (Py_ssize_t k = 0; k < cols; k++) o[k] += a * m[k];
        }
    }
}

#ifdef TQ_X86
/* The same loop in 256-bit vectors: each output is still summed in increasing j, one multiply and one
 * add at a time (no contraction), so the results are the SSE loop's, bit for bit. */
__attribute__((target(TQ_AVX2))) static void rotate_rows_avx2(const float *restrict x, const float *restrict mt,
                                                          Py_ssize_t ld, float *restrict out, Py_ssize_t rows,
                                                          Py_ssize_t dim, Py_ssize_t cols) {
    rotate_rows(x, mt, ld, out, rows, dim, cols);
}

/* rotate_rows in 512-bit vectors, R rows (1-4, a constant after inlining) at a time: each run of 16 * RUN
 * outputs of each row is kept in registers while j goes over the whole row of x (rotate_rows loads and
 * stores every output once per j), each output still summed in increasing j, one multiply and one add at a
 * time, so the results are rotate_rows', bit for bit. Runs are as long as the registers allow for R rows
 * (24, 12, 8 registers for 1, 2, 3 rows: a single row then reads each row of mt whole, in order), then
 * shorter ones (16, 8, then 4 registers: a partitioned query's probe of 128-1,024 lists); a last run of
 * fewer than 16 outputs is read and written with masks. This function: the outputs from *kp on, in runs
 * of RUN registers while a whole run fits. */
__attribute__((target(TQ_AVX512), always_inline)) static inline void rotate_runs_avx512(
        const float *restrict x, const float *restrict mt, Py_ssize_t ld, float *restrict out, Py_ssize_t ldo,
        Py_ssize_t dim, Py_ssize_t cols, const int R, const int RUN, Py_ssize_t *kp) {
    Py_ssize_t k = *kp;
    for (; k + 16 * RUN <= cols; k += 16 * RUN) {
        __m512 acc[4][24];
        for (int i = 0; i < R; i++)
#pragma GCC unroll 24
            for (int r = 0; r < RUN; r++) acc[i][r] = _mm512_setzero_ps();
        for (Py_ssize_t j = 0; j < dim; j++) {
            const float *m = mt + j * ld + k;
            __m512 a[4];
            for (int i = 0; i < R; i++) a[i] = _mm512_set1_ps(x[i * dim + j]);
#pragma GCC unroll 24
            for (int r = 0; r < RUN; r++) {
                const __m512 mv = _mm512_loadu_ps(m + 16 * r);
                for (int i = 0; i < R; i++) acc[i][r] = _mm512_add_ps(acc[i][r], _mm512_mul_ps(a[i], mv));
            }
        }
        for (int i = 0; i < R; i++)
#pragma GCC unroll 24
            for (int r = 0; r < RUN; r++) _mm512_storeu_ps(out + i * ldo + k + 16 * r, acc[i][r]);
    }
    *kp = k;
}

__attribute__((target(TQ_AVX512), always_inline)) static inline void rotate_run_avx512(
        const float *restrict x, const float *restrict mt, Py_ssize_t ld, float *restrict out, Py_ssize_t ldo,
        Py_ssize_t dim, Py_ssize_t cols, const int R, const int LONG) {
    Py_ssize_t k = 0;
    rotate_runs_avx512(x, mt, ld, out, ldo, dim, cols, R, LONG, &k);  /* long runs, then shorter ones down to four */
    if (LONG > 16) rotate_runs_avx512(x, mt, ld, out, ldo, dim, cols, R, 16, &k);
    if (LONG > 8) rotate_runs_avx512(x, mt, ld, out, ldo, dim, cols, R, 8, &k);
    if (LONG > 4) rotate_runs_avx512(x, mt, ld, out, ldo, dim, cols, R, 4, &k);
    for (; k < cols; k += 16) {
        const __mmask16 live = cols - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (cols - k)) - 1);
        __m512 acc[4];
        for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
        for (Py_ssize_t j = 0; j < dim; j++) {
            const __m512 m = _mm512_maskz_loadu_ps(live, mt + j * ld + k);
            for (int i = 0; i < R; i++)
                acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(_mm512_set1_ps(x[i * dim + j]), m));
        }
        for (int i = 0; i < R; i++) _mm512_mask_storeu_ps(out + i * ldo + k, live, acc[i]);
    }
}

__attribute__((target(TQ_AVX512))) static void rotate_rows_avx512(const float *restrict x, const float *restrict mt,
                                                                Py_ssize_t ld, float *restrict out, Py_ssize_t rows,
                                                                Py_ssize_t dim, Py_ssize_t cols) {
    Py_ssize_t i = 0;
    if (rows >= 8 && dim * cols * (Py_ssize_t)sizeof(float) >= PANEL_BYTES) {
        /* Column panels outermost: a panel of mt (dim x ROTATE_PANEL floats, 192 KiB at 768-d) is read
         * from a core's own cache by every group of four rows, where the whole matrix, larger than that
         * cache, would come from farther out once per group. Each output is summed as below. */
        for (Py_ssize_t k0 = 0; k0 < cols; k0 += ROTATE_PANEL) {
            const Py_ssize_t w = cols - k0 < ROTATE_PANEL ? cols - k0 : ROTATE_PANEL;
            for (i = 0; i + 4 <= rows; i += 4)
                rotate_run_avx512(x + i * dim, mt + k0, ld, out + i * cols + k0, cols, dim, w, 4, 4);
        }
    } else {
        for (; i + 4 <= rows; i += 4) rotate_run_avx512(x + i * dim, mt, ld, out + i * cols, cols, dim, cols, 4, 4);
    }
    switch (rows - i) {
        case 3: rotate_run_avx512(x + i * dim, mt, ld, out + i * cols, cols, dim, cols, 3, 8); break;
        case 2: rotate_run_avx512(x + i * dim, mt, ld, out + i * cols, cols, dim, cols, 2, 12); break;
        case 1: rotate_run_avx512(x + i * dim, mt, ld, out + i * cols, cols, dim, cols, 1, 24); break;
        default: break;
    }
}
#endif

/* x [rows][dim] @ m [dim][cols] (m's rows ld floats apart) in the loop this CPU runs (the same results
 * either way: each output summed in increasing j, one multiply and one add at a time). */
static void matmul_rows_ld(const float *x, const float *m, Py_ssize_t ld, float *out, Py_ssize_t rows,
                           Py_ssize_t dim, Py_ssize_t cols) {
#ifdef TQ_X86
    if (have_avx512() && simd_limit >= LEVEL_AVX512) {
        rotate_rows_avx512(x, m, ld, out, rows, dim, cols);
        return;
    }
    if (have_avx2()) {
        rotate_rows_avx2(x, m, ld, out, rows, dim, cols);
        return;
    }
#endif
    rotate_rows(x, m, ld, out, rows, dim, cols);
}

static void matmul_rows(const float *x, const float *m, float *out, Py_ssize_t rows, Py_ssize_t dim, Py_ssize_t cols) {
    matmul_rows_ld(x, m, cols, out, rows, dim, cols);
}

static void rotate_any(const float *x, const float *mt, float *out, Py_ssize_t rows, Py_ssize_t dim) {
    matmul_rows(x, mt, out, rows, dim, dim);
}

/* One row's product split by columns over the pool's threads, where the matrix is larger than a core's
 * share of cache (PANEL_BYTES and up: a rotation of 512-d and up, a probe of 1,024 lists at 384-d): one
 * core reads the whole matrix from farther out (a 768-d rotation, 2.25 MiB, took twelve times a 384-d
 * one's); two read half each, and each half can stay in its core's own cache between queries.
 * Each output is made exactly as matmul_rows makes it (its own sum over j), so a split changes no bit. */

typedef struct {
    const float *x, *m;
    float *out;
    Py_ssize_t dim, cols;
    int parts;
} split_job;

/* Part t's first column: an even share of cols, on a 16-float (64-byte) boundary. */
static Py_ssize_t split_edge(Py_ssize_t cols, int t, int parts) {
    return t >= parts ? cols : (cols * t / parts) & ~(Py_ssize_t)15;
}

static void split_part(void *ctx, int t) {
    const split_job *r = ctx;
    const Py_ssize_t k0 = split_edge(r->cols, t, r->parts), k1 = split_edge(r->cols, t + 1, r->parts);
    if (k1 > k0) matmul_rows_ld(r->x, r->m + k0, r->cols, r->out + k0, 1, r->dim, k1 - k0);
}

/* Threads worth splitting one row's product with m [dim][cols] over, of `threads`: 1 below
 * PANEL_BYTES, and no more than one per 256 columns. */
static int split_threads(Py_ssize_t dim, Py_ssize_t cols, int threads) {
    if (dim * cols * (Py_ssize_t)sizeof(float) < PANEL_BYTES) return 1;
    const Py_ssize_t most = cols / 256;
    return threads < most ? threads : most < 1 ? 1 : (int)most;
}

/* out [cols] = x [dim] @ m [dim][cols] in `parts` column parts (1: here, as matmul_rows). */
static void matmul_row_split(const float *x, const float *m, float *out, Py_ssize_t dim, Py_ssize_t cols,
                             int parts) {
    if (parts <= 1) {
        matmul_rows(x, m, out, 1, dim, cols);
        return;
    }
    split_job r = {x, m, out, dim, cols, parts};
    pool_run(split_part, &r, parts);
}

/* A float32 row's norm, summed in double (four running sums, in a fixed order). */
static double row_norm(const float *v, Py_ssize_t dim) {
    double part[4] = {0.0, 0.0, 0.0, 0.0};
    Py_ssize_t j = 0;
    for (; j + 4 <= dim; j += 4)
        for (int t = 0; t < 4; t++) part[t] += (double)v[j + t] * v[j + t];
    for (; j < dim; j++) part[0] += (double)v[j] * v[j];
    return sqrt((part[0] + part[1]) + (part[2] + part[3]));
}

/* Whether a row of this norm fails Index.search's checks (validation.check_norms): not finite, above
 * max_norm, or zero where zero_ok is false. */
static inline int norm_fails(double norm, double max_norm, int zero_ok) {
    return !(norm <= max_norm) || (!zero_ok && norm == 0.0);
}

/* One query checked (where max_norm > 0) and, with `scaled`, scaled to unit norm as Index.search scales a
 * cosine query (q / ||q||, bit for bit): 1 where it fails the checks. */
static int check_query(const float *q, Py_ssize_t dim, double max_norm, int zero_ok, float *scaled) {
    const double norm = row_norm(q, dim);
    if (max_norm > 0.0 && norm_fails(norm, max_norm, zero_ok)) return 1;
    for (Py_ssize_t j = 0; scaled && j < dim; j++) scaled[j] = q[j] / (float)norm;
    return 0;
}

/* row_norms(x, out, rows, dim, max_norm, zero_ok) -> the first row whose norm is not finite, above
 * max_norm, or zero where zero_ok is false, or -1. Norms are summed in double (four running sums, in a
 * fixed order), so no float32 row can overflow them; out gets them as float32. Releases the GIL. */
static PyObject *row_norms(PyObject *self, PyObject *args) {
    PyObject *x, *out;
    Py_ssize_t rows, dim;
    double max_norm;
    int zero_ok;
    if (!PyArg_ParseTuple(args, "OOnndp", &x, &out, &rows, &dim, &max_norm, &zero_ok)) return NULL;
    if (rows < 0 || dim < 1) {
        PyErr_SetString(PyExc_ValueError, "row_norms: rows must be >= 0 and dim >= 1");
        return NULL;
    }
    Py_buffer bufs[2];
    int held = 0, ok = 0;
    Py_ssize_t first = -1;
    if (get_buffer(x, &bufs[held], 0, rows * dim * (Py_ssize_t)sizeof(float), "x") < 0) goto done;
    held++;
    if (get_buffer(out, &bufs[held], 1, rows * (Py_ssize_t)sizeof(float), "out") < 0) goto done;
    held++;
    const float *xs = bufs[0].buf;
    float *norms = bufs[1].buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) {
        const double norm = row_norm(xs + r * dim, dim);
        norms[r] = (float)norm;
        if (first < 0 && norm_fails(norm, max_norm, zero_ok)) first = r;
    }
    Py_END_ALLOW_THREADS
    ok = 1;
done:
    PyObject *none = release(bufs, held, ok);
    if (!none) return NULL;
    Py_DECREF(none);
    return PyLong_FromSsize_t(first);
}

static PyObject *rotate(PyObject *self, PyObject *args) {
    PyObject *x, *mt, *out;
    Py_ssize_t rows, dim;
    if (!PyArg_ParseTuple(args, "OOOnn", &x, &mt, &out, &rows, &dim)) return NULL;
    if (rows < 0 || dim < 1) {
        PyErr_SetString(PyExc_ValueError, "rotate: rows must be >= 0 and dim >= 1");
        return NULL;
    }
    Py_buffer bufs[3];
    int held = 0, ok = 0;
    if (get_buffer(x, &bufs[held], 0, rows * dim * (Py_ssize_t)sizeof(float), "x") < 0) goto done;
    held++;
    if (get_buffer(mt, &bufs[held], 0, dim * dim * (Py_ssize_t)sizeof(float), "mt") < 0) goto done;
    held++;
    if (get_buffer(out, &bufs[held], 1, rows * dim * (Py_ssize_t)sizeof(float), "out") < 0) goto done;
    held++;
    Py_BEGIN_ALLOW_THREADS
    rotate_any(bufs[0].buf, bufs[1].buf, bufs[2].buf, rows, dim);
    Py_END_ALLOW_THREADS
    ok = 1;
done:
    return release(bufs, held, ok);
}

/* ---- selection ----------------------------------------------------------------------------------
 * select(scores, positions, out_scores, out_positions): per row, the k best of m (score, position) pairs
 * (float32 / int64 [nq][m]) in the scan's order (score descending, then position ascending: `ranks_below`),
 * written to out_* ([nq][k]) best first, padded with (-inf, -1). Merges partial answers of the fast scan
 * (thread splits, segments) so that the result never depends on the split. Releases the GIL. */
typedef struct {
    float s;
    int64_t id;
} scored;

static int best_first(const void *x, const void *y) {
    const scored *a = x, *b = y;
    return ranks_below(a->s, a->id, b->s, b->id) ? 1 : ranks_below(b->s, b->id, a->s, a->id) ? -1 : 0;
}

/* A heap of k (score, id) pairs in place, best first; tmp has room for k. */
static void sort_best_first(float *hs, int64_t *hi, Py_ssize_t k, scored *tmp) {
    for (Py_ssize_t j = 0; j < k; j++) {
        tmp[j].s = hs[j];
        tmp[j].id = hi[j];
    }
    qsort(tmp, (size_t)k, sizeof(scored), best_first);
    for (Py_ssize_t j = 0; j < k; j++) {
        hs[j] = tmp[j].s;
        hi[j] = tmp[j].id;
    }
}

static PyObject *select_best(PyObject *self, PyObject *args) {
    PyObject *scores, *positions, *out_s, *out_p;
    if (!PyArg_ParseTuple(args, "OOOO", &scores, &positions, &out_s, &out_p)) return NULL;
    Py_buffer bufs[4];
    int held = 0, ok = 0;
    scored *tmp = NULL;
    if (PyObject_GetBuffer(out_s, &bufs[held], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_ND) < 0) goto done;
    held++;
    if (bufs[0].ndim != 2 || bufs[0].itemsize != (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "select: out_scores must be float32 [nq][k]");
        goto done;
    }
    const Py_ssize_t nq = bufs[0].shape[0], k = bufs[0].shape[1];
    if (PyObject_GetBuffer(scores, &bufs[held], PyBUF_C_CONTIGUOUS | PyBUF_ND) < 0) goto done;
    held++;
    if (bufs[1].ndim != 2 || bufs[1].shape[0] != nq || bufs[1].itemsize != (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "select: scores must be float32 [nq][m]");
        goto done;
    }
    const Py_ssize_t m = bufs[1].shape[1];
    if (get_buffer(positions, &bufs[held], 0, nq * m * (Py_ssize_t)sizeof(int64_t), "positions") < 0) goto done;
    held++;
    if (get_buffer(out_p, &bufs[held], 1, nq * k * (Py_ssize_t)sizeof(int64_t), "out_positions") < 0) goto done;
    held++;
    tmp = PyMem_Malloc((k ? k : 1) * sizeof(scored));
    if (!tmp) {
        PyErr_NoMemory();
        goto done;
    }
    const float *sc = bufs[1].buf;
    const int64_t *ps = bufs[2].buf;
    float *os = bufs[0].buf;
    int64_t *op = bufs[3].buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t q = 0; q < nq; q++) {
        float *hs = os + q * k;
        int64_t *hi = op + q * k;
        heap_clear(hs, hi, k);
        for (Py_ssize_t j = 0; k && j < m; j++) {
            const float s = sc[q * m + j];
            const int64_t id = ps[q * m + j];
            if (s > -INFINITY && ranks_below(hs[0], hi[0], s, id)) heap_replace_top(hs, hi, k, s, id);
        }
        sort_best_first(hs, hi, k, tmp);  /* only finite scores entered: a -inf slot still holds id -1 */
    }
    Py_END_ALLOW_THREADS
    ok = 1;
done:
    PyMem_Free(tmp);
    return release(bufs, held, ok);
}

/* probe's work (no GIL needed): offsets = queries [nq][dim] @ centroids_t [dim][nlist] (doubled for l2),
 * and each query's nprobe best lists, best first (key: the offset, less ||c||^2 for l2; ties to the
 * lower list). key and tmp: room for nprobe entries. */
static void probe_rows(const float *queries, Py_ssize_t nq, const float *centroids_t, const float *norms,
                       Py_ssize_t dim, Py_ssize_t nlist, Py_ssize_t nprobe, int l2, float *offsets, int64_t *lists,
                       float *key, scored *tmp, int parts) {
    if (nq == 1)
        matmul_row_split(queries, centroids_t, offsets, dim, nlist, parts);  /* the same sums, split or not */
    else
        matmul_rows(queries, centroids_t, offsets, nq, dim, nlist);
    for (Py_ssize_t q = 0; q < nq; q++) {
        float *row = offsets + q * nlist;
        int64_t *top = lists + q * nprobe;
        heap_clear(key, top, nprobe);
        for (Py_ssize_t c = 0; c < nlist; c++) {
            if (l2) row[c] *= 2.0f;
            const float s = l2 ? row[c] - norms[c] : row[c];
            if (top[0] < 0 || ranks_below(key[0], top[0], s, c)) heap_replace_top(key, top, nprobe, s, c);
        }
        sort_best_first(key, top, nprobe, tmp);
    }
}

/* probe's shares: queries [q0, q1) of each of `shares` even parts, each with its own heap scratch. */
typedef struct {
    const float *queries, *centroids_t, *norms;
    Py_ssize_t nq, dim, nlist, nprobe;
    int l2, shares;
    float *offsets, *key;
    int64_t *lists;
    scored *tmp;
} probe_split;

static void probe_share(void *ctx, int t) {
    const probe_split *p = ctx;
    const Py_ssize_t q0 = p->nq * t / p->shares, q1 = p->nq * (t + 1) / p->shares;
    if (q1 > q0)
        probe_rows(p->queries + q0 * p->dim, q1 - q0, p->centroids_t, p->norms, p->dim, p->nlist, p->nprobe, p->l2,
                   p->offsets + q0 * p->nlist, p->lists + q0 * p->nprobe, p->key + t * p->nprobe,
                   p->tmp + t * p->nprobe, 1);
}

/* ---- probing a partitioned index's lists ----------------------------------------------------------
 * probe(queries, centroids_t, sq_norms, out_lists, out_offsets, l2, threads=1): every list's score offset
 * out_offsets [nq][nlist] = queries [nq][dim] @ centroids_t [dim][nlist] (float32, summed in increasing
 * j as `rotate`; doubled for l2), and the nprobe = out_lists' columns lists of each query with the best
 * key (the offset, less sq_norms [nlist] for l2: the nearest centroids), best first, ties to the lower
 * list. The queries are split into `threads` even shares on the pool's threads (each query's results
 * are its own: the same bits whatever the split). Releases the GIL. */
static PyObject *probe(PyObject *self, PyObject *args) {
    PyObject *queries, *centroids_t, *sq_norms, *out_lists, *out_offsets;
    Py_ssize_t dim, nlist;
    int l2, threads = 1;
    if (!PyArg_ParseTuple(args, "OOOOOnnp|i", &queries, &centroids_t, &sq_norms, &out_lists, &out_offsets, &dim,
                          &nlist, &l2, &threads))
        return NULL;
    if (check_threads(&threads, "probe") < 0) return NULL;
    if (dim < 1 || nlist < 1) {
        PyErr_SetString(PyExc_ValueError, "probe: dim and nlist must be >= 1");
        return NULL;
    }
    buffer_set b;
    scored *tmp = NULL;
    float *key = NULL;
    int ok = 0;
    void *qp, *cp, *np_ = NULL, *lp, *op;
    if (buffers_init(&b, MAX_BUFS) < 0) return NULL;
    const Py_ssize_t nq = take_float_rows(&b, queries, dim, "probe: queries", &qp);
    if (nq < 0) goto done;
    if (take(&b, centroids_t, 0, dim * nlist * (Py_ssize_t)sizeof(float), "centroids_t", &cp) < 0 ||
        (l2 && take(&b, sq_norms, 0, nlist * (Py_ssize_t)sizeof(float), "sq_norms", &np_) < 0) ||
        take(&b, out_offsets, 1, nq * nlist * (Py_ssize_t)sizeof(float), "out_offsets", &op) < 0 ||
        take(&b, out_lists, 1, -1, "out_lists", &lp) < 0)
        goto done;
    const Py_ssize_t nprobe = nq ? b.v[b.held - 1].len / (nq * (Py_ssize_t)sizeof(int64_t)) : 0;
    if (nq && (nprobe < 1 || nprobe > nlist || b.v[b.held - 1].len != nq * nprobe * (Py_ssize_t)sizeof(int64_t))) {
        PyErr_SetString(PyExc_ValueError, "probe: out_lists must be int64 [nq][nprobe] with 1 <= nprobe <= nlist");
        goto done;
    }
    const int shares = nq < threads ? (int)(nq ? nq : 1) : threads;
    tmp = PyMem_Malloc((size_t)shares * (size_t)(nprobe ? nprobe : 1) * sizeof(scored));
    key = PyMem_Malloc((size_t)shares * (size_t)(nprobe ? nprobe : 1) * sizeof(float));
    if (!tmp || !key) {
        PyErr_NoMemory();
        goto done;
    }
    probe_split split = {qp, cp, np_, nq, dim, nlist, nprobe, l2, shares, op, key, lp, tmp};
    Py_BEGIN_ALLOW_THREADS
    pool_run(probe_share, &split, shares);
    Py_END_ALLOW_THREADS
    ok = 1;
done:
    PyMem_Free(tmp);
    PyMem_Free(key);
    buffers_free(&b);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* ---- search: the queries made in the scan's call --------------------------------------------------
 * A single query's Python work (rotating, making tables, sorting the heap, each an allocation and a
 * call) cost as much as scanning 100k rows; here one call does all of it, with the GIL released once,
 * and the pool's workers woken first, so that their wake-up overlaps the query making. */

static void make_queries(const query_maker *m, Py_ssize_t q0, Py_ssize_t q1) {
    const Py_ssize_t d = m->dim;
    if (m->mt) {
        /* rotate()'s loops: a row's values do not depend on the rows rotated with it, nor on its split. */
        if (q1 - q0 == 1 && m->split > 1)
            matmul_row_split(m->queries + q0 * d, m->mt, m->rotated + q0 * d, d, d, m->split);
        else
            rotate_any(m->queries + q0 * d, m->mt, m->rotated + q0 * d, q1 - q0, d);
    }
    for (Py_ssize_t q = q0; q < q1; q++) {
        const float *r = m->rotated + q * d;
        if (m->l2) {
            const float *x = m->queries + q * d;
            double sum = 0.0;
            for (Py_ssize_t j = 0; j < d; j++) sum += (double)x[j] * x[j];
            m->qn2[q] = (float)sum;
        }
        if (m->qint)
            query_int8(r, d, m->qbytes, &m->lv, m->qint + q * m->qbytes, m->delta + q, m->bias + q, m->tol + q,
                       m->mag + q);
        else
            query_tables(r, m->groups, m->ngroups, m->nibbles, m->wide, m->luts + q * m->entries,
                         m->fluts + q * m->entries, m->delta + q, m->bias + q, m->tol + q, m->mag + q, m->portable);
    }
}

/* search's probes (int64 [nq][nprobe], each row's lists distinct), list_entries (int64 [nlist + 1]: list
 * L's entries are segments[list_entries[L] .. list_entries[L + 1]), from 0 to nseg, nondecreasing) and
 * list_offsets (float32 [nq][nlist]), checked and bound to lb. */
static int bind_probes(list_batch *lb, buffer_set *b, PyObject *probes, PyObject *list_entries,
                       PyObject *list_offsets, Py_ssize_t nq, Py_ssize_t nseg) {
    void *p;
    if (take(b, list_entries, 0, -1, "list_entries", &p) < 0) return -1;
    const Py_ssize_t len = b->v[b->held - 1].len;
    lb->first = p;
    lb->nlist = len / (Py_ssize_t)sizeof(int64_t) - 1;
    if (len % sizeof(int64_t) || lb->nlist < 1 || lb->first[0] != 0 || lb->first[lb->nlist] != nseg) {
        PyErr_SetString(PyExc_ValueError, "search: list_entries must be int64 [nlist + 1], from 0 to len(segments)");
        return -1;
    }
    for (Py_ssize_t l = 0; l < lb->nlist; l++)
        if (lb->first[l + 1] < lb->first[l]) {
            PyErr_SetString(PyExc_ValueError, "search: list_entries must be nondecreasing");
            return -1;
        }
    if (take(b, probes, 0, -1, "probes", &p) < 0) return -1;
    const Py_ssize_t plen = b->v[b->held - 1].len;
    lb->probes = p;
    lb->nq = nq;
    lb->nprobe = nq ? plen / (nq * (Py_ssize_t)sizeof(int64_t)) : 0;
    if (nq && (lb->nprobe < 1 || lb->nprobe > lb->nlist || plen != lb->nprobe * nq * (Py_ssize_t)sizeof(int64_t))) {
        PyErr_SetString(PyExc_ValueError, "search: probes must be int64 [nq][nprobe], 1 <= nprobe <= nlist");
        return -1;
    }
    for (Py_ssize_t i = 0; i < nq * lb->nprobe; i++)
        if (lb->probes[i] < 0 || lb->probes[i] >= lb->nlist) {
            PyErr_Format(PyExc_ValueError, "search: probes hold list %lld, outside [0, %zd)",
                         (long long)lb->probes[i], lb->nlist);
            return -1;
        }
    /* A query's lists distinct: a list's scan holds one copy of each of its queries' heaps. */
    Py_ssize_t *seen = PyMem_Malloc((size_t)lb->nlist * sizeof(Py_ssize_t));
    if (!seen) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t l = 0; l < lb->nlist; l++) seen[l] = -1;
    for (Py_ssize_t q = 0; q < nq; q++)
        for (Py_ssize_t p = 0; p < lb->nprobe; p++) {
            const int64_t l = lb->probes[q * lb->nprobe + p];
            if (seen[l] == q) {
                PyErr_Format(PyExc_ValueError, "search: query %zd probes list %lld twice", q, (long long)l);
                PyMem_Free(seen);
                return -1;
            }
            seen[l] = q;
        }
    PyMem_Free(seen);
    if (take(b, list_offsets, 0, nq * lb->nlist * (Py_ssize_t)sizeof(float), "list_offsets", &p) < 0) return -1;
    lb->offsets = p;
    return 0;
}

/* search(consts, queries, segments, out_scores, out_ids, exact_count, l2, int8, portable=False, threads=1,
 * query_norm2=None, row_ids=None, max_norm=0.0, zero_ok=True, normalize=False, offsets=None, probes=None,
 * list_entries=None, list_offsets=None) -> -1, or the
 * first query that fails the norm checks:
 * scan_segments (no floor) with the queries' inputs made in the same call from the queries (float32
 * [nq][dim]): rotated by mt, the tables' or, with int8, the int8 queries' (the same as `tables`,
 * `int8_tables` and `rotate` make), and for l2 ||q||^2 (summed in double, unless query_norm2, float32 [nq],
 * gives them). consts = (mt float32 [dim][dim] or None (queries rotated already), dim, groups (as
 * `tables`), ncols, wcols, row_bits, centroids float32 [16] or None, nlevels): what the plan's constant
 * fields hold. out_scores, out_ids and exact_count are written whole (their contents on entry are not
 * read): each query's k best come back sorted, best first (ties: the lower position), padded with (-inf,
 * -1), as positions or, given row_ids (one int64 array of ids per segment), as those ids. offsets (float32
 * [nsegments][nq], a partitioned index's list terms, or None) are added to every score of a segment's rows,
 * as scan_segments adds them. Before anything else, with max_norm > 0 every query's norm (summed in double,
 * as row_norms) must be at most max_norm and, unless zero_ok, not zero; with normalize the queries are
 * scaled by 1 / their float32 norm (into a copy). A query that fails those checks is returned, and then
 * nothing is scanned and the outputs are not written. A partitioned batch gives, instead of offsets, probes
 * (int64 [nq][nprobe]: the lists each query scans), list_entries (int64 [nlist + 1]: list L's segments are
 * segments[list_entries[L] .. list_entries[L + 1])) and list_offsets (float32 [nq][nlist]: list L's term in
 * query q's scores): each query scans only its lists' segments, with their terms (list_batch). */
static PyObject *search(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"consts", "queries", "segments", "out_scores", "out_ids", "exact_count", "l2", "int8",
                             "portable", "threads", "query_norm2", "row_ids", "max_norm", "zero_ok", "normalize",
                             "offsets", "probes", "list_entries", "list_offsets", "rotate_threads", NULL};
    PyObject *consts, *queries, *segments, *out_s, *out_i, *exact_count, *mt, *groups, *centroids, *qn2 = Py_None,
             *row_ids = Py_None, *offsets = Py_None, *probes = Py_None, *list_entries = Py_None,
             *list_offsets = Py_None;
    int l2, int8, portable = 0, threads = 1, nlevels, zero_ok = 1, normalize = 0, rotate_threads = 0;
    double max_norm = 0.0;
    Py_ssize_t dim, ncols, wcols, row_bits;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OO!OOOpp|piOOdppOOOOi", kwlist, &PyTuple_Type, &consts,
                                     &queries, &PyList_Type, &segments, &out_s, &out_i, &exact_count, &l2, &int8,
                                     &portable, &threads, &qn2, &row_ids, &max_norm, &zero_ok, &normalize, &offsets,
                                     &probes, &list_entries, &list_offsets, &rotate_threads))
        return NULL;
    if ((probes == Py_None) != (list_entries == Py_None) || (probes == Py_None) != (list_offsets == Py_None) ||
        (probes != Py_None && offsets != Py_None)) {
        PyErr_SetString(PyExc_ValueError,
                        "search: probes, list_entries and list_offsets go together, without offsets");
        return NULL;
    }
    if (!PyArg_ParseTuple(consts, "OnO!nnnOi;search: consts are (mt, dim, groups, ncols, wcols, row_bits, centroids, "
                          "nlevels)", &mt, &dim, &PyList_Type, &groups, &ncols, &wcols, &row_bits, &centroids,
                          &nlevels))
        return NULL;
    if (check_threads(&threads, "search") < 0) return NULL;
    if (rotate_threads < 1) rotate_threads = threads;  /* 0: as the scan's */
    if (check_threads(&rotate_threads, "search") < 0) return NULL;
    if (row_ids != Py_None && (!PyList_Check(row_ids) || PyList_GET_SIZE(row_ids) != PyList_GET_SIZE(segments))) {
        PyErr_SetString(PyExc_ValueError, "search: row_ids must be a list with one array per segment");
        return NULL;
    }
    const int row_bits_ok = row_bits == 0 || ((row_bits == 1 || row_bits == 2 || row_bits == 4) && !wcols &&
                                              (dim * row_bits + 7) / 8 <= ncols);
    if (dim < 1 || ncols < 1 || wcols < 0 || wcols % 4 || wcols > ncols || !row_bits_ok) {
        PyErr_SetString(PyExc_ValueError, "search: inconsistent dim / ncols / wcols / row_bits");
        return NULL;
    }
    if (int8 && (row_bits != 4 || wcols || dim > INT8_SCAN_MAX_DIM || nlevels < 2 || nlevels > 16)) {
        PyErr_Format(PyExc_ValueError, "search: int8 queries need codes of 4 bits a nibble (row_bits 4), no wide "
                     "columns, dim <= %d and 2-16 levels", INT8_SCAN_MAX_DIM);
        return NULL;
    }
    const Py_ssize_t nseg = PyList_GET_SIZE(segments);
    buffer_set b;
    bound_scan bs;
    query_maker m;
    /* Room for the queries' buffers (at most MAX_BUFS with eight groups) and six per segment (five
     * of its own, and its ids). */
    scan_args a;
    scored *tmp = NULL;
    char *made = NULL;
    float *normed = NULL;
    const int64_t **ids = NULL;  /* [nseg], each segment's ids (row_ids), or NULL */
    id_range *ranges = NULL;     /* [nseg], with ids */
    list_batch lb;               /* with probes */
    memset(&lb, 0, sizeof(lb));
    Py_ssize_t bad = -1;         /* the first query that fails the norm checks */
    int ok = 0;
    void *p;
    memset(&m, 0, sizeof(m));
    memset(&a, 0, sizeof(a));
    if (buffers_init(&b, MAX_BUFS + 3 + 6 * nseg) < 0) return NULL;  /* 3: probes, list_entries, list_offsets */
    if (bound_init(&bs, nseg) < 0) goto done;
    const Py_ssize_t nq = take_float_rows(&b, queries, dim, "search: queries", &p);
    if (nq < 0) goto done;
    m.queries = p;
    if (max_norm > 0.0 || normalize) {
        /* The checks and the scaling of Index.search (validation.check_norms, q / ||q||), bit for bit, in
         * one pass over the queries. */
        if (normalize && !(normed = PyMem_Malloc((size_t)(nq ? nq : 1) * dim * sizeof(float)))) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t q = 0; q < nq && bad < 0; q++)
            if (check_query(m.queries + q * dim, dim, max_norm, zero_ok, normed ? normed + q * dim : NULL)) bad = q;
        if (bad >= 0) {
            ok = 1;
            goto done;
        }
        if (normed) m.queries = normed;
    }
    m.dim = dim;
    m.l2 = l2;  /* cleared below where the norms are given */
    m.portable = portable;
    m.split = nq == 1 && mt != Py_None ? split_threads(dim, dim, rotate_threads) : 1;
    if (mt != Py_None) {
        if (take(&b, mt, 0, dim * dim * (Py_ssize_t)sizeof(float), "mt", &p) < 0) goto done;
        m.mt = p;
    }
    if (take(&b, out_s, 1, -1, "out_scores", &p) < 0) goto done;
    a.out_s = p;
    a.kp = nq ? b.v[b.held - 1].len / (nq * (Py_ssize_t)sizeof(float)) : 0;
    if (nq && (a.kp < 1 || b.v[b.held - 1].len != a.kp * nq * (Py_ssize_t)sizeof(float))) {
        PyErr_SetString(PyExc_ValueError, "search: out_scores must be float32 [nq][k] with k >= 1");
        goto done;
    }
    if (take(&b, out_i, 1, nq * a.kp * (Py_ssize_t)sizeof(int64_t), "out_ids", &p) < 0) goto done;
    a.out_i = p;
    if (take(&b, exact_count, 1, nq * (Py_ssize_t)sizeof(int64_t), "exact_count", &p) < 0) goto done;
    a.exact_count = p;
    const float *given_qn2 = NULL;
    if (qn2 != Py_None) {
        if (!l2) {
            PyErr_SetString(PyExc_ValueError, "search: query_norm2 is for l2 only");
            goto done;
        }
        if (take(&b, qn2, 0, nq * (Py_ssize_t)sizeof(float), "query_norm2", &p) < 0) goto done;
        given_qn2 = p;
    }
    if (row_bits || int8) {
        if (centroids == Py_None) {
            PyErr_SetString(PyExc_ValueError, "search: rescoring from codes and int8 queries need the centroids");
            goto done;
        }
        if (take(&b, centroids, 0, 16 * (Py_ssize_t)sizeof(float), "centroids", &p) < 0) goto done;
        a.centroids = p;
    }
    if (int8) {
        int8_levels_of(a.centroids, nlevels, &m.lv);
        m.qbytes = int8_query_bytes(ncols);
    } else {
        m.ngroups = parse_groups(groups, dim, ncols, wcols, &b, m.groups, "search");
        if (m.ngroups < 0) goto done;
        m.nibbles = 2 * ncols;
        m.wide = 2 * wcols;
        m.entries = (m.nibbles + m.wide) * 16;
    }
    /* The made inputs in one allocation: floats first, then the bytes (levels, luts or qint). */
    const size_t rows = (size_t)(nq ? nq : 1), floats = rows * (5 + (m.mt ? dim : 0) + (size_t)m.entries),
                 bytes = 64 + rows * (size_t)(int8 ? m.qbytes : m.entries);
    made = PyMem_Malloc(floats * sizeof(float) + bytes);
    tmp = PyMem_Malloc((size_t)(a.kp ? a.kp : 1) * sizeof(scored));
    if (!made || !tmp) {
        PyErr_NoMemory();
        goto done;
    }
    float *f = (float *)made;
    m.qn2 = f;
    m.delta = f + rows;
    m.bias = f + 2 * rows;
    m.tol = f + 3 * rows;
    m.mag = f + 4 * rows;
    m.rotated = m.mt ? f + 5 * rows : (float *)m.queries;  /* not written without mt */
    m.fluts = f + (5 + (m.mt ? dim : 0)) * rows;
    uint8_t *levels = (uint8_t *)(f + floats);
    if (int8) {
        m.qint = (int8_t *)(levels + 64);
        int8_level_table(&m.lv, levels);
    } else {
        m.luts = levels + 64;
    }
    a.ncols = ncols;
    a.wcols = wcols;
    a.nq = nq;
    a.delta = m.delta;
    a.bias = m.bias;
    a.tol = m.tol;
    a.query_norm2 = given_qn2 ? given_qn2 : l2 ? m.qn2 : NULL;
    m.l2 = l2 && !given_qn2;
    a.luts = m.luts;
    a.fluts = int8 ? NULL : m.fluts;
    a.qint = m.qint;
    a.levels = int8 ? levels : NULL;
    if (row_bits) {
        a.row_bits = (int)row_bits;
        a.rotated = m.rotated;
        a.dim = dim;
    } else {
        a.centroids = NULL;
    }
    set_level(&a, portable);
    heap_clear(a.out_s, a.out_i, nq * a.kp);
    memset(a.exact_count, 0, (size_t)nq * sizeof(int64_t));
    const float *offset = NULL;  /* [nseg][nq] */
    if (offsets != Py_None) {
        if (take(&b, offsets, 0, nseg * nq * (Py_ssize_t)sizeof(float), "offsets", &p) < 0) goto done;
        offset = p;
    }
    if (bind_segments(&a, &b, segments, offset, bs.seg, bs.limits, &bs.total) < 0) goto done;
    if (row_ids != Py_None) {
        ids = PyMem_Malloc((nseg ? nseg : 1) * sizeof(*ids));
        ranges = PyMem_Malloc((nseg ? nseg : 1) * sizeof(*ranges));
        if (!ids || !ranges) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t s = 0; s < nseg; s++) {
            if (take(&b, PyList_GET_ITEM(row_ids, s), 0, bs.seg[s].rows * (Py_ssize_t)sizeof(int64_t), "row_ids",
                     &p) < 0)
                goto done;
            ids[s] = p;
            ranges[s] = (id_range){bs.seg[s].id_base, bs.seg[s].rows, s};
        }
    }
    if (probes != Py_None && bind_probes(&lb, &b, probes, list_entries, list_offsets, nq, nseg) < 0) goto done;
    if (probes != Py_None) {
        /* Runs of the queries only (a query's lists are scanned by one thread). */
        bs.by_query = 1;
        bs.shares = nq < threads ? (int)(nq ? nq : 1) : threads;
        lb.chunk = (nq + 2 * bs.shares - 1) / (2 * bs.shares);  /* two a share */
        lb.chunk = lb.chunk ? lb.chunk : 1;
        lb.plan = &a;
        lb.work = PyMem_Malloc((size_t)bs.shares * list_work_bytes(&lb));
        lb.order = PyMem_Malloc((size_t)(nq ? nq : 1) * sizeof(int64_t));
        if (!lb.work || !lb.order || list_order(&lb) < 0) {
            PyErr_NoMemory();
            goto done;
        }
    } else if (bound_split(&bs, &a, threads) < 0) {
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (bs.shares > 1 || m.split > 1) pool_wake((bs.shares > m.split ? bs.shares : m.split) - 1);
    if (probes != Py_None) {
        scan_job job = {bs.seg, nseg, bs.limits, m.mag, portable, &m};
        make_split ms = {&m, nq, ((nq + 4 * bs.shares - 1) / (4 * bs.shares) + 3) & ~(Py_ssize_t)3, 0};
        pool_run(make_share, &ms, bs.shares);
        lb.job = &job;
        pool_run(list_share, &lb, bs.shares);
    } else {
        bound_run(&bs, &a, m.mag, portable, &m);
    }
    for (Py_ssize_t q = 0; q < nq; q++) sort_best_first(a.out_s + q * a.kp, a.out_i + q * a.kp, a.kp, tmp);
    if (ids) map_ids(a.out_i, nq * a.kp, ranges, nseg, ids);
    Py_END_ALLOW_THREADS
    ok = 1;
done:
    PyMem_Free(made);
    PyMem_Free(normed);
    PyMem_Free(ids);
    PyMem_Free(ranges);
    PyMem_Free(lb.work);
    PyMem_Free(lb.order);
    PyMem_Free(tmp);
    bound_free(&bs);
    buffers_free(&b);
    return ok ? PyLong_FromSsize_t(bad) : NULL;
}

/* search_probing(consts, query, normed, centroids_t, sq_norms, out_lists, out_offsets, per_list, make,
 * out_scores, out_ids, exact_count, l2, int8, share, bytes_per_thread, max_norm=0.0, zero_ok=True,
 * normalize=False) -> -1, or 0 where the query fails the norm checks:
 * one query of a partitioned index, its lists probed in the call. The query (float32 [dim]) is checked
 * and, with normalize, scaled into normed (float32 [dim]) as search does it; then probed as probe does
 * (centroids_t float32 [dim][nlist], sq_norms float32 [nlist] for l2; out_lists int64 [nprobe] and
 * out_offsets float32 [nlist] get the lists and every list's term); then its lists' segments are scanned
 * by search, each with its list's term and ids. per_list (a list of nlist items) holds, for list L,
 * None or (entries, ids, nbytes): L's segment entries (tuple), their ids (tuple of int64 arrays) and the
 * bytes of their codes; an item still None is made by make(L) and kept there (only probed lists are
 * made). Threads: enough that each reads bytes_per_thread of the lists' codes (at least one, at most
 * share). A single query's Python steps between the probe and the scan cost as much as both (the probe's
 * product and the scan of a list are microseconds), so the call takes them. */
static PyObject *search_probing(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"consts", "query", "normed", "centroids_t", "sq_norms", "out_lists", "out_offsets",
                             "per_list", "make", "out_scores", "out_ids", "exact_count", "l2", "int8", "share",
                             "bytes_per_thread", "max_norm", "zero_ok", "normalize", NULL};
    PyObject *consts, *query, *normed, *centroids_t, *sq_norms, *out_lists, *out_offsets, *per_list, *make, *out_s,
             *out_i, *exact_count;
    int l2, int8, share, zero_ok = 1, normalize = 0;
    Py_ssize_t bytes_per_thread;
    double max_norm = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OOOOOOO!OOOOppin|dpp", kwlist, &PyTuple_Type, &consts, &query,
                                     &normed, &centroids_t, &sq_norms, &out_lists, &out_offsets, &PyList_Type,
                                     &per_list, &make, &out_s, &out_i, &exact_count, &l2, &int8, &share,
                                     &bytes_per_thread, &max_norm, &zero_ok, &normalize))
        return NULL;
    if (share < 1 || bytes_per_thread < 1) {
        PyErr_SetString(PyExc_ValueError, "search_probing: share and bytes_per_thread must be >= 1");
        return NULL;
    }
    const Py_ssize_t nlist = PyList_GET_SIZE(per_list);
    const Py_ssize_t dim = PyTuple_GET_SIZE(consts) > 1 ? PyLong_AsSsize_t(PyTuple_GET_ITEM(consts, 1)) : -1;
    if (dim < 1 || nlist < 1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "search_probing: consts must hold dim >= 1 second, per_list a list");
        return NULL;
    }
    buffer_set b;
    float *key = NULL;
    scored *tmp = NULL;
    PyObject **items = NULL;  /* the probed lists' per_list items (new references) */
    Py_ssize_t nitems = 0;
    PyObject *picked = NULL, *picked_ids = NULL, *terms = NULL, *call_args = NULL, *call_kwargs = NULL,
             *result = NULL;
    void *qp, *cp, *np_ = NULL, *lp, *op, *normp = NULL;
    if (buffers_init(&b, MAX_BUFS) < 0) return NULL;
    if (take_float_rows(&b, query, dim, "search_probing: query", &qp) != 1) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "search_probing: one query");
        goto done;
    }
    if (take(&b, centroids_t, 0, dim * nlist * (Py_ssize_t)sizeof(float), "centroids_t", &cp) < 0 ||
        (l2 && take(&b, sq_norms, 0, nlist * (Py_ssize_t)sizeof(float), "sq_norms", &np_) < 0) ||
        take(&b, out_offsets, 1, nlist * (Py_ssize_t)sizeof(float), "out_offsets", &op) < 0 ||
        (normalize && take(&b, normed, 1, dim * (Py_ssize_t)sizeof(float), "normed", &normp) < 0) ||
        take(&b, out_lists, 1, -1, "out_lists", &lp) < 0)
        goto done;
    const Py_ssize_t nprobe = b.v[b.held - 1].len / (Py_ssize_t)sizeof(int64_t);
    if (nprobe < 1 || nprobe > nlist || b.v[b.held - 1].len != nprobe * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "search_probing: out_lists must be int64 [nprobe], 1 <= nprobe <= nlist");
        goto done;
    }
    key = PyMem_Malloc((size_t)nprobe * sizeof(float));
    tmp = PyMem_Malloc((size_t)nprobe * sizeof(scored));
    items = PyMem_Calloc((size_t)nprobe, sizeof(PyObject *));
    if (!key || !tmp || !items) {
        PyErr_NoMemory();
        goto done;
    }
    const float *q = qp;
    const int64_t *lists = lp;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    bad = check_query(q, dim, max_norm, zero_ok, normalize ? normp : NULL);  /* search's, bit for bit */
    if (!bad && normalize) q = normp;
    if (!bad) probe_rows(q, 1, cp, np_, dim, nlist, nprobe, l2, op, lp, key, tmp, split_threads(dim, nlist, share));
    Py_END_ALLOW_THREADS
    if (bad) {
        result = PyLong_FromLong(0);
        goto done;
    }
    Py_ssize_t count = 0, bytes = 0;
    for (; nitems < nprobe; nitems++) {
        PyObject *item = PyList_GET_ITEM(per_list, lists[nitems]);
        if (item == Py_None) {
            /* made in Python (which may run other threads): kept, and held here by a reference of its own */
            if (!(item = PyObject_CallFunction(make, "n", (Py_ssize_t)lists[nitems]))) goto done;
            Py_INCREF(item);
            PyList_SetItem(per_list, lists[nitems], item);
        } else {
            Py_INCREF(item);
        }
        items[nitems] = item;
        Py_ssize_t nbytes;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 || !PyTuple_Check(PyTuple_GET_ITEM(item, 0)) ||
            !PyTuple_Check(PyTuple_GET_ITEM(item, 1)) ||
            PyTuple_GET_SIZE(PyTuple_GET_ITEM(item, 0)) != PyTuple_GET_SIZE(PyTuple_GET_ITEM(item, 1)) ||
            (nbytes = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 2))) < 0) {
            if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_ValueError, "search_probing: list %lld's item must be (entries tuple, ids tuple "
                             "of the same length, bytes >= 0)", (long long)lists[nitems]);
            }
            nitems++;
            goto done;
        }
        count += PyTuple_GET_SIZE(PyTuple_GET_ITEM(item, 0));
        bytes += nbytes;
    }
    picked = PyList_New(count);
    picked_ids = PyList_New(count);
    terms = PyBytes_FromStringAndSize(NULL, (count ? count : 1) * (Py_ssize_t)sizeof(float));
    if (!picked || !picked_ids || !terms) goto done;
    float *term = (float *)PyBytes_AS_STRING(terms);
    const float *offsets = op;
    for (Py_ssize_t p = 0, at = 0; p < nprobe; p++) {
        PyObject *entries = PyTuple_GET_ITEM(items[p], 0), *ids = PyTuple_GET_ITEM(items[p], 1);
        for (Py_ssize_t e = 0; e < PyTuple_GET_SIZE(entries); e++, at++) {
            PyObject *entry = PyTuple_GET_ITEM(entries, e), *id = PyTuple_GET_ITEM(ids, e);
            Py_INCREF(entry);
            Py_INCREF(id);
            PyList_SET_ITEM(picked, at, entry);
            PyList_SET_ITEM(picked_ids, at, id);
            term[at] = offsets[lists[p]];
        }
    }
    /* fastscan._scan_threads' rule for one query: the lists' bytes are known only after the probe */
    const Py_ssize_t work = bytes / bytes_per_thread;
    const int threads = work < 1 ? 1 : work < share ? (int)work : share;
    call_args = Py_BuildValue("(OOOOOOOO)", consts, normalize ? normed : query, picked, out_s, out_i, exact_count,
                              l2 ? Py_True : Py_False, int8 ? Py_True : Py_False);
    call_kwargs = Py_BuildValue("{s:i,s:i,s:O,s:O}", "threads", threads, "rotate_threads", share, "row_ids",
                                picked_ids, "offsets", terms);
    if (!call_args || !call_kwargs) goto done;
    result = search(self, call_args, call_kwargs);  /* -1: the query passed its checks above */
done:
    for (Py_ssize_t i = 0; i < nitems; i++) Py_XDECREF(items[i]);
    Py_XDECREF(picked);
    Py_XDECREF(picked_ids);
    Py_XDECREF(terms);
    Py_XDECREF(call_args);
    Py_XDECREF(call_kwargs);
    PyMem_Free(items);
    PyMem_Free(key);
    PyMem_Free(tmp);
    buffers_free(&b);
    return result;
}

static PyObject *pool_workers_count(PyObject *self, PyObject *unused) {
    return PyLong_FromLong(pool_workers_started());
}

/* pool_start(n) -> workers started: start up to n worker threads now (Index.add does, for an index
 * large enough to split its scans), so that the first search does not wait for thread creation. */
static PyObject *pool_start(PyObject *self, PyObject *arg) {
    const long want = PyLong_AsLong(arg);
    if (want == -1 && PyErr_Occurred()) return NULL;
    if (want < 0) {
        PyErr_SetString(PyExc_ValueError, "pool_start: the worker count must be >= 0");
        return NULL;
    }
    pthread_mutex_lock(&pool_mu);
    pool_grow(want > POOL_MAX_WORKERS ? POOL_MAX_WORKERS : (int)want);
    pthread_mutex_unlock(&pool_mu);
    return PyLong_FromLong(pool_workers_started());
}

/* set_worker_spin(microseconds) -> previous: how long an idle worker watches the queue before it sleeps. */
static PyObject *set_worker_spin(PyObject *self, PyObject *arg) {
    const long us = PyLong_AsLong(arg);
    if (us == -1 && PyErr_Occurred()) return NULL;
    if (us < 0 || us > 1000000) {
        PyErr_Format(PyExc_ValueError, "set_worker_spin: microseconds must be in [0, 1000000], got %ld", us);
        return NULL;
    }
    pthread_mutex_lock(&pool_mu);
    const long previous = pool_spin_ns / 1000;
    __atomic_store_n(&pool_spin_ns, us * 1000L, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&pool_mu);
    return PyLong_FromLong(previous);
}

static PyObject *simd(PyObject *self, PyObject *unused) {
    return PyUnicode_FromString(level_names[scan_level()]);
}

/* set_simd_limit(name) -> the previous limit's name. */
static PyObject *set_simd_limit(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (!name) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "set_simd_limit: the limit must be a str");
        return NULL;
    }
    for (int level = LEVEL_PORTABLE; level <= LEVEL_TOP; level++)
        if (!strcmp(name, level_names[level])) {
            const int previous = simd_limit;
            simd_limit = level;
            return PyUnicode_FromString(level_names[previous]);
        }
    PyErr_Format(PyExc_ValueError, "unknown SIMD level %R; expected 'portable', 'neon', 'avx2', 'avx512' or 'avx512vbmi'",
                 arg);
    return NULL;
}

static PyMethodDef methods[] = {
    {"probe", probe, METH_VARARGS,
     "probe(queries, centroids_t, sq_norms, out_lists, out_offsets, dim, nlist, l2, threads=1): a partitioned "
     "index's list offsets and each query's best lists (ties to the lower list); the queries in `threads` shares."},
    {"search", (PyCFunction)(void (*)(void))search, METH_VARARGS | METH_KEYWORDS,
     "search(consts, queries, segments, out_scores, out_ids, exact_count, l2, int8, portable=False, threads=1, "
     "query_norm2=None, row_ids=None, max_norm=0.0, zero_ok=True, normalize=False, offsets=None, probes=None, "
     "list_entries=None, list_offsets=None, rotate_threads=0) -> the first query failing the norm checks, or -1: "
     "scan_segments with the queries' rotation and tables made in the same call; heaps come back sorted. A lone "
     "query's rotation of 512-d and up is split over rotate_threads (0: threads), bit for bit the same."},
    {"search_probing", (PyCFunction)(void (*)(void))search_probing, METH_VARARGS | METH_KEYWORDS,
     "search_probing(consts, query, normed, centroids_t, sq_norms, out_lists, out_offsets, per_list, make, "
     "out_scores, out_ids, exact_count, l2, int8, share, bytes_per_thread, max_norm=0.0, zero_ok=True, "
     "normalize=False) -> -1, or 0 where the query fails the norm checks: one query of a partitioned index, "
     "checked, probed and scanned over its lists in one call (per_list[L]: None, made by make(L), or "
     "(entries, ids, nbytes))."},
    {"scan_segments", (PyCFunction)(void (*)(void))scan_segments, METH_VARARGS | METH_KEYWORDS,
     "scan_segments(plan, segments, magnitude, out_scores, out_ids, exact_count, portable=False, floor=None, "
     "offsets=None, threads=1)\n\n"
     "plan: a ScanPlan (tqindex.backends.fastscan), the queries' tables. Offer every segment's rows (tuples "
     "(codes, rows, row_scale, row_norm, deleted, block_live, id_base, max_scale, max_norm2[, b0, b1])) "
     "to each query's min-heap of exact scores in out_scores/out_ids (float32/int64 [nq][k], initialised by the "
     "caller), each score plus its segment's offset (offsets: float32 [nsegments][nq], or None); adds the "
     "number of exact evaluations to exact_count (int64 [nq]). floor (float32 [nq], -inf to start): shared by "
     "calls scanning disjoint rows into their own heaps, so each prunes with the best k-th score of all. Binds "
     "every segment first, then releases the GIL once. threads > 1: the queries (at least `threads` of them) or "
     "else the blocks of all segments are split into that many shares scanned at once by the module's worker "
     "threads (the same results)."},
    {"pool_start", pool_start, METH_O,
     "pool_start(n) -> workers: start up to n worker threads now (they are otherwise started by the first scan "
     "that splits)."},
    {"pool_workers", pool_workers_count, METH_NOARGS,
     "The worker threads the module has started (they live until the process ends; none in a forked child)."},
    {"encode", encode, METH_VARARGS,
     "encode(y, dim, rows, groups, codes, alignment)\n\nQuantize rows of rotated unit vectors into packed codes "
     "(groups: list of (start, stop, bits, byte_offset, boundaries, centroids)) and their alignment "
     "<y, y_tilde>. Releases the GIL."},
    {"tables", tables, METH_VARARGS,
     "tables(rotated, dim, nq, groups, ncols, luts, fluts, delta, bias, tol, magnitude, wcols=0, portable=False)"
     "\n\nPer-query lookup tables for scan (groups: list of (start, stop, bits, codes_per_nibble, centroids); a first "
     "group of 5 bits takes 2*wcols nibbles and has upper tables). portable: the loop ARM runs, not SSE2 (the same "
     "results; for tests). Releases the GIL."},
    {"int8_tables", int8_tables, METH_VARARGS,
     "int8_tables(rotated, dim, nq, ncols, centroids, nlevels, qint, levels, delta, bias, tol, magnitude)\n\n"
     "The int8 queries of scan_segments' int8 scan (one scalar group of codes in nibbles, nlevels of the 16 "
     "float32 centroids): qint int8 [nq][ceil(ncols/4)][2][4], levels uint8 [64], and per query delta, bias, tol, "
     "magnitude as for tables. Releases the GIL."},
    {"int8_block_sums", int8_block_sums, METH_VARARGS,
     "int8_block_sums(qint, levels, codes, ncols, nq, nblocks, out, portable)\n\nThe int8 scan's integer sums, "
     "int32 [nq][nblocks][32] in row order, from the SIMD kernel or the portable loop (for tests)."},
    {"rotate", rotate, METH_VARARGS,
     "rotate(x, mt, out, rows, dim)\n\nout = x @ mt (float32 [rows][dim] @ [dim][dim]) in the calling thread, "
     "without torch's thread pool. Releases the GIL."},
    {"row_norms", row_norms, METH_VARARGS,
     "row_norms(x, out, rows, dim, max_norm, zero_ok) -> int\n\nout = the L2 norm of every row of x (float32 "
     "[rows][dim], summed in double) as float32; returns the first row whose norm is not finite, above "
     "max_norm, or zero where zero_ok is false, else -1. Releases the GIL."},
    {"select", select_best, METH_VARARGS,
     "select(scores, positions, out_scores, out_positions)\n\nPer row, the k best (score, position) pairs, score "
     "descending then position ascending, padded with (-inf, -1). Releases the GIL."},
    {"set_worker_spin", set_worker_spin, METH_O,
     "set_worker_spin(microseconds) -> previous: how long an idle worker thread watches for work before it sleeps."},
    {"simd", simd, METH_NOARGS, "The scan kernel this CPU runs: 'avx512vbmi', 'avx512', 'avx2', 'neon' or 'portable'."},
    {"set_simd_limit", set_simd_limit, METH_O,
     "set_simd_limit(name) -> previous: the highest SIMD level the scan may use ('portable', 'neon', 'avx2', "
     "'avx512', 'avx512vbmi'; the CPU's own level where lower)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "tqindex native kernels: fast scan and encoding", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    static int fork_handler = 0;
    if (!fork_handler) {
        if (pthread_atfork(NULL, NULL, pool_after_fork_child)) {
            PyErr_SetString(PyExc_RuntimeError, "tqindex._native: could not register the thread pool's fork handler");
            return NULL;
        }
        fork_handler = 1;
    }
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "LUT_MAX", LUT_MAX) < 0 ||
              PyModule_AddIntConstant(m, "INT8_SCAN_MAX_DIM", INT8_SCAN_MAX_DIM) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
