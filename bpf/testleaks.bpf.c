// testleaks.bpf.c: which test created each goroutine (`goleash check`).
//
// One program serves every followed process of one Go release (maps keyed by pid).
// Sites chosen by disassembly (agent/goleash/gobin/disasm.py), emulated where possible:
//   on_create   `call runtime.runqput` in runtime.newproc's closure: CREATE_REG = new g
//               (fallback: every RET of runtime.newproc1, RAX = new g). A goroutine
//               whose creator belongs to a test belongs to that test (creator chain).
//   on_trunner  testing.tRunner after its stack check: R14 = the test's goroutine,
//               RBX = the test function (a *funcval)
//   on_exit     runtime.goexit1: R14 = the exiting g; a test ends when its tRunner
//               goroutine exits (after its t.Cleanup functions ran)
//   on_pexit    runtime.exit (os.Exit, return from main): stop the process with
//               SIGSTOP and tell user space, which reads its goroutines from memory
//               and sends SIGCONT
// Never a uretprobe: Go moves stacks.
//   G_GOID G_GOPC G_STARTPC [G_PARENT_GOID | (G_M M_CURG)] SPAN_START SPAN_WORDS
//   CREATE_REG MAX_LIVE MAX_TESTS
#include <uapi/linux/ptrace.h>
#include "goleash.h"

#define TL_SIGSTOP 19

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

struct tl_exit_event {
    u32 pid;
    u32 _pad;
};

enum tl_counter {
    TL_CNT_CREATE_HITS = 0,
    TL_CNT_EXIT_HITS,
    TL_CNT_TRUNNER_HITS,
    TL_CNT_LIVE_FULL,
    TL_CNT_TESTS_FULL,
    TL_CNT_READ_FAULTS,
    TL_CNT_MAX,
};

BPF_HASH(tl_goroutines, struct goroutine_key, struct tl_goroutine, MAX_LIVE);
BPF_HASH(tl_tests, struct goroutine_key, struct tl_test, MAX_TESTS);
BPF_PERCPU_ARRAY(tl_counters, u64, TL_CNT_MAX);
BPF_PERF_OUTPUT(tl_exits);

static __always_inline void count(int idx)
{
    u64 *v = tl_counters.lookup(&idx);
    if (v)
        (*v)++;
}

static __always_inline int read_u64(u64 *dst, u64 addr)
{
    if (bpf_probe_read_user(dst, sizeof(*dst), (void *)addr) != 0) {
        count(TL_CNT_READ_FAULTS);
        return -1;
    }
    return 0;
}

struct g_span {
    u64 w[SPAN_WORDS];
};
#define SPAN_AT(span, off) ((span).w[((off) - SPAN_START) / 8])

int on_create(struct pt_regs *ctx)
{
    count(TL_CNT_CREATE_HITS);
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    struct g_span span;
    if (bpf_probe_read_user(&span, sizeof(span), (void *)(ctx->CREATE_REG + SPAN_START)) != 0) {
        count(TL_CNT_READ_FAULTS);
        return 0;
    }
    struct goroutine_key parent = {.pid = pid};
#ifdef G_PARENT_GOID
    parent.goid = SPAN_AT(span, G_PARENT_GOID);
#else
    /* Before Go 1.21: this site runs on the system stack, R14 is g0 and g0.m.curg
     * is the goroutine that executed the `go` statement. */
    u64 m = 0, curg = 0;
    if (read_u64(&m, ctx->r14 + G_M) || !m || read_u64(&curg, m + M_CURG) || !curg ||
        read_u64(&parent.goid, curg + G_GOID))
        return 0;
#endif
    struct tl_goroutine *p = tl_goroutines.lookup(&parent);
    if (!p)
        return 0; /* created outside every test */
    struct goroutine_key key = {.pid = pid, .goid = SPAN_AT(span, G_GOID)};
    struct tl_goroutine child = {.test_goid = p->test_goid, .created_ns = bpf_ktime_get_ns()};
    if (tl_goroutines.update(&key, &child) != 0)
        count(TL_CNT_LIVE_FULL);
    return 0;
}

int on_trunner(struct pt_regs *ctx)
{
    count(TL_CNT_TRUNNER_HITS);
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    struct goroutine_key key = {.pid = pid};
    u64 fn_pc = 0;
    if (read_u64(&key.goid, ctx->r14 + G_GOID) || read_u64(&fn_pc, ctx->bx))
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct tl_test test = {.fn_pc = fn_pc, .start_ns = now};
    /* The tRunner goroutine was created by its parent test (t.Run): it inherited it. */
    struct tl_goroutine *self = tl_goroutines.lookup(&key);
    if (self)
        test.parent_test = self->test_goid;
    if (tl_tests.update(&key, &test) != 0) {
        count(TL_CNT_TESTS_FULL);
        return 0;
    }
    struct tl_goroutine mine = {.test_goid = key.goid, .created_ns = now};
    if (self)
        mine.created_ns = self->created_ns;
    if (tl_goroutines.update(&key, &mine) != 0)
        count(TL_CNT_LIVE_FULL);
    return 0;
}

int on_exit(struct pt_regs *ctx)
{
    count(TL_CNT_EXIT_HITS);
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    struct goroutine_key key = {.pid = pid};
    if (read_u64(&key.goid, ctx->r14 + G_GOID))
        return 0;
    struct tl_test *t = tl_tests.lookup(&key);
    if (t)
        t->end_ns = bpf_ktime_get_ns();
    tl_goroutines.delete(&key);
    return 0;
}

int on_pexit(struct pt_regs *ctx)
{
    bpf_send_signal(TL_SIGSTOP);
    struct tl_exit_event ev = {.pid = bpf_get_current_pid_tgid() >> 32};
    tl_exits.perf_submit(ctx, &ev, sizeof(ev));
    return 0;
}
