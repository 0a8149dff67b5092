/* goleash.h: structs shared between the BPF programs in bpf/ and the Python readers
 * in agent/goleash/probes/. One section per program.
 * Keep the Python views in the same order; every field is naturally aligned
 * (tests/bpf/test_layouts.py compares them with what clang makes of this file).
 */
#ifndef GOLEASH_H
#define GOLEASH_H

/* ---- goroutines.bpf.c <-> probes/goroutines.py ----------------------------- */

/* A goroutine is (pid, goid): g structs are reused after exit, goids never are. */
struct goroutine_key {
    u32 pid;
    u32 _pad;
    u64 goid;
};

/* One live goroutine born while we were attached. */
struct goroutine_info {
    u64 parent_goid;
    u64 gopc;        /* PC after the `go` statement's call to newproc (link-time for non-PIE) */
    u64 startpc;     /* the goroutine's function */
    u64 created_ns;  /* bpf_ktime_get_ns(): CLOCK_MONOTONIC, the clock of Go's nanotime */
    s64 stack_id;    /* creator's user stack (--stacks), or -1 */
};

/* One traced process, a row of the per-CPU gr_procs array: where its
 * runtime.g keeps what the probes read (set by user space before its probes are
 * attached, the same on every CPU) and its counters (this CPU's share: the
 * program counts without atomics, user space adds the CPUs up).
 * gen tells a process from an earlier one with the same pid: every record that
 * outlives a hit (live slots, site keys, site cache entries) carries it. */
#define GR_SPAN_WORDS 32 /* one read of runtime.g covers at most 256 bytes */
#define GR_NO_FIELD 0xff /* w_parent: this Go release has no g.parentGoid */

/* Indexes of gr_proc.counters. */
enum goroutine_counter {
    GR_CNT_CREATE_HITS = 0,
    GR_CNT_EXIT_HITS,
    GR_CNT_NEWPROC_HITS,
    GR_CNT_LIVE_FULL,       /* live table full (or this process's share of it): a birth not recorded */
    GR_CNT_SITES_FULL,      /* site table full (or this process's share): a site's counts lost */
    GR_CNT_READ_FAULTS,     /* bpf_probe_read_user failed on a g */
    GR_CNT_STACK_FAULTS,    /* creator stack not captured */
    GR_CNT_MAX,
};

struct gr_proc {
    u32 gen;
    u16 span_start;  /* offset in runtime.g of the one read a hit makes */
    u16 span_bytes;  /* its length, at most GR_SPAN_WORDS * 8 */
    u8 w_goid;       /* word indexes into that read */
    u8 w_gopc;
    u8 w_startpc;
    u8 w_parent;     /* GR_NO_FIELD before Go 1.21: the parent is g0.m.curg's goid */
    u32 g_goid;      /* byte offsets for that older path */
    u32 g_m;
    u32 m_curg;
    u64 counters[GR_CNT_MAX];
};

/* gr_modes[row]: a plain array beside gr_procs so that user space can switch it
 * while the process runs (a per-CPU row is written whole, counters included). */
#define GR_WITH_EXITS 1 /* the exit probe is attached (--lifetimes): slots are claimed
                         * with a CAS and freed by exits; else a birth overwrites its
                         * slot (see overwrite_slot) */

/* Where a pid's gr_proc row is: slot pid % GR_PID_SLOTS of gr_pid_slots when it
 * holds that pid, else the gr_pid_rows hash. */
#ifndef GR_PID_SLOTS
#define GR_PID_SLOTS 4096 /* a power of two */
#endif
struct gr_pid_slot {
    u32 pid; /* 0: free */
    u32 row;
};

/* What one process holds in the tables all processes share, with atomics (only
 * the rare paths touch it): a process past its quota counts a drop instead of
 * filling the table for everyone. */
struct gr_usage {
    s64 live_in_hash; /* entries in live_goroutines */
    s64 sites;        /* entries in site_stats */
    s64 max_live_in_hash;
    s64 max_sites;
};

/* The fast home of a live goroutine: a slot of a direct-mapped array picked from
 * (goid, pid) (goids are sequential, so a process's slots in use stay close
 * together). With the exit probe (--lifetimes) a goroutine whose slot is taken goes
 * to the live_goroutines hash and its exit frees the slot. Without it (the default)
 * a birth overwrites its slot when the slot is free or its own process's: readers
 * trust a slot only for a goid the memory inventory sees live, and user space frees
 * the slots of goroutines no longer live every interval, so the table never fills. */
#define LIVE_SLOT_EMPTY 0ULL
#define LIVE_SLOT_WRITING (~0ULL) /* claimed, info not written yet: readers skip it */
struct live_slot {
    u64 goid;
    u32 pid;
    u32 gen;
    struct goroutine_info info;
};

/* A creation site: the `go` statement plus the function it starts. */
struct site_key {
    u32 pid;
    u32 gen;
    u64 gopc;
    u64 startpc;
};

#define LIFETIME_SLOTS 48 /* log2(ns) buckets: 1 ns .. ~3 days */

struct site_stats {
    u64 created;
    u64 exited;
    u64 exited_unseen;    /* exits of goroutines born before attach (or dropped) */
    u64 lifetime_sum_ns;
    u64 lifetime_log2[LIFETIME_SLOTS];
};

/* A per-CPU direct-mapped cache of creation counts in front of site_stats: a
 * birth at a cached site is one inlined array access, no hash lookup. An entry
 * taken by another site first adds its count to site_stats (dropped when its
 * process is gone). User space adds site_stats and every CPU's entries: counts
 * stay exact. */
#define SITE_CACHE 64 /* entries per CPU, a power of two */
struct site_cache_entry {
    u64 gopc;
    u64 startpc;
    u32 pid;
    u32 gen;
    u64 created; /* births not yet added to site_stats */
};

/* ---- end of goroutines section ---------------------------------------------- */

/* ---- funclat.bpf.c <-> probes/funcprog.py (function latency, panics) -------- */

/* Calls in flight per goroutine (struct goroutine_key), innermost last. A frame is
 * identified by its depth on the goroutine stack, stack.hi - SP at entry (== at its
 * RET): that survives stack copying (growth), unlike SP itself. */
#define FL_MAX_DEPTH 16 /* indexes are masked with 15 (fl_idx in funclat.bpf.c) */

struct fl_frame {
    u64 start_ns;
    u64 depth;   /* g.stack.hi - SP, SP pointing at the return address */
    u32 fid;     /* index of the traced function */
    u32 tid;     /* thread at entry: a different one at RET counts as migrated */
    u32 epoch;   /* fl_epoch[fid] at entry: its RET probes' attachment */
    u32 _pad;
};

struct fl_inflight {
    u32 n;
    u32 _pad;
    struct fl_frame frames[FL_MAX_DEPTH];
};

/* Per traced function (array index fid). Counts since attach; user space diffs. */
struct fl_stats {
    u64 count;       /* calls timed (entry and RET paired) */
    u64 sum_ns;
    u64 max_ns;
    u64 entry_hits;  /* unused: calls are counted per CPU in fl_calls */
    u64 ret_hits;
    u64 unmatched;   /* RET with no entry recorded (attached mid-call, or dropped) */
    u64 stale;       /* entries that never returned (panic unwound them, Goexit) */
    u64 migrated;    /* calls that returned on another thread than they entered on */
    u64 overflow;    /* entries not recorded: FL_MAX_DEPTH calls already in flight */
    u64 opened;      /* entries recorded; opened - count - stale - expired = in flight */
    u64 expired;     /* calls whose RET probes were detached meanwhile (sampling): not timed */
    u64 ret_nop_hits; /* hits at NOPs standing in for a RET (emulated; ret_hits: stepped) */
};

/* Per traced function, set by user space. Timing is sampled (duty-cycled) when its
 * RET probes would cost more than the budget; the entry probe then stays attached and
 * only counts. */
struct fl_ctl {
    u32 epoch;   /* bumped at each attachment of the function's RET probes: a frame
                  * entered under an older one may have returned while they were off */
    u32 timing;  /* 1: entries record a frame to be timed at RET; 0: count only */
    /* Entries are timed only in [from_ns, until_ns) of bpf_ktime_get_ns (CLOCK_MONOTONIC):
     * a slice ends on the kernel's clock when planned, however late user space wakes,
     * and calls are estimated from the entries timed over exactly that window. */
    u64 from_ns;
    u64 until_ns;
};

/* A probe site of a traced function, fl_sites[its address in the process]: one
 * program per kind of site serves every function, so one image serves every process. */
struct fl_site {
    u32 fid;
    u32 _pad;
    u64 sp_adj; /* entry: bytes SP was lowered before the site (frame set-up); RET: 0 */
};

/* The program is compiled once per node and loaded once per process (its maps are
 * that process's own): what differs per process is this, fl_config[0], and fl_sites,
 * written by user space before any probe is attached. */
struct fl_config {
    u64 g_goid;       /* offsets in runtime.g (DWARF or the per-version table) */
    u64 g_stack_hi;
    u64 panic_sp_adj; /* bytes SP was lowered before gopanic's probe site */
};

/* A panic site: the caller of runtime.gopanic and 3 more frames (frame pointers),
 * user space picks the first frame outside the runtime. Runtime PCs (add no bias). */
#define FL_PANIC_FRAMES 4
struct fl_panic_key {
    u32 pid;
    u32 _pad;
    u64 pcs[FL_PANIC_FRAMES];
};

enum fl_counter {
    FL_CNT_INFLIGHT_NEW = 0, /* goroutine entries created in fl_inflight */
    FL_CNT_INFLIGHT_DEL,     /* ... and deleted (last call returned, goroutine exited) */
    FL_CNT_INFLIGHT_FULL,    /* insert failed */
    FL_CNT_EXIT_HITS,        /* runtime.goexit1 */
    FL_CNT_EXIT_CLEANED,     /* frames dropped at goroutine exit */
    FL_CNT_PANIC_HITS,       /* runtime.gopanic */
    FL_CNT_PANIC_SITES_FULL,
    FL_CNT_READ_FAULTS,
    FL_CNT_UNKNOWN_SITES,    /* a hit at an address missing from fl_sites (a bug) */
    FL_CNT_MAX,
};

/* ---- end of funclat section -------------------------------------------------- */

#endif
