/* helpers.bpf.h: helpers every goleash BPF program needs, written once.
 *
 * Counters are a per-CPU u64 array (exact without an atomic: a CPU runs one program
 * at a time). A program names its array and the counter of failed user reads
 * before including this header:
 *
 *   BPF_PERCPU_ARRAY(tl_counters, u64, TL_CNT_MAX);
 *   static __always_inline u64 *counter_slot(int idx) { return tl_counters.lookup(&idx); }
 *   #define READ_FAULTS_COUNTER TL_CNT_READ_FAULTS
 *   #include "helpers.bpf.h"
 *
 * The accessor is a function in the program, not a macro taking the map here: BCC
 * rewrites `map.lookup()` only in the main source (not in an included file) and
 * refuses it inside any macro ("cannot use map function inside a macro").
 */
#ifndef GOLEASH_HELPERS_BPF_H
#define GOLEASH_HELPERS_BPF_H

#ifndef READ_FAULTS_COUNTER
#error "define READ_FAULTS_COUNTER (and counter_slot()) before including helpers.bpf.h"
#endif

static __always_inline void count_n(int idx, u64 n)
{
    u64 *v = counter_slot(idx);
    if (v)
        *v += n;
}

static __always_inline void count(int idx)
{
    count_n(idx, 1);
}

/* One u64 of the traced process's memory; a failed read is counted, never trusted. */
static __always_inline int read_u64(u64 *dst, u64 addr)
{
    if (bpf_probe_read_user(dst, sizeof(*dst), (void *)addr) != 0) {
        count_n(READ_FAULTS_COUNTER, 1);
        return -1;
    }
    return 0;
}

/* floor(log2(v)) for v > 0, without loops or clz (BPF has neither). */
static __always_inline u32 log2_u64(u64 v)
{
    u32 r = 0, s;
    s = (v > 0xFFFFFFFFULL) << 5; v >>= s; r |= s;
    s = (v > 0xFFFF) << 4; v >>= s; r |= s;
    s = (v > 0xFF) << 3; v >>= s; r |= s;
    s = (v > 0xF) << 2; v >>= s; r |= s;
    s = (v > 0x3) << 1; v >>= s; r |= s;
    return r | (u32)(v >> 1);
}

#endif
