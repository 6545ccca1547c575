/* A persistent pool of worker threads for the native kernels, free of Python.
 *
 * A single query's scan is split into a few shares of blocks; handing them to Python threads costs a
 * queue, a condition and the GIL per share (more than a small index's whole scan). Here a call puts
 * its shares on a queue, wakes the workers, runs shares itself too, and waits until every share of
 * its own is done. An idle worker watches the queue for a while (pool_spin_ns) before it sleeps.
 * Several calls (Python threads searching at once, the GIL released) may be in flight: each waits
 * only for its own shares. Workers are started on first need, up to the most any call asked for,
 * and live until the process ends. A forked child starts with none (fork copies
 * only the calling thread), so the child handler forgets the parent's.
 *
 * Call without the GIL. Tasks must not fail: they are plain C over memory the caller owns. */
#ifndef TQINDEX_POOL_H
#define TQINDEX_POOL_H

#include <pthread.h>
#include <time.h>
#include <sched.h>

#define POOL_MAX_WORKERS 255
#define POOL_SPIN_DEFAULT_US 200

typedef void (*pool_fn)(void *ctx, int task);

typedef struct pool_job {
    pool_fn fn;
    void *ctx;
    int ntasks;
    int next;              /* the next task to claim */
    int done;              /* tasks finished */
    struct pool_job *link; /* the queue of jobs with tasks left to claim */
} pool_job;

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_work = PTHREAD_COND_INITIALIZER; /* a job was queued */
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER; /* a job's last task finished */
static pool_job *pool_queue = NULL;
static int pool_workers = 0;
static int pool_sleeping = 0;  /* workers waiting on pool_work */
/* How long an idle worker watches the queue before it sleeps (set_worker_spin; read without the lock).
 * A sleeping worker takes tens of microseconds to wake, more in a virtual machine; back-to-back single
 * queries find a watching worker at once. */
static long pool_spin_ns = POOL_SPIN_DEFAULT_US * 1000L;

static long pool_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static inline void pool_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Watch the queue (without the lock) for up to pool_spin_ns; returns whether a job came. The watch
 * yields the core between looks: a worker that only spins keeps running through its time slice while
 * another process waits for that core, so the scheduler later preempts it in the middle of a share
 * and the caller waits milliseconds for it (single-query p99 10x p50 with one core busy, measured). */
static int pool_spin(void) {
    const long until = pool_now_ns() + __atomic_load_n(&pool_spin_ns, __ATOMIC_RELAXED);
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (__atomic_load_n(&pool_queue, __ATOMIC_RELAXED)) return 1;
            pool_relax();
        }
        if (pool_now_ns() >= until) return 0;
        sched_yield();
    }
}

/* Claim the next task of the queue's first job (pool_mu held); the job leaves the queue with its last
 * task claimed. Returns the job, or NULL when the queue is empty. */
static pool_job *pool_claim(int *task) {
    pool_job *j = pool_queue;
    if (!j) return NULL;
    *task = j->next++;
    if (j->next == j->ntasks) __atomic_store_n(&pool_queue, j->link, __ATOMIC_RELAXED);
    return j;
}

/* Run a claimed task with the lock dropped, and count it done (pool_mu held on entry and exit). */
static void pool_finish(pool_job *j, int task) {
    pthread_mutex_unlock(&pool_mu);
    j->fn(j->ctx, task);
    pthread_mutex_lock(&pool_mu);
    if (++j->done == j->ntasks) pthread_cond_broadcast(&pool_done);
}

static void *pool_main(void *unused) {
    (void)unused;
    pthread_mutex_lock(&pool_mu);
    for (;;) {
        int task;
        pool_job *j = pool_claim(&task);
        if (j) {
            pool_finish(j, task);
            continue;
        }
        if (__atomic_load_n(&pool_spin_ns, __ATOMIC_RELAXED) > 0) {
            pthread_mutex_unlock(&pool_mu);
            const int came = pool_spin();
            pthread_mutex_lock(&pool_mu);
            if (came) continue;
        }
        pool_sleeping++;
        pthread_cond_wait(&pool_work, &pool_mu);
        pool_sleeping--;
    }
    return NULL;
}

/* Start workers up to `want` (pool_mu held). Fewer is not an error: the caller runs what is left. */
static void pool_grow(int want) {
    if (want > POOL_MAX_WORKERS) want = POOL_MAX_WORKERS;
    while (pool_workers < want) {
        pthread_t t;
        pthread_attr_t attr;
        if (pthread_attr_init(&attr)) return;
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&t, &attr, pool_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc) return;
        pool_workers++;
    }
}

/* fn(ctx, t) for t in [0, ntasks), on the calling thread and up to ntasks - 1 workers; returns when all
 * are done. Which thread runs which task is not fixed: results must not depend on it. */
static void pool_run(pool_fn fn, void *ctx, int ntasks) {
    if (ntasks <= 1) {
        if (ntasks == 1) fn(ctx, 0);
        return;
    }
    pool_job j = {fn, ctx, ntasks, 0, 0, NULL};
    pthread_mutex_lock(&pool_mu);
    pool_grow(ntasks - 1);
    pool_job **end = &pool_queue;
    while (*end) end = &(*end)->link;
    __atomic_store_n(end, &j, __ATOMIC_RELAXED);
    /* Wake as many sleeping workers as there are tasks for them, not all (many cores, a two-share job). */
    for (int i = 0; i < ntasks - 1 && i < pool_sleeping; i++) pthread_cond_signal(&pool_work);
    /* The caller takes its own job's tasks (not another call's: it returns as soon as its own are done). */
    while (j.next < j.ntasks) {
        const int task = j.next++;
        if (j.next == j.ntasks) { /* unlink: every task claimed */
            pool_job **p = &pool_queue;
            while (*p != &j) p = &(*p)->link;
            __atomic_store_n(p, j.link, __ATOMIC_RELAXED);
        }
        pool_finish(&j, task);
    }
    while (j.done < j.ntasks) pthread_cond_wait(&pool_done, &pool_mu);
    pthread_mutex_unlock(&pool_mu);
}

/* Wake up to n sleeping workers ahead of a job (starting them if need be): they watch the queue for
 * pool_spin_ns, so a caller that has work of its own to do first (a search making its queries) has
 * their wake-up overlap it. */
static void pool_wake(int n) {
    if (__atomic_load_n(&pool_spin_ns, __ATOMIC_RELAXED) == 0) return;  /* they would sleep again at once */
    pthread_mutex_lock(&pool_mu);
    pool_grow(n);
    for (int i = 0; i < n && i < pool_sleeping; i++) pthread_cond_signal(&pool_work);
    pthread_mutex_unlock(&pool_mu);
}

/* In a forked child no worker exists, and the lock may have been held by a thread that is gone. */
static void pool_after_fork_child(void) {
    pthread_mutex_init(&pool_mu, NULL);
    pthread_cond_init(&pool_work, NULL);
    pthread_cond_init(&pool_done, NULL);
    pool_queue = NULL;
    pool_workers = 0;
    pool_sleeping = 0;
}

static int pool_workers_started(void) {
    pthread_mutex_lock(&pool_mu);
    const int n = pool_workers;
    pthread_mutex_unlock(&pool_mu);
    return n;
}

#endif
