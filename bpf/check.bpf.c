// check.bpf.c: `goleash check`: follow a command's processes and attribute every
// goroutine to the test that created it.
//
// One program for every process and every Go release: the runtime.g offsets of each
// traced process are in tl_procs (filled by user space before the probes are
// attached), not -D macros, so BCC compiles this once per run, not once per release.
//
// Scheduler tracepoints, read through their tracefs formats (no kernel structs):
//   sched_process_fork  a followed process forks: follow the child
//   sched_process_exec  a followed process execs: stop it (SIGSTOP) before its first
//                       instruction so user space can judge the new executable and
//                       attach its probes, then SIGCONT it. An exec of a path user
//                       space already judged not to follow (the Go toolchain, programs
//                       that are not Go: chk_skip) goes on at once, without a stop.
//   sched_process_exit  a followed task ends: forget it
// Threads are followed too (the fork tracepoint cannot tell them apart); they are
// forgotten when they exit, so the table holds live tasks only.
//
// Uprobes, at sites chosen by disassembly (agent/goleash/gobin/disasm.py), emulated
// where possible. Never a uretprobe: Go moves stacks.
//   on_create_* `call runtime.runqput` in runtime.newproc's closure: RBX = new g
//               (fallback: every RET of runtime.newproc1, RAX = new g). A goroutine
//               whose creator belongs to a test belongs to that test (creator chain).
//   on_trunner  testing.tRunner after its stack check: R14 = the test's goroutine,
//               RBX = the test function (a *funcval)
//   on_exit     runtime.goexit1: R14 = the exiting g; a test ends when its tRunner
//               goroutine exits (after its t.Cleanup functions ran)
//   on_pexit    runtime.exit (os.Exit, return from main): stop the process and tell
//               user space which goroutine exits it (R14); user space reads the
//               goroutines from memory and sends SIGCONT. testing's tRunner releases
//               its caller before its goroutine reaches goexit1, so when the main
//               goroutine exits, a test can be over without its end recorded.
#include <uapi/linux/ptrace.h>
#include "goleash.h"

#define CHK_SIGSTOP 19
#define CHK_EXEC 1
#define CHK_EXIT 2
#define CHK_PEXIT 3

#define CHK_PATH_LEN 256

/* The path an exec was asked for, NUL-padded: the key of chk_skip. */
struct chk_path {
    char name[CHK_PATH_LEN];
};

struct chk_event {
    u32 pid;
    u32 kind;
    u64 goid; /* CHK_PEXIT: the goroutine calling runtime.exit; 0 unknown (system stack) */
    u64 ns;   /* CHK_PEXIT: when (bpf_ktime_get_ns, CLOCK_MONOTONIC) */
    struct chk_path path; /* CHK_EXEC: the exec'd path; empty when it did not fit */
};

/* Per traced process: where runtime.g keeps what the probes read. */
struct tl_proc {
    u32 g_goid;
    u32 g_parent_goid; /* 0: no g.parentGoid (Go < 1.21): g0.m.curg at the create site */
    u32 g_m;
    u32 m_curg;
    u32 _pad[2];
};

struct tl_goroutine {
    u64 test_goid; /* goid of the tRunner goroutine of the test that created it */
    u64 created_ns;
};

struct tl_test {
    u64 fn_pc;       /* the test function (link-time for non-PIE) */
    u64 parent_test; /* goid of the parent test's tRunner goroutine, 0 for none */
    u64 start_ns;
    u64 end_ns;      /* 0 while running */
};

enum tl_counter {
    TL_CNT_CREATE_HITS = 0,
    TL_CNT_EXIT_HITS,
    TL_CNT_TRUNNER_HITS,
    TL_CNT_LIVE_FULL,
    TL_CNT_TESTS_FULL,
    TL_CNT_READ_FAULTS,
    TL_CNT_FOLLOW_FULL,
    TL_CNT_SKIPPED_EXECS,
    TL_CNT_MAX,
};

BPF_HASH(followed, u32, u8, MAX_FOLLOWED);
BPF_HASH(chk_skip, struct chk_path, u8, MAX_SKIP);
BPF_HASH(tl_procs, u32, struct tl_proc, MAX_PROCS);
BPF_HASH(tl_goroutines, struct goroutine_key, struct tl_goroutine, MAX_LIVE);
BPF_HASH(tl_tests, struct goroutine_key, struct tl_test, MAX_TESTS);
BPF_PERCPU_ARRAY(tl_counters, u64, TL_CNT_MAX);
BPF_PERF_OUTPUT(chk_events);

static __always_inline u64 *counter_slot(int idx)
{
    return tl_counters.lookup(&idx);
}
#define READ_FAULTS_COUNTER TL_CNT_READ_FAULTS
#include "helpers.bpf.h" /* count(), read_u64() */

/* ---- the process tree ------------------------------------------------------------ */

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!followed.lookup(&tgid))
        return 0;
    u32 child = args->child_pid;
    u8 one = 1;
    if (followed.update(&child, &one) != 0)
        count(TL_CNT_FOLLOW_FULL);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!followed.lookup(&tgid))
        return 0;
    tl_procs.delete(&tgid); /* the old image's offsets */
    struct chk_event ev = {.pid = tgid, .kind = CHK_EXEC};
    unsigned short off = args->data_loc_filename & 0xFFFF;
    int n = bpf_probe_read_kernel_str(ev.path.name, sizeof(ev.path.name), (char *)args + off);
    if (n <= 0 || n >= CHK_PATH_LEN) {
        /* Unread, or maybe cut short: two paths could share the prefix. */
        __builtin_memset(&ev.path, 0, sizeof(ev.path));
    } else if (chk_skip.lookup(&ev.path)) {
        count(TL_CNT_SKIPPED_EXECS);
        return 0;
    }
    bpf_send_signal(CHK_SIGSTOP);
    chk_events.perf_submit(args, &ev, sizeof(ev));
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id, tgid = id >> 32;
    if (!followed.lookup(&tid))
        return 0;
    followed.delete(&tid);
    if (tid == tgid) {
        tl_procs.delete(&tgid);
        struct chk_event ev = {.pid = tgid, .kind = CHK_EXIT};
        chk_events.perf_submit(args, &ev, sizeof(ev));
    }
    return 0;
}

/* ---- goroutines and tests --------------------------------------------------------- */

static __always_inline int create(struct pt_regs *ctx, u64 g)
{
    count(TL_CNT_CREATE_HITS);
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    struct tl_proc *cfg = tl_procs.lookup(&pid);
    if (!cfg)
        return 0;
    struct goroutine_key parent = {.pid = pid};
    if (cfg->g_parent_goid) {
        if (read_u64(&parent.goid, g + cfg->g_parent_goid))
            return 0;
    } else {
        /* Before Go 1.21: this site runs on the system stack, R14 is g0 and
         * g0.m.curg is the goroutine that executed the `go` statement. */
        u64 m = 0, curg = 0;
        if (read_u64(&m, ctx->r14 + cfg->g_m) || !m || read_u64(&curg, m + cfg->m_curg) ||
            !curg || read_u64(&parent.goid, curg + cfg->g_goid))
            return 0;
    }
    struct tl_goroutine *p = tl_goroutines.lookup(&parent);
    if (!p)
        return 0; /* created outside every test */
    struct goroutine_key key = {.pid = pid};
    if (read_u64(&key.goid, g + cfg->g_goid))
        return 0;
    struct tl_goroutine child = {.test_goid = p->test_goid, .created_ns = bpf_ktime_get_ns()};
    if (tl_goroutines.update(&key, &child) != 0)
        count(TL_CNT_LIVE_FULL);
    return 0;
}

/* Two entry points, one per register holding the new g: the verifier refuses a
 * pt_regs offset chosen at run time. */
int on_create_bx(struct pt_regs *ctx)
{
    return create(ctx, ctx->bx);
}

int on_create_ax(struct pt_regs *ctx)
{
    return create(ctx, ctx->ax);
}

int on_trunner(struct pt_regs *ctx)
{
    count(TL_CNT_TRUNNER_HITS);
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    struct tl_proc *cfg = tl_procs.lookup(&pid);
    if (!cfg)
        return 0;
    struct goroutine_key key = {.pid = pid};
    u64 fn_pc = 0;
    if (read_u64(&key.goid, ctx->r14 + cfg->g_goid) || read_u64(&fn_pc, ctx->bx))
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct tl_test test = {.fn_pc = fn_pc, .start_ns = now};
    /* The tRunner goroutine was created by its parent test (t.Run): it inherited it. */
    struct tl_goroutine *self = tl_goroutines.lookup(&key);
    struct tl_goroutine mine = {.test_goid = key.goid, .created_ns = now};
    if (self) {
        test.parent_test = self->test_goid;
        mine.created_ns = self->created_ns;
    }
    if (tl_tests.update(&key, &test) != 0) {
        count(TL_CNT_TESTS_FULL);
        return 0;
    }
    if (tl_goroutines.update(&key, &mine) != 0)
        count(TL_CNT_LIVE_FULL);
    return 0;
}

int on_exit(struct pt_regs *ctx)
{
    count(TL_CNT_EXIT_HITS);
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    struct tl_proc *cfg = tl_procs.lookup(&pid);
    if (!cfg)
        return 0;
    struct goroutine_key key = {.pid = pid};
    if (read_u64(&key.goid, ctx->r14 + cfg->g_goid))
        return 0;
    struct tl_test *t = tl_tests.lookup(&key);
    if (t)
        t->end_ns = bpf_ktime_get_ns();
    tl_goroutines.delete(&key);
    return 0;
}

int on_pexit(struct pt_regs *ctx)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    struct tl_proc *cfg = tl_procs.lookup(&pid);
    if (!cfg)
        return 0;
    bpf_send_signal(CHK_SIGSTOP);
    struct chk_event ev = {.pid = pid, .kind = CHK_PEXIT, .ns = bpf_ktime_get_ns()};
    /* R14 is the calling g. Trust it only when it is its thread's current user
     * goroutine (g.m.curg == g): on the system stack (a fatal error) R14 is g0,
     * whose curg is another g, and the exiting goroutine stays unknown. */
    u64 g = ctx->r14, m = 0, curg = 0, goid = 0;
    if (g && !read_u64(&m, g + cfg->g_m) && m && !read_u64(&curg, m + cfg->m_curg) &&
        curg == g && !read_u64(&goid, g + cfg->g_goid))
        ev.goid = goid;
    chk_events.perf_submit(ctx, &ev, sizeof(ev));
    return 0;
}
