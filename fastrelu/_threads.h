/* fastrelu's threads: how many a call uses, and the pool that runs its chunks.
 *
 * A threaded call is cut into chunks that threads claim one at a time from a shared counter.  The
 * calling thread claims chunks too, so when the OS has not scheduled a worker (another process
 * holds its core) the caller simply does that worker's chunks itself, and at the end it waits
 * only for chunks that some thread has started: never for a thread that is not running.  (An
 * OpenMP team ends at a barrier that every member must reach, which costs a whole scheduler time
 * slice when one of them is descheduled.)
 *
 * The thread count still follows OpenMP's settings (OMP_NUM_THREADS, omp_set_num_threads and
 * therefore threadpoolctl, OMP_THREAD_LIMIT): the extension links the OpenMP runtime for them,
 * and never starts an OpenMP team.
 */
#ifndef FASTRELU_THREADS_H
#define FASTRELU_THREADS_H

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- how many threads ---------------------------------------------------------------------- */

/* Below this many elements a kernel runs on the calling thread: waking a worker costs more than
 * the memory traffic it would share (measured: two threads win from about 32K float32 elements). */
#define FR_PARALLEL_MIN_ELEMENTS ((ptrdiff_t)1 << 15)

/* More threads than this per logical CPU only add switching. */
#define FR_THREADS_PER_CPU 4

static int fr_cpus = 1;              /* logical CPUs online */
static int fr_default_threads = 1;   /* OpenMP's default when the module loaded */
static int fr_max_threads = 1;       /* the cap: FR_THREADS_PER_CPU per logical CPU */
static int fr_requested_threads = 0; /* set_num_threads(); 0: follow OpenMP */
static __thread int fr_set_here = 0; /* set_num_threads() was called on this thread */

static int fr_thread_cap(void) { return fr_max_threads; }

/* set_num_threads(n) is OpenMP's own limit on the calling thread (omp_set_num_threads, as
 * threadpoolctl and torch.set_num_threads use), so a later threadpoolctl limit there overrides
 * it, whatever its value; other threads, whose OpenMP limit is still the default, take n too
 * unless their own limit has been changed (to another value: OpenMP cannot say whether a limit
 * equal to the default was set).  Never more than the cap. */
static int fr_get_num_threads(void) {
#ifdef _OPENMP
    int n = omp_get_max_threads();
    if (fr_requested_threads > 0 && !fr_set_here && n == fr_default_threads)
        n = fr_requested_threads;
    return n < fr_max_threads ? n : fr_max_threads;
#else
    return 1;
#endif
}

static void fr_set_num_threads(int n) {
    fr_requested_threads = n;
#ifdef _OPENMP
    omp_set_num_threads(n);
    fr_set_here = 1;
#endif
}

static int fr_threads_for(ptrdiff_t n) {
    if (n < FR_PARALLEL_MIN_ELEMENTS) return 1;
    ptrdiff_t most = n / (FR_PARALLEL_MIN_ELEMENTS / 2);
    int nt = fr_get_num_threads();
    return most < nt ? (int)most : nt;
}

/* Part t's range [*a, *b) of n elements split into `parts`: equal parts, rounded to 64 elements
 * so that the boundaries fall on cache lines. */
static void fr_share(ptrdiff_t n, int t, int parts, ptrdiff_t *a, ptrdiff_t *b) {
    ptrdiff_t chunk = ((n + parts - 1) / parts + 63) & ~(ptrdiff_t)63;
    *a = (ptrdiff_t)t * chunk < n ? (ptrdiff_t)t * chunk : n;
    *b = *a + chunk < n ? *a + chunk : n;
}

/* ---- the pool ------------------------------------------------------------------------------ */

typedef void (*fr_chunk_fn)(void *ctx, int chunk);

/* The task word: generation | free seats | chunks | next chunk, 16 bits each.  One
 * compare-and-swap both checks that a task is current and claims its next chunk (and, for a
 * worker, a seat), so a worker that wakes late can never claim work of a task that is over; and
 * since the word says everything a claim depends on, a generation that wraps around is harmless. */
#define FR_GEN(s) ((unsigned)((s) >> 48))
#define FR_SEATS(s) ((unsigned)((s) >> 32) & 0xFFFFu)
#define FR_CHUNKS(s) ((unsigned)((s) >> 16) & 0xFFFFu)
#define FR_NEXT(s) ((unsigned)(s)&0xFFFFu)
#define FR_SEAT ((uint64_t)1 << 32)
#define FR_MAX_CHUNKS 0xFFFF

/* A worker that finds no task spins this long before it sleeps: back-to-back calls then need no
 * wake-up.  The caller, once every chunk is claimed, spins this long for the last ones before it
 * starts yielding its core (the thread it waits for may be queued on it). */
#define FR_SPIN_NS 50000

static struct {
    pthread_mutex_t busy; /* held by the call using the pool; a concurrent call runs alone */
    pthread_mutex_t sleep_lock;
    pthread_cond_t wake;
    int sleepers;  /* workers asleep or about to be (atomic; changed under sleep_lock) */
    int workers;   /* started (changed under busy) */
    uint64_t task; /* the task word (atomic) */
    int done;      /* chunks of the current task finished (atomic) */
    fr_chunk_fn fn; /* the current task: written under busy, before the task word */
    void *ctx;
} fr_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static uint64_t fr_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Claims the next chunk of the task with generation `gen`, taking a seat too when `seat`;
 * returns the chunk, or -1 when that task has no chunk (or seat) left. */
static int fr_claim(unsigned gen, int seat) {
    uint64_t s = __atomic_load_n(&fr_pool.task, __ATOMIC_ACQUIRE);
    for (;;) {
        if (FR_GEN(s) != gen || FR_NEXT(s) >= FR_CHUNKS(s) || (seat && !FR_SEATS(s))) return -1;
        const uint64_t claimed = s + 1 - (seat ? FR_SEAT : 0);
        if (__atomic_compare_exchange_n(&fr_pool.task, &s, claimed, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            return (int)FR_NEXT(s);
    }
}

static void fr_run_chunks(unsigned gen, int chunk) {
    for (; chunk >= 0; chunk = fr_claim(gen, 0)) {
        fr_pool.fn(fr_pool.ctx, chunk);
        __atomic_fetch_add(&fr_pool.done, 1, __ATOMIC_RELEASE);
    }
}

/* Returns once the task word's generation differs from `seen`: spinning a while, then asleep. */
static unsigned fr_wait_for_task(unsigned seen) {
    /* no spinning when the workers and the caller outnumber the CPUs: it would take their time */
    const int spin = __atomic_load_n(&fr_pool.workers, __ATOMIC_RELAXED) < fr_cpus;
    const uint64_t until = spin ? fr_now_ns() + FR_SPIN_NS : 0;
    for (;;) { /* the clock is read every 64 pauses */
        for (int i = 0; i < 64; i++) {
            const unsigned gen = FR_GEN(__atomic_load_n(&fr_pool.task, __ATOMIC_ACQUIRE));
            if (gen != seen) return gen;
            _mm_pause();
        }
        if (fr_now_ns() >= until) break;
        sched_yield();
    }
    pthread_mutex_lock(&fr_pool.sleep_lock);
    __atomic_fetch_add(&fr_pool.sleepers, 1, __ATOMIC_SEQ_CST);
    /* pairs with the fence in fr_parallel: either it sees this sleeper, or this sees its task */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    unsigned gen;
    while ((gen = FR_GEN(__atomic_load_n(&fr_pool.task, __ATOMIC_ACQUIRE))) == seen)
        pthread_cond_wait(&fr_pool.wake, &fr_pool.sleep_lock);
    __atomic_fetch_sub(&fr_pool.sleepers, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&fr_pool.sleep_lock);
    return gen;
}

static void *fr_worker(void *arg) {
    unsigned seen = (unsigned)(uintptr_t)arg;
    for (;;) {
        seen = fr_wait_for_task(seen);
        fr_run_chunks(seen, fr_claim(seen, 1));
    }
    return NULL;
}

/* Starts workers until there are `want` (fewer if the system refuses). */
static void fr_start_workers(int want) {
    sigset_t all, old;
    sigfillset(&all); /* signals stay with the interpreter's threads */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    const unsigned gen = FR_GEN(__atomic_load_n(&fr_pool.task, __ATOMIC_ACQUIRE));
    while (fr_pool.workers < want) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&thread, &attr, fr_worker, (void *)(uintptr_t)gen);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pthread_setname_np(thread, "fastrelu"); /* what top and /proc show, from its start */
        __atomic_store_n(&fr_pool.workers, fr_pool.workers + 1, __ATOMIC_RELAXED);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* Runs fn(ctx, c) for every chunk c in [0, chunks), chunks <= FR_MAX_CHUNKS, on up to nt threads with the caller's; each
 * chunk runs exactly once, whichever thread takes it.  Returns when all have finished. */
static void fr_parallel(int nt, int chunks, fr_chunk_fn fn, void *ctx) {
    if (nt <= 1 || chunks <= 1 || pthread_mutex_trylock(&fr_pool.busy) != 0) {
        for (int c = 0; c < chunks; c++) fn(ctx, c);
        return;
    }
    if (fr_pool.workers < nt - 1) fr_start_workers(nt - 1);
    int seats = nt - 1 < fr_pool.workers ? nt - 1 : fr_pool.workers;
    seats = seats < 0xFFFF ? seats : 0xFFFF;
    fr_pool.fn = fn;
    fr_pool.ctx = ctx;
    __atomic_store_n(&fr_pool.done, 0, __ATOMIC_RELAXED);
    const unsigned gen =
        (FR_GEN(__atomic_load_n(&fr_pool.task, __ATOMIC_RELAXED)) + 1) & 0xFFFFu;
    __atomic_store_n(&fr_pool.task,
                     (uint64_t)gen << 48 | (uint64_t)seats << 32 | (uint64_t)chunks << 16,
                     __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&fr_pool.sleepers, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&fr_pool.sleep_lock);
        pthread_cond_broadcast(&fr_pool.wake);
        pthread_mutex_unlock(&fr_pool.sleep_lock);
    }
    fr_run_chunks(gen, fr_claim(gen, 0));
    /* every chunk is claimed: wait for those that workers are still running */
    const uint64_t until = fr_now_ns() + FR_SPIN_NS;
    while (__atomic_load_n(&fr_pool.done, __ATOMIC_ACQUIRE) < chunks) {
        if (fr_now_ns() < until)
            _mm_pause();
        else
            sched_yield();
    }
    pthread_mutex_unlock(&fr_pool.busy);
}

/* In a forked child the workers are gone (and a lock may be held by a thread that is gone too):
 * the pool starts afresh there on its first threaded call. */
static void fr_after_fork_in_child(void) {
    pthread_mutex_init(&fr_pool.busy, NULL);
    pthread_mutex_init(&fr_pool.sleep_lock, NULL);
    pthread_cond_init(&fr_pool.wake, NULL);
    fr_pool.sleepers = 0;
    fr_pool.workers = 0;
}

static void fr_init_threads(void) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    fr_cpus = cpus < 1 ? 1 : cpus > (1 << 20) ? (1 << 20) : (int)cpus;
    fr_max_threads = fr_cpus * FR_THREADS_PER_CPU;
#ifdef _OPENMP
    if (omp_get_thread_limit() < fr_max_threads) fr_max_threads = omp_get_thread_limit();
    fr_default_threads = omp_get_max_threads();
#endif
    pthread_atfork(NULL, NULL, fr_after_fork_in_child);
}

#endif /* FASTRELU_THREADS_H */
