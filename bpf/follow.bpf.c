// follow.bpf.c: the process tree of one command (`goleash check`).
//
// Scheduler tracepoints, read through their tracefs formats (no kernel structs):
//   sched_process_fork  a followed process forks: follow the child
//   sched_process_exec  a followed process execs: stop it (SIGSTOP) before its first
//                       instruction so user space can judge the new executable and
//                       attach its probes, then SIGCONT it
//   sched_process_exit  a followed task ends: forget it
// Threads are followed too (a fork tracepoint cannot tell them apart); they are
// forgotten when they exit, so the table holds live tasks only.
#include <uapi/linux/ptrace.h>

#define FOLLOW_SIGSTOP 19
#define FOLLOW_EXEC 1
#define FOLLOW_EXIT 2

struct follow_event {
    u32 pid;
    u32 kind;
};

BPF_HASH(followed, u32, u8, MAX_FOLLOWED);
BPF_PERF_OUTPUT(follow_events);
BPF_ARRAY(follow_full, u64, 1);

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!followed.lookup(&tgid))
        return 0;
    u32 child = args->child_pid;
    u8 one = 1;
    if (followed.update(&child, &one) != 0) {
        int zero = 0;
        u64 *v = follow_full.lookup(&zero);
        if (v)
            __sync_fetch_and_add(v, 1);
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!followed.lookup(&tgid))
        return 0;
    bpf_send_signal(FOLLOW_SIGSTOP);
    struct follow_event ev = {.pid = tgid, .kind = FOLLOW_EXEC};
    follow_events.perf_submit(args, &ev, sizeof(ev));
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
        struct follow_event ev = {.pid = tgid, .kind = FOLLOW_EXIT};
        follow_events.perf_submit(args, &ev, sizeof(ev));
    }
    return 0;
}
