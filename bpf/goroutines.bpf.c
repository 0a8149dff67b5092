// goroutines.bpf.c: every goroutine of the traced Go processes from its birth.
//
// One program per agent for every traced process and every Go release: what differs
// per process (runtime.g offsets, which words of g one read covers, whether its exit
// probe is on) is in gr_procs, a row found by pid, filled by user space before the
// process's probes are attached, not in -D macros, so BCC compiles this once per
// agent, not once per process. Only build options are macros: WITH_STACKS and the
// table sizes.
//
// Attached per process (uprobes with a pid filter) at sites chosen by disassembly
// (agent/goleash/gobin/disasm.py) so the kernel emulates the probed instruction:
//   on_create_bx  `call runtime.runqput` in runtime.newproc's closure: RBX = new g
//   on_create_ax  (fallback) every RET of runtime.newproc1: RAX = new g
//   on_exit       (--lifetimes only) `push %rbp` of runtime.goexit1: R14 = g
//   on_newproc    (WITH_STACKS only) runtime.newproc on the creator's own stack
// One hit per goroutine by default: the memory inventory tells which goroutines
// still live, so exits per site follow from births and live counts; the exit probe
// is needed only for exact per-site lifetime distributions. Never a uretprobe: Go
// moves stacks.
#include <uapi/linux/ptrace.h>
#include "goleash.h"

#ifndef BPF_F_MMAPABLE
#define BPF_F_MMAPABLE (1U << 10)
#endif

/* pid -> row of gr_procs: a direct-mapped array (inlined by the verifier, where a
 * hash lookup costs ~60 ns a hit here), and a hash for pids whose slot is taken. */
BPF_ARRAY(gr_pid_slots, struct gr_pid_slot, GR_PID_SLOTS);
BPF_HASH(gr_pid_rows, u32, u32, MAX_PROCS);
BPF_PERCPU_ARRAY(gr_procs, struct gr_proc, MAX_PROCS);
BPF_ARRAY(gr_modes, u32, MAX_PROCS);
/* Per row: live_goroutines entries user space freed (reconcile). Only user space
 * writes it, so it needs no atomics beside gr_usage.live_in_hash (the program's). */
BPF_ARRAY(gr_freed, s64, MAX_PROCS);
BPF_HASH(gr_usage, u32, struct gr_usage, MAX_PROCS);
/* Per row: every record of the process born before this (CLOCK_MONOTONIC ns) has
 * been read by its tracker, which keeps those of live goroutines (see may_take).
 * Only user space writes it, after each reading; 0 until the first. */
BPF_ARRAY(gr_read_ns, u64, MAX_PROCS);
/* Live goroutines: a direct-mapped array, inlined by the verifier (no helper call,
 * no hashing, no bucket lock), and a hash for goroutines whose slot is taken. Hash
 * ops cost ~300 ns a hit on kernel 6.18, the array ~0. The hash is rarely used, so
 * it allocates on insert. Mmapped by the reader. */
BPF_F_TABLE("array", u32, struct live_slot, live_slots, LIVE_SLOTS, BPF_F_MMAPABLE);
BPF_F_TABLE("hash", struct goroutine_key, struct goroutine_info, live_goroutines, MAX_LIVE,
            BPF_F_NO_PREALLOC);
/* Per-CPU: the hot path takes no atomics and no cache line moves between CPUs.
 * Births are counted in site_cache first (see count_birth). Allocated on insert:
 * a 416-byte value per CPU per site adds up on a node with many CPUs. */
BPF_F_TABLE("percpu_hash", struct site_key, struct site_stats, site_stats, MAX_SITES,
            BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(site_cache, struct site_cache_entry, SITE_CACHE);
/* A zeroed site_stats to insert from: at 416 bytes it does not fit on the 512-byte
 * BPF stack next to the rest. Never written. */
BPF_PERCPU_ARRAY(zero_site, struct site_stats, 1);
#ifdef WITH_STACKS
BPF_STACK_TRACE(creator_stacks, MAX_SITES);
BPF_HASH(pending_stack, u32, s64, 4096); /* thread id -> stack id, newproc -> create */
#endif

/* The traced process PID's row: its layout and this CPU's counters; its index in
 * *ROW_OUT. */
static __always_inline struct gr_proc *proc_row(u32 pid, u32 *row_out)
{
    u32 idx = pid & (GR_PID_SLOTS - 1), row;
    struct gr_pid_slot *s = gr_pid_slots.lookup(&idx);
    if (s && s->pid == pid) {
        row = s->row;
    } else {
        u32 *r = gr_pid_rows.lookup(&pid);
        if (!r)
            return NULL;
        row = *r;
    }
    *row_out = row;
    return gr_procs.lookup(&row);
}

static __always_inline struct gr_proc *proc_of(u32 pid)
{
    u32 row;
    return proc_row(pid, &row);
}

static __always_inline void count(struct gr_proc *p, int idx)
{
    if (idx >= 0 && idx < GR_CNT_MAX)
        p->counters[idx]++;
}

static __always_inline int read_u64(struct gr_proc *p, u64 *dst, u64 addr)
{
    if (bpf_probe_read_user(dst, sizeof(*dst), (void *)addr) != 0) {
        count(p, GR_CNT_READ_FAULTS);
        return -1;
    }
    return 0;
}

/* g.goid, g.parentGoid, g.gopc and g.startpc sit within ~160 bytes: read them with
 * one bpf_probe_read_user. On kernel 6.18 (go1.22 churn, bpf_stats) each read costs
 * ~130 ns whatever its size, so one 152-byte read beats goid + a 40-byte span:
 * on_create 784 -> 657 ns, on_exit 554 -> 459 ns. Which words are which is per
 * process: a word index is masked so the verifier sees it inside the span. */
struct g_span {
    u64 w[GR_SPAN_WORDS];
};
#define WORD(span, i) ((span).w[(i) & (GR_SPAN_WORDS - 1)])

static __always_inline int read_span(struct gr_proc *p, struct g_span *span, u64 g)
{
    u32 n = p->span_bytes;
    if (n > sizeof(*span))
        n = sizeof(*span);
    if (bpf_probe_read_user(span, n, (void *)(g + p->span_start)) != 0) {
        count(p, GR_CNT_READ_FAULTS);
        return -1;
    }
    return 0;
}

/* Goids of every process start at 1: the pid spreads processes over the array. */
static __always_inline struct live_slot *slot_of(u32 pid, u64 goid)
{
    u32 idx = (u32)(goid + pid * 2654435761u) & (LIVE_SLOTS - 1);
    return live_slots.lookup(&idx);
}

/* The goroutine's slot; NULL for a goid that reads as one of the slot's markers. */
static __always_inline struct live_slot *birth_slot(struct goroutine_key *key)
{
    if (key->goid == LIVE_SLOT_EMPTY || key->goid == LIVE_SLOT_WRITING)
        return NULL;
    return slot_of(key->pid, key->goid);
}

/* Fill a slot marked LIVE_SLOT_WRITING and publish it: goid last. x86 keeps stores in
 * order, so a reader that sees the goid sees the info; the barrier keeps the compiler
 * from reordering them. */
static __always_inline int publish_slot(struct live_slot *s, struct gr_proc *p,
                                        struct goroutine_key *key, struct goroutine_info *info)
{
    s->pid = key->pid;
    s->gen = p->gen;
    s->info = *info;
    asm volatile("" ::: "memory");
    s->goid = key->goid;
    return 1;
}

/* Whether a birth of P (KEY) may take slot S, which holds OLD as its goid: when it
 * is empty, holds this very process (its own dead goroutine, or a live one whose
 * record its tracker kept at its last reading), holds a process no longer traced,
 * or holds a record its process's tracker has read (older than its gr_read_ns):
 * the tracker keeps what it read of live goroutines, so the rest is of dead ones.
 * Slots are never freed one by one, and records of dead goroutines (~100k an
 * interval from a busy service) cost user space nothing. Another process's row is
 * looked up only when a birth lands on its record. */
static __always_inline int may_take(struct live_slot *s, u64 old, struct gr_proc *p,
                                    struct goroutine_key *key)
{
    if (old == LIVE_SLOT_EMPTY)
        return 1;
    if (old == LIVE_SLOT_WRITING)
        return 0;
    if (s->pid == key->pid && s->gen == p->gen)
        return 1;
    u32 row;
    struct gr_proc *holder = proc_row(s->pid, &row);
    if (!holder || holder->gen != s->gen)
        return 1;
    u32 *mode = gr_modes.lookup(&row);
    if (!mode || (*mode & GR_WITH_EXITS))
        return 0; /* its exits free its records, and need them for lifetimes */
    u64 *read_ns = gr_read_ns.lookup(&row);
    return read_ns && s->info.created_ns < *read_ns;
}

/* With the exit probe on, exits free slots: a birth claims its slot (CAS, so two
 * CPUs never write one slot) that may_take() gives it, never its own process's.
 * 0 when the slot is taken. */
static __always_inline int put_in_slot(struct gr_proc *p, struct goroutine_key *key,
                                       struct goroutine_info *info)
{
    struct live_slot *s = birth_slot(key);
    if (!s)
        return 0;
    u64 old = s->goid;
    if (old != LIVE_SLOT_EMPTY && s->pid == key->pid && s->gen == p->gen)
        return 0; /* a live goroutine of this process: its exit frees it */
    if (!may_take(s, old, p, key))
        return 0;
    if (__sync_val_compare_and_swap(&s->goid, old, LIVE_SLOT_WRITING) != old)
        return 0;
    return publish_slot(s, p, key, info);
}

/* Without the exit probe (the default) nothing frees a slot: a birth takes its slot
 * when may_take() says so. No atomics: a slot of this process is written by this
 * process only, and the goid published last tells a reader the info is whole.
 * Otherwise 0: the birth goes to the hash (user space frees its dead entries). */
static __always_inline int overwrite_slot(struct gr_proc *p, struct goroutine_key *key,
                                          struct goroutine_info *info)
{
    struct live_slot *s = birth_slot(key);
    if (!s || !may_take(s, s->goid, p, key))
        return 0;
    s->goid = LIVE_SLOT_WRITING;
    asm volatile("" ::: "memory");
    return publish_slot(s, p, key, info);
}

/* Into the shared hash, within this process's share of it. */
static __always_inline void put_in_hash(struct gr_proc *p, u32 row, struct goroutine_key *key,
                                        struct goroutine_info *info)
{
    struct gr_usage *u = gr_usage.lookup(&key->pid);
    s64 *freed = gr_freed.lookup(&row);
    if (!u || !freed || u->live_in_hash - *freed >= u->max_live_in_hash) {
        count(p, GR_CNT_LIVE_FULL);
        return;
    }
    if (live_goroutines.update(key, info) != 0) {
        count(p, GR_CNT_LIVE_FULL);
        return;
    }
    __sync_fetch_and_add(&u->live_in_hash, 1);
}

static __always_inline struct site_stats *site_for(struct gr_proc *p, u32 pid, u64 gopc,
                                                   u64 startpc)
{
    struct site_key sk = {.pid = pid, .gen = p->gen, .gopc = gopc, .startpc = startpc};
    struct site_stats *st = site_stats.lookup(&sk);
    if (st)
        return st;
    int zero_idx = 0;
    struct site_stats *zero = zero_site.lookup(&zero_idx);
    struct gr_usage *u = gr_usage.lookup(&pid);
    if (!zero || !u)
        return NULL;
    if (u->sites >= u->max_sites) {
        count(p, GR_CNT_SITES_FULL);
        return NULL;
    }
    if (site_stats.insert(&sk, zero) == 0)
        __sync_fetch_and_add(&u->sites, 1);
    st = site_stats.lookup(&sk);
    if (!st)
        count(p, GR_CNT_SITES_FULL);
    return st;
}

/* One birth at a site: in this CPU's cache entry for it, evicting another site's
 * pending count into site_stats when the entry was taken. */
static __always_inline void count_birth(struct gr_proc *p, u32 pid, u64 gopc, u64 startpc)
{
    u32 idx = (u32)(gopc ^ (gopc >> 9) ^ startpc ^ (startpc >> 5) ^ pid) & (SITE_CACHE - 1);
    struct site_cache_entry *e = site_cache.lookup(&idx);
    if (!e) {
        struct site_stats *st = site_for(p, pid, gopc, startpc);
        if (st)
            st->created++;
        return;
    }
    if (e->gopc == gopc && e->startpc == startpc && e->pid == pid && e->gen == p->gen) {
        e->created++;
        return;
    }
    /* Take the entry first, then add its old count to site_stats: a reader that
     * sees site_stats unchanged around its read of the cache then never counts the
     * old count twice (probes/goroutine_program.py reads them in that order). */
    u64 n = e->created, old_gopc = e->gopc, old_startpc = e->startpc;
    u32 old_pid = e->pid, old_gen = e->gen;
    e->gopc = gopc;
    e->startpc = startpc;
    e->pid = pid;
    e->gen = p->gen;
    e->created = 1;
    asm volatile("" ::: "memory");
    if (!n)
        return;
    /* The old entry may be another process's, or of a process no longer traced:
     * its count goes to its own site only while that process is still registered. */
    struct gr_proc *owner = p;
    if (old_pid != pid)
        owner = proc_of(old_pid);
    if (!owner || owner->gen != old_gen)
        return;
    struct site_stats *old = site_for(owner, old_pid, old_gopc, old_startpc);
    if (old)
        old->created += n;
}

#ifdef WITH_STACKS
int on_newproc(struct pt_regs *ctx)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    struct gr_proc *p = proc_of(pid);
    if (!p)
        return 0;
    count(p, GR_CNT_NEWPROC_HITS);
    u32 tid = (u32)bpf_get_current_pid_tgid();
    s64 id = creator_stacks.get_stackid(ctx, BPF_F_USER_STACK);
    if (id < 0)
        count(p, GR_CNT_STACK_FAULTS);
    pending_stack.update(&tid, &id);
    return 0;
}
#endif

static __always_inline int create(struct pt_regs *ctx, u64 g)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32, row = 0;
    struct gr_proc *p = proc_row(pid, &row);
    if (!p)
        return 0;
    count(p, GR_CNT_CREATE_HITS);
    struct goroutine_key key = {.pid = pid};
    struct goroutine_info info = {.stack_id = -1};
    struct g_span span;

    if (read_span(p, &span, g))
        return 0;
    key.goid = WORD(span, p->w_goid);
    info.gopc = WORD(span, p->w_gopc);
    info.startpc = WORD(span, p->w_startpc);
    if (p->w_parent != GR_NO_FIELD) {
        info.parent_goid = WORD(span, p->w_parent);
    } else {
        /* Before Go 1.21 the g has no parentGoid. This site runs on the system
         * stack, so R14 is g0, and g0.m.curg is the goroutine that executed the `go`. */
        u64 m = 0, curg = 0;
        if (read_u64(p, &m, ctx->r14 + p->g_m) == 0 && m &&
            read_u64(p, &curg, m + p->m_curg) == 0 && curg)
            read_u64(p, &info.parent_goid, curg + p->g_goid);
    }
    info.created_ns = bpf_ktime_get_ns();
#ifdef WITH_STACKS
    u32 tid = (u32)bpf_get_current_pid_tgid();
    s64 *sid = pending_stack.lookup(&tid);
    if (sid) {
        info.stack_id = *sid;
        pending_stack.delete(&tid);
    }
#endif
    u32 *mode = gr_modes.lookup(&row);
    int placed = mode && (*mode & GR_WITH_EXITS) ? put_in_slot(p, &key, &info)
                                                 : overwrite_slot(p, &key, &info);
    if (!placed)
        put_in_hash(p, row, &key, &info);

    count_birth(p, pid, info.gopc, info.startpc);
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
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    struct gr_proc *p = proc_of(pid);
    if (!p)
        return 0;
    count(p, GR_CNT_EXIT_HITS);
    struct goroutine_key key = {.pid = pid};
    struct g_span span;

    if (read_span(p, &span, ctx->r14))
        return 0;
    key.goid = WORD(span, p->w_goid);

    struct site_stats *st = site_for(p, pid, WORD(span, p->w_gopc), WORD(span, p->w_startpc));
    u64 created_ns;
    struct live_slot *slot = slot_of(pid, key.goid);
    if (slot && slot->goid == key.goid && slot->pid == pid && slot->gen == p->gen) {
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
        if (live_goroutines.delete(&key) == 0) {
            struct gr_usage *u = gr_usage.lookup(&pid);
            if (u)
                __sync_fetch_and_add(&u->live_in_hash, -1);
        }
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
