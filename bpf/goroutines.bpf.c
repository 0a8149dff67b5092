// goroutines.bpf.c: every goroutine of one Go process from birth to exit.
//
// Attached per process (BCC, pid filter) at sites chosen by disassembly
// (agent/goleash/gobin/disasm.py) so the kernel emulates the probed instruction:
//   on_create   `call runtime.runqput` in runtime.newproc's closure: RBX = new g
//               (fallback: every RET of runtime.newproc1, RAX = new g)
//   on_exit     `push %rbp` of runtime.goexit1 after its stack check: R14 = g
//   on_newproc  (--stacks only) runtime.newproc on the creator's own stack
// Two hits per goroutine lifetime by default. Never a uretprobe: Go moves stacks.
//
// Offsets of runtime.g come from DWARF or the per-version table as -D macros:
//   G_GOID G_GOPC G_STARTPC [G_PARENT_GOID | (G_M M_CURG)]
//   SPAN_START SPAN_WORDS: one read covers goid .. [parentGoid,] gopc .. startpc
//   CREATE_REG (bx|ax)  LIVE_SLOTS (a power of two)  MAX_LIVE  MAX_SITES  WITH_STACKS
#include <uapi/linux/ptrace.h>
#include "goleash.h"

#ifndef BPF_F_MMAPABLE
#define BPF_F_MMAPABLE (1U << 10)
#endif

/* Live goroutines: a direct-mapped array indexed by goid, inlined by the verifier
 * (no helper call, no hashing, no bucket lock), and a hash for goroutines whose
 * slot is taken. Hash ops cost ~300 ns a hit on kernel 6.18, the array ~0.
 * The hash is rarely used, so it allocates on insert. Mmapped by the reader. */
BPF_F_TABLE("array", u32, struct live_slot, live_slots, LIVE_SLOTS, BPF_F_MMAPABLE);
BPF_F_TABLE("hash", struct goroutine_key, struct goroutine_info, live_goroutines, MAX_LIVE,
            BPF_F_NO_PREALLOC);
/* Per-CPU: the hot path takes no atomics and no cache line moves between CPUs.
 * Births are counted in site_cache first (see count_birth). */
BPF_PERCPU_HASH(site_stats, struct site_key, struct site_stats, MAX_SITES);
BPF_PERCPU_ARRAY(counters, u64, GR_CNT_MAX);
BPF_PERCPU_ARRAY(site_cache, struct site_cache_entry, SITE_CACHE);
/* A zeroed site_stats to insert from: at 416 bytes it does not fit on the 512-byte
 * BPF stack next to the rest. Never written. */
BPF_PERCPU_ARRAY(zero_site, struct site_stats, 1);
#ifdef WITH_STACKS
BPF_STACK_TRACE(creator_stacks, MAX_SITES);
BPF_HASH(pending_stack, u32, s64, 4096); /* thread id -> stack id, newproc -> create */
#endif

static __always_inline void count(int idx)
{
    u64 *v = counters.lookup(&idx);
    if (v)
        (*v)++;
}

static __always_inline int read_u64(u64 *dst, u64 addr)
{
    if (bpf_probe_read_user(dst, sizeof(*dst), (void *)addr) != 0) {
        count(GR_CNT_READ_FAULTS);
        return -1;
    }
    return 0;
}

/* g.goid, g.parentGoid, g.gopc and g.startpc sit within ~160 bytes: read them with
 * one bpf_probe_read_user. On kernel 6.18 (go1.22 churn, bpf_stats) each read costs
 * ~130 ns whatever its size, so one 152-byte read beats goid + a 40-byte span:
 * on_create 784 -> 657 ns, on_exit 554 -> 459 ns. */
struct g_span {
    u64 w[SPAN_WORDS];
};
#define SPAN_AT(span, off) ((span).w[((off) - SPAN_START) / 8])

static __always_inline int read_span(struct g_span *span, u64 g)
{
    if (bpf_probe_read_user(span, sizeof(*span), (void *)(g + SPAN_START)) != 0) {
        count(GR_CNT_READ_FAULTS);
        return -1;
    }
    return 0;
}

static __always_inline struct live_slot *slot_of(u64 goid)
{
    u32 idx = goid & (LIVE_SLOTS - 1);
    return live_slots.lookup(&idx);
}

/* Record a birth in the goroutine's slot; 0 when the slot is taken. */
static __always_inline int put_in_slot(struct goroutine_key *key, struct goroutine_info *info)
{
    if (key->goid == LIVE_SLOT_EMPTY || key->goid == LIVE_SLOT_WRITING)
        return 0;
    struct live_slot *s = slot_of(key->goid);
    if (!s || __sync_val_compare_and_swap(&s->goid, LIVE_SLOT_EMPTY, LIVE_SLOT_WRITING) != 0)
        return 0;
    s->pid = key->pid;
    s->info = *info;
    /* Publish goid last: x86 keeps stores in order, so a reader that sees the goid
     * sees the info; the barrier keeps the compiler from reordering them. */
    asm volatile("" ::: "memory");
    s->goid = key->goid;
    return 1;
}

static __always_inline struct site_stats *site_for(u32 pid, u64 gopc, u64 startpc)
{
    struct site_key sk = {.pid = pid, .gopc = gopc, .startpc = startpc};
    struct site_stats *st = site_stats.lookup(&sk);
    if (st)
        return st;
    int zero_idx = 0;
    struct site_stats *zero = zero_site.lookup(&zero_idx);
    if (!zero)
        return NULL;
    if (site_stats.insert(&sk, zero) != 0 && site_stats.lookup(&sk) == NULL) {
        count(GR_CNT_SITES_FULL);
        return NULL;
    }
    return site_stats.lookup(&sk);
}

/* One birth at a site: in this CPU's cache entry for it, evicting another site's
 * pending count into site_stats when the entry was taken. */
static __always_inline void count_birth(u32 pid, u64 gopc, u64 startpc)
{
    u32 idx = (u32)(gopc ^ (gopc >> 9) ^ startpc ^ (startpc >> 5)) & (SITE_CACHE - 1);
    struct site_cache_entry *e = site_cache.lookup(&idx);
    if (!e) {
        struct site_stats *st = site_for(pid, gopc, startpc);
        if (st)
            st->created++;
        return;
    }
    if (e->gopc == gopc && e->startpc == startpc && e->pid == pid) {
        e->created++;
        return;
    }
    /* Take the entry first, then add its old count to site_stats: a reader that
     * sees site_stats unchanged around its read of the cache then never counts the
     * old count twice (probes/goroutines.py reads them in that order). */
    u64 n = e->created, old_gopc = e->gopc, old_startpc = e->startpc;
    u32 old_pid = e->pid;
    e->gopc = gopc;
    e->startpc = startpc;
    e->pid = pid;
    e->created = 1;
    asm volatile("" ::: "memory");
    if (n) {
        struct site_stats *old = site_for(old_pid, old_gopc, old_startpc);
        if (old)
            old->created += n;
    }
}

#ifdef WITH_STACKS
int on_newproc(struct pt_regs *ctx)
{
    count(GR_CNT_NEWPROC_HITS);
    u32 tid = (u32)bpf_get_current_pid_tgid();
    s64 id = creator_stacks.get_stackid(ctx, BPF_F_USER_STACK);
    if (id < 0)
        count(GR_CNT_STACK_FAULTS);
    pending_stack.update(&tid, &id);
    return 0;
}
#endif

int on_create(struct pt_regs *ctx)
{
    count(GR_CNT_CREATE_HITS);
    u64 g = ctx->CREATE_REG;
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    struct goroutine_key key = {.pid = pid};
    struct goroutine_info info = {.stack_id = -1};
    struct g_span span;

    if (read_span(&span, g))
        return 0;
    key.goid = SPAN_AT(span, G_GOID);
    info.gopc = SPAN_AT(span, G_GOPC);
    info.startpc = SPAN_AT(span, G_STARTPC);
#ifdef G_PARENT_GOID
    info.parent_goid = SPAN_AT(span, G_PARENT_GOID);
#else
    /* Before Go 1.21 the g has no parentGoid. This site runs on the system stack,
     * so R14 is g0, and g0.m.curg is the goroutine that executed the `go`. */
    u64 m = 0, curg = 0;
    if (read_u64(&m, ctx->r14 + G_M) == 0 && m && read_u64(&curg, m + M_CURG) == 0 && curg)
        read_u64(&info.parent_goid, curg + G_GOID);
#endif
    info.created_ns = bpf_ktime_get_ns();
#ifdef WITH_STACKS
    u32 tid = (u32)bpf_get_current_pid_tgid();
    s64 *sid = pending_stack.lookup(&tid);
    if (sid) {
        info.stack_id = *sid;
        pending_stack.delete(&tid);
    }
#endif
    if (!put_in_slot(&key, &info) && live_goroutines.update(&key, &info) != 0)
        count(GR_CNT_LIVE_FULL);

    count_birth(pid, info.gopc, info.startpc);
    return 0;
}

static __always_inline u32 log2_slot(u64 v)
{
    u32 r = 0;
#pragma unroll
    for (int i = 5; i >= 0; i--) {
        u32 shift = 1u << i;
        if (v >= (1ull << shift)) {
            v >>= shift;
            r += shift;
        }
    }
    return r < LIFETIME_SLOTS ? r : LIFETIME_SLOTS - 1;
}

int on_exit(struct pt_regs *ctx)
{
    count(GR_CNT_EXIT_HITS);
    u64 g = ctx->r14;
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    struct goroutine_key key = {.pid = pid};
    struct g_span span;

    if (read_span(&span, g))
        return 0;
    key.goid = SPAN_AT(span, G_GOID);

    struct site_stats *st = site_for(pid, SPAN_AT(span, G_GOPC), SPAN_AT(span, G_STARTPC));
    u64 created_ns;
    struct live_slot *slot = slot_of(key.goid);
    if (slot && slot->goid == key.goid && slot->pid == pid) {
        created_ns = slot->info.created_ns;
        asm volatile("" ::: "memory"); /* read the slot before freeing it */
        slot->goid = LIVE_SLOT_EMPTY;
    } else {
        struct goroutine_info *info = live_goroutines.lookup(&key);
        if (!info) {
            if (st)
                st->exited_unseen++;
            return 0;
        }
        created_ns = info->created_ns;
        live_goroutines.delete(&key);
    }
    u64 lifetime = bpf_ktime_get_ns() - created_ns;
    if (!st)
        return 0;
    st->exited++;
    st->lifetime_sum_ns += lifetime;
    u32 bucket = log2_slot(lifetime);
    if (bucket < LIFETIME_SLOTS)
        st->lifetime_log2[bucket]++;
    return 0;
}
