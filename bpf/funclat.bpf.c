// funclat.bpf.c: latency of chosen Go functions, and panics, in one Go process.
//
// Compiled once per node (probes/bpfimage.py caches the image), loaded once per traced
// process with maps of its own (probes/bpfload.py), attached with a pid filter at
// sites chosen by disassembly
// (agent/goleash/gobin/disasm.py):
//   fl_entry        the function's entry after its stack-growth check, on an
//                   emulated instruction (`push %rbp` on Go >= 1.21): fires once per
//                   call even when the stack grows, R14 = the calling g. It counts
//                   every call; it records a frame only while fl_ctl says `timing`
//   fl_ret          every RET of the function (single-stepped; never a uretprobe: Go
//                   moves goroutine stacks and a rewritten return address crashes it)
//   fl_retnop       a NOP right before a RET nothing jumps to, instead of that RET
//                   (emulated: ~10x cheaper; Go leaves one before ~3% of its RETs)
//   fl_goexit       runtime.goexit1 after its check: drops calls that never returned
//                   (only with no budget limit: a hit per goroutine exit; under a
//                   budget such calls age out of the LRU table fl_inflight)
//   fl_panic        runtime.gopanic after its check: counts panics per call site
// One program per kind of site serves every traced function: the site's address (the
// breakpoint's, which the kernel puts in IP before it runs the program) finds its
// function id in fl_sites.
//
// Entry and return are paired by goroutine (pid, goid), never by thread: a goroutine
// blocked in a traced call may resume on another thread. A goroutine's calls in flight
// form a small stack; each frame is keyed by its depth on the goroutine stack
// (stack.hi - SP), which stack copying preserves. Any frame at or below a newly
// entered or returning frame's depth is dead (a panic unwound it): it is dropped and
// counted as stale, so recursion and recovered panics pair correctly.
//
// What differs per process is data, never a -D macro (one image serves every process):
//   fl_config[0]     runtime.g offsets of its Go release, gopanic's SP adjustment
//   fl_sites[addr]   per probe site: its function id, the entry's SP adjustment
//   fl_ctl[fid]      per function: timing on/off and its window, the epoch of its
//                    RET probes
//   map sizes        fl_inflight's and fl_panics' capacity, fl_sites' and the per-function
//                    arrays' length: set when funcprog.py creates the maps (the sizes
//                    here are placeholders; no code depends on them)
// -D macros, the same for every process:
//   GL_FL_SUB_BITS GL_FL_SUB GL_FL_MAX_EXP GL_FL_NBUCKETS GL_FL_SLOTS   from probes/hist.py
#include <uapi/linux/ptrace.h>
#include "goleash.h"

// GL_FL_SLOTS is GL_FL_NBUCKETS rounded up to a power of two, so an index masked with
// it is provably in bounds (clang drops a plain `b < N` check the verifier needs).
struct fl_hist {
    u64 b[GL_FL_SLOTS];
};

BPF_ARRAY(fl_config, struct fl_config, 1);
BPF_HASH(fl_sites, u64, struct fl_site, 1);
BPF_ARRAY(fl_stats, struct fl_stats, 1);
BPF_ARRAY(fl_hist, struct fl_hist, 1);
// Per function, written by user space (struct fl_ctl): whether entries are timed now,
// and the epoch of its RET probes' attachment.
BPF_ARRAY(fl_ctl, struct fl_ctl, 1);
// Every call that passed the entry probe, per CPU (exact without an atomic): the entry
// stays attached while timing is sampled, so calls are counted even when not timed.
BPF_PERCPU_ARRAY(fl_calls, u64, 1);
// LRU: goroutines that exit while we are detached from goexit1 cannot pile up.
BPF_TABLE("lru_hash", struct goroutine_key, struct fl_inflight, fl_inflight, 1);
BPF_PERCPU_ARRAY(fl_zero, struct fl_inflight, 1); // never written: the insert template
BPF_HASH(fl_panics, struct fl_panic_key, u64, 1);
BPF_PERCPU_ARRAY(fl_counters, u64, FL_CNT_MAX);

static __always_inline u64 *counter_slot(int idx)
{
    return fl_counters.lookup(&idx);
}
#define READ_FAULTS_COUNTER FL_CNT_READ_FAULTS
#include "helpers.bpf.h"

// Same index as hist.bucket_of().
static __always_inline u32 fl_bucket(u64 v)
{
    if (v < GL_FL_SUB)
        return (u32)v;
    u32 k = log2_u64(v);
    if (k >= GL_FL_MAX_EXP)
        return GL_FL_NBUCKETS - 1;
    u32 sub = (u32)(v >> (k - GL_FL_SUB_BITS)) - GL_FL_SUB;
    return (k - GL_FL_SUB_BITS + 1) * GL_FL_SUB + sub;
}

// An index into fl_inflight.frames the verifier can bound: clang drops an `& mask` it
// proves redundant after a range check, the asm keeps it.
static __always_inline u32 fl_idx(u32 i)
{
    asm volatile("%0 &= 15" : "+r"(i)); /* FL_MAX_DEPTH - 1 */
    return i;
}

static __always_inline u32 fl_epoch_of(u32 fid)
{
    struct fl_ctl *c = fl_ctl.lookup(&fid);
    return c ? c->epoch : 0;
}

// A frame dropped untimed: expired if its RET probes went away meanwhile (sampling),
// else stale (a panic unwound it, or its goroutine exited).
static __always_inline void fl_drop(struct fl_frame *f)
{
    u32 fid = f->fid;
    struct fl_stats *st = fl_stats.lookup(&fid);
    if (!st)
        return;
    if (f->epoch != fl_epoch_of(fid))
        __sync_fetch_and_add(&st->expired, 1);
    else
        __sync_fetch_and_add(&st->stale, 1);
}

// Pop frames that cannot be live any more: deeper than `depth`, or (at an entry) as
// deep, since a new call at that depth means the old one is gone.
static __always_inline void fl_drop_dead(struct fl_inflight *fl, u64 depth, int inclusive)
{
#pragma unroll
    for (int i = 0; i < FL_MAX_DEPTH; i++) {
        u32 n = fl->n;
        if (n == 0)
            break;
        struct fl_frame *top = &fl->frames[fl_idx(n - 1)];
        if (top->depth < depth || (!inclusive && top->depth == depth))
            break;
        fl_drop(top);
        fl->n = n - 1;
    }
}

static __always_inline struct fl_config *fl_cfg(void)
{
    u32 zero = 0;
    return fl_config.lookup(&zero);
}

static __always_inline int fl_goroutine(struct pt_regs *ctx, u64 sp, struct goroutine_key *key,
                                        u64 *depth)
{
    struct fl_config *cfg = fl_cfg();
    if (!cfg)
        return -1;
    u64 g = ctx->r14, hi = 0;
    if (read_u64(&key->goid, g + cfg->g_goid) || read_u64(&hi, g + cfg->g_stack_hi))
        return -1;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    key->pid = pid_tgid >> 32;
    // A function running on the system stack (g0, goid 0) is bound to its thread:
    // key it by thread, since every thread has its own g0.
    if (key->goid == 0)
        key->goid = (1ULL << 63) | (u32)pid_tgid;
    *depth = hi - sp;
    return 0;
}

static __always_inline int fl_entry_of(struct pt_regs *ctx, u32 fid, u64 sp_adj)
{
    u64 *calls = fl_calls.lookup(&fid);
    if (calls)
        *calls += 1;
    // Untimed (sampling between slices): counting the call was all there is to do.
    // The slice's window is checked on the kernel's clock: user space estimates calls
    // from the entries timed in it, so it must be exactly the span they were timed in.
    struct fl_ctl *ctl = fl_ctl.lookup(&fid);
    if (!ctl || !ctl->timing)
        return 0;
    u64 now = bpf_ktime_get_ns();
    if (now < ctl->from_ns || now >= ctl->until_ns)
        return 0;
    u32 epoch = ctl->epoch;
    struct fl_stats *st = fl_stats.lookup(&fid);
    if (!st)
        return 0;

    struct goroutine_key key = {};
    u64 depth;
    if (fl_goroutine(ctx, ctx->sp + sp_adj, &key, &depth))
        return 0;
    struct fl_inflight *fl = fl_inflight.lookup(&key);
    if (!fl) {
        u32 zero = 0;
        struct fl_inflight *z = fl_zero.lookup(&zero);
        if (!z)
            return 0;
        if (fl_inflight.update(&key, z) != 0) {
            count(FL_CNT_INFLIGHT_FULL);
            return 0;
        }
        count(FL_CNT_INFLIGHT_NEW);
        fl = fl_inflight.lookup(&key);
        if (!fl)
            return 0;
    }
    fl_drop_dead(fl, depth, 1);
    u32 n = fl->n;
    if (n >= FL_MAX_DEPTH) {
        __sync_fetch_and_add(&st->overflow, 1);
        return 0;
    }
    struct fl_frame *f = &fl->frames[fl_idx(n)];
    f->depth = depth;
    f->fid = fid;
    f->tid = (u32)bpf_get_current_pid_tgid();
    f->epoch = epoch;
    f->start_ns = bpf_ktime_get_ns();
    fl->n = n + 1;
    __sync_fetch_and_add(&st->opened, 1);
    return 0;
}

static __always_inline void fl_record(struct fl_stats *st, u32 fid, u64 ns)
{
    struct fl_hist *h = fl_hist.lookup(&fid);
    if (h) {
        u32 b = fl_bucket(ns);
        __sync_fetch_and_add(&h->b[b & (GL_FL_SLOTS - 1)], 1);
    }
    __sync_fetch_and_add(&st->count, 1);
    __sync_fetch_and_add(&st->sum_ns, ns);
    if (ns > st->max_ns) // racy across CPUs: a max may be lost to a concurrent one
        st->max_ns = ns;
}

static __always_inline int fl_ret_of(struct pt_regs *ctx, u32 fid, int nop)
{
    u64 now = bpf_ktime_get_ns();
    struct fl_stats *st = fl_stats.lookup(&fid);
    if (!st)
        return 0;
    __sync_fetch_and_add(nop ? &st->ret_nop_hits : &st->ret_hits, 1);

    struct goroutine_key key = {};
    u64 depth;
    // At RET (and at a NOP right before it), SP points at the return address, as it
    // did at entry.
    if (fl_goroutine(ctx, ctx->sp, &key, &depth))
        return 0;
    struct fl_inflight *fl = fl_inflight.lookup(&key);
    if (!fl) {
        __sync_fetch_and_add(&st->unmatched, 1);
        return 0;
    }
    fl_drop_dead(fl, depth, 0);
    u32 n = fl->n;
    struct fl_frame *top = &fl->frames[fl_idx(n - 1)];
    if (n > 0 && top->depth == depth) {
        if (top->fid == fid && top->epoch == fl_epoch_of(fid)) {
            fl_record(st, fid, now - top->start_ns);
            if (top->tid != (u32)bpf_get_current_pid_tgid())
                __sync_fetch_and_add(&st->migrated, 1);
        } else {
            fl_drop(top);
            __sync_fetch_and_add(&st->unmatched, 1);
        }
        fl->n = n - 1;
    } else {
        __sync_fetch_and_add(&st->unmatched, 1);
    }
    if (fl->n == 0) {
        fl_inflight.delete(&key);
        count(FL_CNT_INFLIGHT_DEL);
    }
    return 0;
}

static __always_inline struct fl_site *fl_site_at(struct pt_regs *ctx)
{
    u64 addr = ctx->ip;
    struct fl_site *site = fl_sites.lookup(&addr);
    if (!site)
        count(FL_CNT_UNKNOWN_SITES);
    return site;
}

int fl_entry(struct pt_regs *ctx)
{
    struct fl_site *site = fl_site_at(ctx);
    return site ? fl_entry_of(ctx, site->fid, site->sp_adj) : 0;
}

int fl_ret(struct pt_regs *ctx)
{
    struct fl_site *site = fl_site_at(ctx);
    return site ? fl_ret_of(ctx, site->fid, 0) : 0;
}

int fl_retnop(struct pt_regs *ctx)
{
    struct fl_site *site = fl_site_at(ctx);
    return site ? fl_ret_of(ctx, site->fid, 1) : 0;
}

// runtime.goexit1 on the exiting goroutine (R14): its calls in flight never return.
int fl_goexit(struct pt_regs *ctx)
{
    count(FL_CNT_EXIT_HITS);
    struct fl_config *cfg = fl_cfg();
    if (!cfg)
        return 0;
    struct goroutine_key key = {.pid = bpf_get_current_pid_tgid() >> 32};
    if (read_u64(&key.goid, ctx->r14 + cfg->g_goid))
        return 0;
    struct fl_inflight *fl = fl_inflight.lookup(&key);
    if (!fl)
        return 0;
    u32 n = fl->n;
#pragma unroll
    for (int i = 0; i < FL_MAX_DEPTH; i++) { // no break: fully unrolled, fixed offsets
        if (i < n)
            fl_drop(&fl->frames[i]);
    }
    count_n(FL_CNT_EXIT_CLEANED, n);
    fl_inflight.delete(&key);
    count(FL_CNT_INFLIGHT_DEL);
    return 0;
}

// runtime.gopanic: [SP] is the return address into the function that panicked (for
// runtime errors, into the runtime's panicIndex/panicmem/...; user space walks up to
// the first frame outside the runtime using the frame-pointer chain kept here).
int fl_panic(struct pt_regs *ctx)
{
    count(FL_CNT_PANIC_HITS);
    struct fl_config *cfg = fl_cfg();
    if (!cfg)
        return 0;
    struct fl_panic_key key = {.pid = bpf_get_current_pid_tgid() >> 32};
    if (read_u64(&key.pcs[0], ctx->sp + cfg->panic_sp_adj))
        return 0;
    u64 bp = ctx->bp;
#pragma unroll
    for (int i = 1; i < FL_PANIC_FRAMES; i++) {
        u64 next = 0;
        if (bp == 0 || read_u64(&key.pcs[i], bp + 8) || read_u64(&next, bp))
            break;
        bp = next;
    }
    u64 *v = fl_panics.lookup(&key);
    if (v) {
        __sync_fetch_and_add(v, 1);
        return 0;
    }
    u64 one = 1;
    if (fl_panics.insert(&key, &one) != 0) {
        v = fl_panics.lookup(&key); // another CPU inserted it first
        if (v)
            __sync_fetch_and_add(v, 1);
        else
            count(FL_CNT_PANIC_SITES_FULL);
    }
    return 0;
}

