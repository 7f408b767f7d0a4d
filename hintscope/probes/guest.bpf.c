// hintscope guest probe: virtio-balloon free page hinting as the guest kernel sees it.
//
// Loaded by guest.py with BCC inside a Linux guest (Debian 6.1).  Two halves:
//  * kprobes on the balloon driver and virtio_ring (compiled only with -DHS_KPROBES, because the
//    CI host has no kprobes);
//  * kmem tracepoints (always compiled) that need no kernel structs, so CI loads exactly this
//    half on the host against real tracepoints.
// Hinted blocks live in the `blocks` hash keyed by pfn >> 10 so the kernel itself filters the
// very hot mm_page_alloc down to allocations that land in a block the balloon gave back.
#include <uapi/linux/ptrace.h>

#ifndef PAGE_OFFSET_BASE_ADDR
#define PAGE_OFFSET_BASE_ADDR 0
#endif
#ifndef HINT_ORDER
#define HINT_ORDER 10
#endif
#ifndef REUSE_CAP
#define REUSE_CAP 64            // reuse events emitted per returned block; the rest are counted
#endif

// event kinds: keep in sync with guest.py KINDS and parse/guest_stream.py
#define EV_RUN_ENTER      1     // report_free_page_func entry
#define EV_RUN_EXIT       2     // a0 = blocks hinted in this run, a1 = last start id sent
#define EV_CONFIG_CHANGED 3     // virtballoon_changed (config interrupt)
#define EV_CMD_ID         4     // kretprobe virtio_balloon_cmd_id_received: a0 = id read
#define EV_OUTBUF         5     // virtqueue_add_outbuf inside a run: a0 = u32 at data (start id / 0 stop)
#define EV_HINT           6     // virtqueue_add_inbuf inside a run: a0 = pfn, a1 = order, a2 = cmd id
#define EV_RETURN_ENTER   7     // return_free_pages_to_mm: a0 = n, a1 = reason
#define EV_RETURN_EXIT    8     // a0 = blocks returned, a1 = reason
#define EV_BLOCK_RETURNED 9     // mm_page_free of a hinted block inside a return: a0 = pfn, a1 = reason, a2 = order
#define EV_SHRINKER_ENTER 10    // virtio_balloon_shrinker_scan
#define EV_SHRINKER_EXIT  11    // a0 = pages freed
#define EV_REUSE          12    // mm_page_alloc overlapping a returned block: a0 = pfn, a1 = order, a2 = gfp
#define EV_FREE_PAGE_REPORT 13    // virtballoon_free_page_report: a0 = nents
#define EV_REMOVE         14    // remove_common entry
#define EV_HINT_FREED     15    // mm_page_free order HINT_ORDER inside a run (block not queued): a0 = pfn

#define RS_OTHER    0
#define RS_DONE     1
#define RS_SHRINKER 2
#define RS_REMOVE   3

#define SC_RUN      1
#define SC_RETURN   2
#define SC_SHRINKER 4
#define SC_REMOVE   8

#define BL_HELD     1
#define BL_RETURNED 2

struct hs_event {
    u64 ts;
    u64 a0;
    u64 a1;
    u64 a2;
    u32 kind;
    u32 cpu;
    u32 tid;
    u32 pad;
};

struct hs_scope {
    u32 flags;
    u32 reason;     // of the return in progress
    u32 cmd_id;     // last start id sent in this run
    u32 nhinted;
};

struct hs_block {
    u64 hint_ns;
    u64 ret_ns;
    u32 state;
    u32 reuse_n;
};

BPF_RINGBUF_OUTPUT(events, 256);          // 256 pages = 1 MiB
BPF_HASH(scope, u32, struct hs_scope, 1024);
BPF_HASH(blocks, u64, struct hs_block, 65536);
BPF_ARRAY(counters, u64, 4);              // 0 ringbuf drops, 1 reuse events suppressed (REUSE_CAP)

static __always_inline void emit(u32 kind, u64 a0, u64 a1, u64 a2)
{
    struct hs_event e = {};
    e.ts = bpf_ktime_get_ns();
    e.kind = kind;
    e.cpu = bpf_get_smp_processor_id();
    e.tid = (u32)bpf_get_current_pid_tgid();
    e.a0 = a0;
    e.a1 = a1;
    e.a2 = a2;
    if (events.ringbuf_output(&e, sizeof(e), 0) != 0) {
        int k = 0;
        u64 *c = counters.lookup(&k);
        if (c)
            __sync_fetch_and_add(c, 1);
    }
}

static __always_inline struct hs_scope *scope_of(u32 tid)
{
    return scope.lookup(&tid);
}

// ---- tracepoints: loadable anywhere -------------------------------------------------------

TRACEPOINT_PROBE(kmem, mm_page_free)
{
    if (args->order != HINT_ORDER)
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct hs_scope *s = scope_of(tid);
    if (!s)
        return 0;
    u64 pfn = args->pfn;
    u64 key = pfn >> HINT_ORDER;
    if (s->flags & SC_RETURN) {
        struct hs_block *b = blocks.lookup(&key);
        if (b) {
            b->state = BL_RETURNED;
            b->ret_ns = bpf_ktime_get_ns();
            b->reuse_n = 0;
        }
        emit(EV_BLOCK_RETURNED, pfn, s->reason, args->order);
    } else if (s->flags & SC_RUN) {
        emit(EV_HINT_FREED, pfn, s->cmd_id, args->order);
    }
    return 0;
}

TRACEPOINT_PROBE(kmem, mm_page_alloc)
{
    u64 pfn = args->pfn;
    u64 key = pfn >> HINT_ORDER;
    struct hs_block *b = blocks.lookup(&key);
    if (!b || b->state != BL_RETURNED)
        return 0;
    if (b->reuse_n >= REUSE_CAP) {
        int k = 1;
        u64 *c = counters.lookup(&k);
        if (c)
            __sync_fetch_and_add(c, 1);
        return 0;
    }
    b->reuse_n++;
    emit(EV_REUSE, pfn, args->order, args->gfp_flags);
    return 0;
}

// ---- kprobes: guest only ------------------------------------------------------------------
#ifdef HS_KPROBES
#include <linux/scatterlist.h>

static __always_inline void scope_set(u32 flag, u32 reason)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct hs_scope zero = {};
    struct hs_scope *s = scope.lookup_or_try_init(&tid, &zero);
    if (!s)
        return;
    s->flags |= flag;
    if (flag == SC_RETURN)
        s->reason = reason;
    if (flag == SC_RUN) {
        s->nhinted = 0;
    }
}

static __always_inline struct hs_scope *scope_clear(u32 flag)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct hs_scope *s = scope.lookup(&tid);
    if (s)
        s->flags &= ~flag;
    return s;
}

int on_run_enter(struct pt_regs *ctx)
{
    scope_set(SC_RUN, 0);
    emit(EV_RUN_ENTER, PT_REGS_PARM1(ctx), 0, 0);
    return 0;
}

int on_run_exit(struct pt_regs *ctx)
{
    struct hs_scope *s = scope_clear(SC_RUN);
    emit(EV_RUN_EXIT, s ? s->nhinted : 0, s ? s->cmd_id : 0, 0);
    return 0;
}

int on_config_changed(struct pt_regs *ctx)
{
    emit(EV_CONFIG_CHANGED, 0, 0, 0);
    return 0;
}

int on_cmd_id_ret(struct pt_regs *ctx)
{
    emit(EV_CMD_ID, (u32)PT_REGS_RC(ctx), 0, 0);
    return 0;
}

int on_add_outbuf(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct hs_scope *s = scope.lookup(&tid);
    if (!s || !(s->flags & SC_RUN))
        return 0;
    u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)PT_REGS_PARM4(ctx));
    if (v)
        s->cmd_id = v;
    emit(EV_OUTBUF, v, 0, 0);
    return 0;
}

int on_add_inbuf(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct hs_scope *s = scope.lookup(&tid);
    if (!s || !(s->flags & SC_RUN))
        return 0;
    u64 base = 0;
    if (PAGE_OFFSET_BASE_ADDR)
        bpf_probe_read_kernel(&base, sizeof(base), (void *)PAGE_OFFSET_BASE_ADDR);
    u64 va = PT_REGS_PARM4(ctx);
    u64 pfn = (va - base) >> 12;
    struct scatterlist *sg = (struct scatterlist *)PT_REGS_PARM2(ctx);
    u32 len = 0;
    bpf_probe_read_kernel(&len, sizeof(len), &sg->length);
    u32 order = 0;
    while (order < 20 && ((4096ULL << order) < len))
        order++;
    u64 key = pfn >> HINT_ORDER;
    struct hs_block b = {};
    b.hint_ns = bpf_ktime_get_ns();
    b.state = BL_HELD;
    blocks.update(&key, &b);
    s->nhinted++;
    emit(EV_HINT, pfn, order, s->cmd_id);
    return 0;
}

int on_return_enter(struct pt_regs *ctx)
{
    u64 n = PT_REGS_PARM2(ctx);
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct hs_scope *s = scope.lookup(&tid);
    u32 reason = RS_OTHER;
    if (s && (s->flags & SC_REMOVE))
        reason = RS_REMOVE;
    else if (s && (s->flags & SC_SHRINKER))
        reason = RS_SHRINKER;
    else if (n == (u64)-1)
        reason = RS_DONE;
    scope_set(SC_RETURN, reason);
    emit(EV_RETURN_ENTER, n, reason, 0);
    return 0;
}

int on_return_exit(struct pt_regs *ctx)
{
    struct hs_scope *s = scope_clear(SC_RETURN);
    emit(EV_RETURN_EXIT, PT_REGS_RC(ctx), s ? s->reason : 0, 0);
    return 0;
}

int on_shrinker_enter(struct pt_regs *ctx)
{
    scope_set(SC_SHRINKER, 0);
    emit(EV_SHRINKER_ENTER, 0, 0, 0);
    return 0;
}

int on_shrinker_exit(struct pt_regs *ctx)
{
    scope_clear(SC_SHRINKER);
    emit(EV_SHRINKER_EXIT, PT_REGS_RC(ctx), 0, 0);
    return 0;
}

int on_remove_enter(struct pt_regs *ctx)
{
    scope_set(SC_REMOVE, 0);
    emit(EV_REMOVE, 0, 0, 0);
    return 0;
}

int on_remove_exit(struct pt_regs *ctx)
{
    scope_clear(SC_REMOVE);
    return 0;
}

int on_free_page_report(struct pt_regs *ctx)
{
    emit(EV_FREE_PAGE_REPORT, PT_REGS_PARM3(ctx), 0, 0);
    return 0;
}
#endif /* HS_KPROBES */
